"""ccr_jax.stats against analytic values and independent NumPy formulas."""

import math

import numpy as np
import pytest

from ccr_jax import stats


def test_summarize_is_sample_std_with_n():
  xs = [1.0, 2.0, 4.0, None]
  s = stats.summarize(xs)
  mean = (1 + 2 + 4) / 3
  std = math.sqrt(sum((x - mean) ** 2 for x in (1, 2, 4)) / 2)  # ddof = 1
  assert s.n == 3
  assert s.mean == pytest.approx(mean, abs=1e-12)
  assert s.std == pytest.approx(std, abs=1e-12)
  assert stats.summarize([5.0]) == stats.Summary(5.0, None, 1)
  assert stats.summarize([None]) == stats.Summary(None, None, 0)
  assert stats.format_summary(s, 2, with_n=True) == f"{mean:.2f} ± {std:.2f} (n=3)"
  assert stats.mean_std([5.0]) == "5.0"
  assert stats.mean_std([]) == "–"


@pytest.mark.parametrize("p", [0.9, 0.975, 0.995])
def test_t_quantile_matches_closed_forms(p):
  # dof 1 is the Cauchy distribution: F^-1(p) = tan(pi (p - 1/2)).
  assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
  # dof 2: F^-1(p) = (2p - 1) / sqrt(2 p (1 - p)).
  assert stats.t_quantile(p, 2) == pytest.approx(
      (2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_paired_interval_and_p_by_hand_at_two_dof():
  ours, theirs = [3.0, 5.0, 4.0], [1.0, 2.0, 2.0]
  d = np.array([2.0, 3.0, 2.0])
  sem = d.std(ddof=1) / math.sqrt(3)
  q = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975, 2}, closed form
  t = d.mean() / sem
  # dof 2: two-sided p = 1 - t / sqrt(2 + t^2).
  p = 1 - t / math.sqrt(2 + t * t)
  r = stats.paired(ours, theirs)
  assert r.n == 3
  assert r.mean == pytest.approx(d.mean())
  assert r.low == pytest.approx(d.mean() - q * sem, rel=1e-9)
  assert r.high == pytest.approx(d.mean() + q * sem, rel=1e-9)
  assert r.p == pytest.approx(p, rel=1e-9)
  assert r.beats and not r.loses
  assert stats.format_paired(r).startswith("**+2.3 [")


def test_paired_edge_cases():
  assert stats.paired([1.0], [0.0]) == stats.Paired(1.0, None, None, None, 1)
  same = stats.paired([1.0, 2.0], [0.0, 1.0])  # every difference equal
  assert (same.low, same.high, same.p) == (1.0, 1.0, 0.0) and same.beats
  zero = stats.paired([1.0, 2.0], [1.0, 2.0])
  assert zero.p == 1.0 and not zero.beats and not zero.loses
  worse = stats.paired([0.0, 0.1, 0.0, 0.2], [1.0, 1.2, 1.1, 1.1])
  assert worse.loses and stats.format_paired(worse).startswith("*-")
  with pytest.raises(ValueError, match="same seeds"):
    stats.paired([1.0, 2.0], [1.0])


def test_interval_covers_at_its_nominal_rate():
  # 4000 experiments of 5 normal differences with true mean 0.3: the 95 %
  # interval must contain 0.3 in 95 % of them. Binomial std of the rate is
  # sqrt(.95 * .05 / 4000) = 0.0034; 0.012 is 3.5 of those.
  rng = np.random.default_rng(0)
  hits = 0
  for _ in range(4000):
    d = rng.normal(0.3, 1.0, size=5)
    r = stats.paired(d, np.zeros(5))
    hits += r.low <= 0.3 <= r.high
  assert abs(hits / 4000 - 0.95) < 0.012
