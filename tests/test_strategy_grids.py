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


def test_select_one_scores_the_mean_over_seeds_and_says_each_seeds_choice(monkeypatch):
  # Seed 0 peaks at 1, seed 1 at 10 (minus 1 per decade away from the peak).
  peaks = {0: 1.0, 1: 10.0}

  def fake_run(name, seed, split, overrides, quick):
    (value,) = overrides.values()
    score = -abs(math.log10(value) - math.log10(peaks[seed])) - (value > 10) * 5
    return {"summary": {r: {"task_aware": {f"{d}_r1": {"final_average": score}
                                           for d in ("i2t", "t2i")}}
                        for r in ("fixed", "reindex")}}

  monkeypatch.setattr(bench, "run", fake_run)
  monkeypatch.setitem(bench.GRID, "toy", ("toy.strength", (0.1, 1.0, 10.0)))
  chosen = bench.select_one("toy", quick=False, seeds=(0, 1))
  # Means: 0.1 -> -1.5, 1 -> -0.5, 10 -> -0.5: bracketed, no extension; each
  # seed alone picks its own peak, which the table shows.
  assert chosen["val_scores_by_seed"]["1"] == [0.0, -1.0]
  assert chosen["val_scores"]["10"] == pytest.approx(-0.5)
  assert chosen["best_per_seed"] == [1.0, 10.0]
  assert chosen["seeds"] == [0, 1]


def test_runs_of_a_redefined_strategy_are_not_current():
  line = lambda name, settings: {"strategy": name,  # noqa: E731
                                 "settings": {"settings": settings}}
  # agem's `ratio` is gone (a separate reference batch now): another method.
  assert not bench.is_current(line("agem", {"agem": {
      "memory_size": 200, "ratio": 0.25, "policy": "reservoir"}}))
  assert bench.is_current(line("agem", {"agem": {
      "memory_size": 200, "memory_batch": 64, "policy": "reservoir"}}))
  # ewc records fewer keys than its section (online EWC's decay): current.
  assert bench.is_current(line("ewc+replay", {
      "ewc": {"strength": 300.0, "batches": 20},
      "replay": {"memory_size": 200, "ratio": 0.25, "policy": "reservoir"}}))
  assert not bench.is_current(line("der@der.beta=0", {"der": {"strength": 3.0}}))


def test_defaults_are_the_scratch_validation_choices():
  # Issue 24 item 6: a strategy's default is what validation chose in the
  # scratch setting, and its doc names the pretrained choice; a new
  # selection that moves a value fails here until the defaults follow.
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from ccr_jax import strategies  # pylint: disable=g-import-not-at-top
  from ccr_jax.run import config as config_lib  # pylint: disable=g-import-not-at-top
  results = os.path.join(os.path.dirname(bench.__file__), "results")
  chosen = {s: json.load(open(os.path.join(results, f"strategies_selection_{s}.json")))
            for s in ("scratch", "pretrained")}
  defaults = strategies.default_config()
  docs = config_lib.config_schema()["strategy"]
  for name, c in chosen["scratch"].items():
    section, field = c["field"].split(".")
    assert defaults[section][field] == pytest.approx(c["value"]), name
    pretrained = chosen["pretrained"][name]["value"]
    doc = docs[section][field].doc
    assert (f"pretrained: {pretrained:g})" in doc if pretrained != c["value"]
            else "both settings" in doc), name
