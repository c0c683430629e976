"""Fine-tuning (`finetune`): plain training on each task, the lower bound."""

from ccr_jax.strategies import base

base.register("finetune", lambda settings, loss_fn: base.Strategy(name="finetune"))
