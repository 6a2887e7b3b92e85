"""Do compare's intervals and p-values mean what they say? A simulation, through the code path
compare uses for every row (`mlexp.analysis.comparisons.comparison_row`, which calls `mlexp.analysis.stats.paired`).

Each synthetic experiment is n seeds of a pretrained and a scratch run. A seed shifts both
runs alike (data order, initial head), each run adds its own noise, and accuracy is counted on
a 360-image validation set (binomial), as on `digits`: the true mean difference is known.

    python benchmarks/stats_coverage.py            # 1,000 experiments per case, about 20 s

prints, for n = 5 and n = 10 pairs, how often the 95% interval holds the true difference
(it should be 93-97%), and how often p < 0.05 when there is no difference (about 5%).
`tests/analysis/test_stats.py` asserts the same figures.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlexp.analysis.comparisons import comparison_row  # noqa: E402

VAL_IMAGES = 360
SCRATCH_ACC = 0.88
SEED_SD = 0.01       # what a training seed moves both runs of a pair by
RUN_SD = 0.008       # each run's own noise


def experiment(rng: np.random.Generator, n: int, truth: float) -> dict:
    """One synthetic experiment of n seed pairs, compared as compare compares them."""
    seed_effect = rng.normal(0, SEED_SD, n)
    pretrained = np.clip(SCRATCH_ACC + truth + seed_effect + rng.normal(0, RUN_SD, n), 0, 1)
    scratch = np.clip(SCRATCH_ACC + seed_effect + rng.normal(0, RUN_SD, n), 0, 1)
    pairs = pd.DataFrame({"value_a": rng.binomial(VAL_IMAGES, pretrained) / VAL_IMAGES,
                          "value_b": rng.binomial(VAL_IMAGES, scratch) / VAL_IMAGES,
                          "epochs_a": 3.0, "epochs_b": 3.0})
    return comparison_row("init", {"backbone": "sim"}, "pretrained", "scratch", pairs)


def simulate(n: int, truth: float, experiments: int = 1000, seed: int = 0) -> dict[str, float]:
    """coverage: share of 95% intervals holding `truth` (a missing interval counts as a miss);
    positive: share of p < 0.05; no_interval: share without an interval."""
    rng = np.random.default_rng(seed)
    rows = [experiment(rng, n, truth) for _ in range(experiments)]
    low = np.array([row["ci_low"] for row in rows])
    high = np.array([row["ci_high"] for row in rows])
    p = np.array([row["p_value"] for row in rows])
    return {"coverage": float(np.mean((low <= truth) & (truth <= high))), "positive": float(np.mean(p < 0.05)),
            "no_interval": float(np.mean(np.isnan(low)))}


def main() -> None:
    started = time.perf_counter()
    print("case                          coverage of 95% CI   p < 0.05   no interval")
    for n in (5, 10):
        result = simulate(n, truth=0.02)
        print(f"n = {n:2d} pairs, true diff +2 pp   {result['coverage']:.3f}                {result['positive']:.3f}"
              f"      {result['no_interval']:.3f}")
    for n in (5, 10):
        result = simulate(n, truth=0.0, seed=1)
        print(f"n = {n:2d} pairs, no difference    {result['coverage']:.3f}                {result['positive']:.3f}"
              f"      {result['no_interval']:.3f}")
    print(f"(1,000 experiments per case; {time.perf_counter() - started:.1f} s. With 5 pairs the smallest "
          "two-sided sign-flip p is 2/32 = 0.0625, so p < 0.05 cannot happen.)")


if __name__ == "__main__":
    main()
