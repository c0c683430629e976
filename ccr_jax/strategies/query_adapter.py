"""Query adapter (`query_adapter`) for the fixed index: map today's queries into
the space of the snapshot that built an old index (in the spirit of QDC).

Without reindexing, task j's gallery stays embedded by snapshot j while its
queries are embedded by the current model, so drift between the two spaces
costs recall. After each task, for every older snapshot s, evaluation fits a
linear map W from the current model's space into s's, per modality, on the
current task's training items embedded by both (no old data is needed: the
current task's data is what both models can embed), and searches s's
indices with normalize(q W). The map is ridge regression towards the identity
  W = argmin ||X W - Y||^2 + ridge * ||W - I||^2 = (X^T X + ridge I)^-1 (X^T Y + ridge I),
X, Y `[N, dim]` the new and old embeddings of the same items, so a small
`ridge` trusts the data and a large one keeps queries as they are.
Training is fine-tuning's: the adapter only changes how the fixed regime is
searched (combine it with other strategies with '+').
"""

from typing import Callable

import numpy as np

from ccr_jax import schema
from ccr_jax.strategies import base


def fit_map(new: np.ndarray, old: np.ndarray, ridge: float) -> np.ndarray:
  """The ridge-to-identity map `[dim, dim]` from `new` `[N, dim]` to `old` `[N, dim]`."""
  x, y = np.asarray(new, np.float64), np.asarray(old, np.float64)
  eye = np.eye(x.shape[1])
  return np.linalg.solve(x.T @ x + ridge * eye, x.T @ y + ridge * eye)


def adapter(new: np.ndarray, old: np.ndarray, ridge: float,
            max_items: int) -> Callable[[np.ndarray], np.ndarray]:
  """queries `[Q, dim]` -> normalize(queries @ W), W fitted on the first
  `max_items` pairs of `new`/`old` (0: all)."""
  if max_items:
    new, old = new[:max_items], old[:max_items]
  w = fit_map(new, old, ridge)

  def apply(queries: np.ndarray) -> np.ndarray:
    mapped = np.asarray(queries, np.float64) @ w
    return (mapped / np.maximum(np.linalg.norm(mapped, axis=-1, keepdims=True),
                                1e-12)).astype(np.float32)

  return apply


def query_adapter_strategy(ridge: float, max_items: int) -> base.Strategy:
  """Fine-tuning plus the query map for old indices."""
  return base.Strategy(
      name="query_adapter",
      settings={"query_adapter": {"ridge": ridge, "max_items": max_items}},
      adapt_queries=lambda new, old: adapter(new, old, ridge, max_items))


base.register(
    "query_adapter", lambda c, _: query_adapter_strategy(float(c.ridge), int(c.max_items)),
    keys={"ridge": schema.Key(0.1, "pull of the map towards the identity "
                              "(chosen on validation, scratch; pretrained: 1)",
                              schema.greater_than(0)),
          "max_items": schema.Key(0, "current-task training items (images; "
                                  "captions: as many rows) the map is fitted on "
                                  "(0: all)", schema.at_least(0, integer=True))})
