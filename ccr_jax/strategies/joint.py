"""Joint training (`joint`): task t trains on the data of tasks 1..t, the upper bound."""

from ccr_jax.strategies import base

base.register("joint", lambda settings, loss_fn: base.Strategy(
    name="joint", train_tasks=lambda t: list(range(t + 1))))
