"""Experience replay (`replay`): a fixed-size memory of past pairs mixed into each batch."""

from collections.abc import Sequence

import numpy as np

from ccr_jax import schema
from ccr_jax.strategies import base

POLICIES = ("reservoir", "balanced")


def replay_memory(task_sizes: Sequence[int], memory_size: int, policy: str,
                  seed: int) -> list[np.ndarray]:
  """Which training examples of the past tasks a replay memory holds.

  A pure function of its arguments, so a resumed run rebuilds the same memory.

  Args:
    task_sizes: number of training examples of each past task, in task order.
    memory_size: slots in the memory.
    policy: 'reservoir' — reservoir sampling (Algorithm R) over the stream of
      every past example in task order, so each seen example is kept with equal
      probability; 'balanced' — the same number of slots per task (the first
      tasks take the remainder), each task's kept rows a random subset.
  Returns:
    For each past task, the sorted int64 rows of its training split in memory.
  """
  if not task_sizes:
    return []
  if policy == "balanced":
    slots = [memory_size // len(task_sizes)] * len(task_sizes) if task_sizes else []
    for i in range(memory_size - sum(slots)):
      slots[i % len(slots)] += 1
    return [np.sort(np.random.default_rng([seed, j]).permutation(n)[:min(m, n)])
            for j, (n, m) in enumerate(zip(task_sizes, slots))]
  if policy != "reservoir":
    raise ValueError(f"unknown replay policy {policy!r}; valid: 'reservoir', 'balanced'.")
  rng = np.random.default_rng(seed)
  offsets = np.cumsum([0, *task_sizes])
  reservoir: list[int] = []
  for seen in range(int(offsets[-1])):
    if len(reservoir) < memory_size:
      reservoir.append(seen)
    else:
      slot = rng.integers(0, seen + 1)
      if slot < memory_size:
        reservoir[slot] = seen
  kept = np.sort(np.asarray(reservoir, np.int64))
  return [kept[(kept >= lo) & (kept < hi)] - lo for lo, hi in zip(offsets[:-1], offsets[1:])]


def replay_strategy(memory_size: int, ratio: float, policy: str) -> base.Strategy:
  """A memory of `memory_size` past pairs filling `ratio` of every batch."""
  if policy not in POLICIES:
    raise ValueError(f"--config.strategy.replay.policy={policy!r}; valid: "
                     "'reservoir', 'balanced'.")
  return base.Strategy(
      name="replay",
      settings={"replay": {"memory_size": memory_size, "ratio": ratio,
                           "policy": policy}},
      memory=base.Memory(
          rows=lambda sizes, seed: replay_memory(sizes, memory_size, policy, seed),
          ratio=ratio))


# The memory's settings, shared by every strategy that keeps one (agem, der).
MEMORY_KEYS = {
    "memory_size": schema.Key(200, "images the memory holds, each with all its "
                              "captions (200 images = 1000 pairs at 5 captions)",
                              schema.at_least(1, integer=True)),
    "ratio": schema.Key(0.25, "fraction of every batch drawn from the memory",
                        lambda v: None if 0 < v < 1 else "a fraction in (0, 1)"),
    "policy": schema.Key("reservoir", "reservoir: every seen pair kept with equal "
                         "probability; balanced: equal slots per task",
                         schema.one_of(POLICIES)),
}

base.register(
    "replay", lambda c, _: replay_strategy(int(c.memory_size), float(c.ratio), c.policy),
    keys=MEMORY_KEYS)
