"""benchmarks/strategies.py's grid search: it extends a grid until the chosen
strength is bracketed (no run is made here: `run` is replaced)."""

import math

import pytest

from benchmarks import strategies as bench


@pytest.mark.parametrize("peak, best, expected_grid", [
    (1.0, 1.0, [0.1, 1.0, 10.0]),                   # already bracketed
    (0.01, 0.01, [0.001, 0.01, 0.1, 1.0, 10.0]),    # best at the low edge twice
    (300.0, 100.0, [0.1, 1.0, 10.0, 100.0, 1000.0]),  # nearest grid value in log
])
def test_select_one_extends_the_grid_until_the_best_is_bracketed(monkeypatch, peak, best,
                                                                   expected_grid):
  calls = []

  def fake_run(name, seed, split, overrides, quick):
    (value,) = overrides.values()
    calls.append(value)
    assert split == "val" and seed == 0
    score = -abs(math.log10(value) - math.log10(peak))  # peaks at `peak`
    return {"summary": {r: {"task_aware": {f"{d}_r1": {"final_average": score}
                                           for d in ("i2t", "t2i")}}
                        for r in ("fixed", "reindex")}}

  monkeypatch.setattr(bench, "run", fake_run)
  monkeypatch.setitem(bench.GRID, "toy", ("toy.strength", (0.1, 1.0, 10.0)))
  chosen = bench.select_one("toy", quick=False)
  assert sorted(calls) == pytest.approx(expected_grid)
  assert chosen["value"] == pytest.approx(best) and chosen["bracketed"]


def test_select_one_gives_up_unbracketed_after_max_extend(monkeypatch):
  def fake_run(name, seed, split, overrides, quick):
    (value,) = overrides.values()
    score = -value  # always better lower: never bracketed
    return {"summary": {r: {"task_aware": {f"{d}_r1": {"final_average": score}
                                           for d in ("i2t", "t2i")}}
                        for r in ("fixed",)}}

  monkeypatch.setattr(bench, "run", fake_run)
  monkeypatch.setitem(bench.GRID, "toy", ("toy.strength", (0.1, 1.0, 10.0)))
  chosen = bench.select_one("toy", quick=False)
  assert len(chosen["val_scores"]) == 3 + bench.MAX_EXTEND
  assert not chosen["bracketed"]
