"""The statistics of compare: exact small cases by hand, and the coverage and error rates of
1,000 simulated experiments through the code path compare uses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.stats_coverage import simulate
from mlexp.analysis import stats
from mlexp.analysis.comparisons import comparison_row


def test_two_pairs_with_equal_differences_give_p_half_and_say_n_is_too_small():
    result = stats.paired([0.90, 0.85], [0.892, 0.842])  # both pairs differ by +0.8 pp
    assert result.mean == pytest.approx(0.008)
    assert result.p_value == 0.5  # 2 of the 4 sign patterns are as extreme: never 0 from two pairs
    assert math.isnan(result.ci_low) and math.isnan(result.ci_high)  # no zero-width interval
    assert stats.no_interval_reason(result) == "n = 2: an interval needs at least 4 (run 2 more)"
    assert (result.win_prob, result.win_high) == (1.0, 1.0) and 0.3 < result.win_low < 0.4  # Wilson, not [1, 1]


def test_zero_spread_never_gives_a_zero_width_interval_or_p_zero():
    result = stats.paired([0.9] * 6, [0.88] * 6)
    assert math.isnan(result.ci_low) and "all 6 values are equal" in stats.no_interval_reason(result)
    assert result.p_value == pytest.approx(2 / 64)
    row = comparison_row("init", {"backbone": "b"}, "pretrained", "scratch",
                         _pairs([0.9, 0.9], [0.892, 0.892]))
    assert row["p_value"] == 0.5 and "an interval needs at least 4" in row["note"]
    assert "n = 2 < 5: too few pairs to estimate the detectable difference" in row["note"]  # no spread to use


def test_one_pair_has_no_interval_and_says_how_many_are_needed():
    row = comparison_row("init", {}, "pretrained", "scratch", _pairs([0.9], [0.8]))
    assert row["n"] == 1 and math.isnan(row["ci_low"]) and row["p_value"] == 1.0
    assert "n = 1: an interval needs at least 4 (run 3 more)" in row["note"]


def test_permutation_p_is_exact_up_to_16_pairs_and_sampled_beyond():
    diffs = np.array([0.03, 0.01, 0.02, -0.005])
    # by hand: |mean| of the observed signs is 0.01375; patterns at least as extreme:
    # (+,+,+,-), (+,+,+,+), and their mirror images: 4 of 16
    assert stats.sign_flip_p(diffs) == pytest.approx(4 / 16)
    big = np.random.default_rng(0).normal(0.01, 0.02, 40)
    sampled = stats.sign_flip_p(big)
    assert sampled == stats.sign_flip_p(big)  # seeded: the same on every call
    assert sampled > 0 and (sampled * (1 + stats.RESAMPLES)) % 1 == pytest.approx(0, abs=1e-6)  # (1 + hits) / (1 + B)


def test_holm_matches_a_hand_computed_example():
    # p sorted: .01 (x4 = .04), .02 (x3 = .06), .03 (x2 = .06, kept monotone), .5 (x1 = .5)
    adjusted = stats.holm([0.03, 0.5, 0.01, float("nan"), 0.02])
    assert adjusted[[2, 4, 0, 1]] == pytest.approx([0.04, 0.06, 0.06, 0.5])
    assert math.isnan(adjusted[3])
    assert stats.holm([0.9, 0.8]).tolist() == [1.0, 1.0]  # .8 x 2 capped at 1; .9 x 1 kept monotone


def test_group_summary_median_and_interquartile_mean():
    summary = stats.describe([0.80, 0.82, 0.84, 0.86, 0.10])  # one diverged seed
    assert summary.n == 5 and summary.median == 0.82
    assert summary.iqm == pytest.approx(np.mean([0.80, 0.82, 0.84]))  # scipy trim_mean(0.25): drops 1 each end
    assert summary.ci_low < summary.mean < summary.ci_high
    assert math.isnan(stats.describe([0.8, 0.9, 0.85]).iqm)  # IQM from 4 runs


def test_interval_is_stable_to_a_tenth_of_a_point():
    diffs = np.random.default_rng(3).normal(0.02, 0.013, 10)  # realistic: ~1.3 pp spread over seeds
    intervals = [stats.bootstrap_t_interval(diffs, seed) for seed in range(10)]  # 10 resampling seeds
    lows, highs = [low for low, _ in intervals], [high for _, high in intervals]
    assert max(lows) - min(lows) < 0.001 and max(highs) - min(highs) < 0.001


def test_detectable_difference_is_reported_below_five_pairs():
    row = comparison_row("init", {}, "pretrained", "scratch", _pairs([0.90, 0.91, 0.93, 0.92], [0.89, 0.88, 0.9, 0.9]))
    expected = stats.detectable_difference(float(np.std([0.01, 0.03, 0.03, 0.02], ddof=1)), 4)
    assert row["detectable"] == pytest.approx(expected) and "detectable at 80% power is ±" in row["note"]
    assert 0.01 < expected < 0.06


@pytest.mark.slow  # real processes or a long simulation: `make test`, not `make check`
def test_simulated_coverage_and_false_positive_rate():
    """1,000 synthetic experiments per case (benchmarks/stats_coverage.py prints the same)."""
    for n in (5, 10):
        covered = simulate(n, truth=0.02)["coverage"]
        assert 0.93 <= covered <= 0.97, (n, covered)
    null = simulate(10, truth=0.0, seed=1)
    assert 0.03 <= null["positive"] <= 0.07, null


def _pairs(a, b):
    import pandas as pd

    return pd.DataFrame({"value_a": a, "value_b": b, "epochs_a": 3.0, "epochs_b": 3.0})
