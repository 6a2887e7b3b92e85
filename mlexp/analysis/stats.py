"""The statistics behind `compare`: paired differences over seeds and folds, done the way
papers on comparing trained models ask (Bouthillier et al. 2021; Agarwal et al. 2021, rliable).

- Interval: a 95% *studentized* bootstrap (bootstrap-t) of the mean. The plain percentile
  bootstrap is too narrow with the few seeds of a typical sweep: in `benchmarks/stats_coverage.py`
  (1,000 simulated experiments each) it covered the true difference 84% of the time with 5
  pairs and 89% with 10, where bootstrap-t covers 93-97%. Resamples are enumerated exactly
  up to 6 values (6^6 = 46,656), else drawn (seeded, `RESAMPLES`): the interval is the same
  on every call.
- p-value: the sign-flip permutation test of "mean difference 0", exact (every sign pattern)
  up to 16 pairs, else `RESAMPLES` seeded random flips, counted as (1 + hits) / (1 + draws).
  With 2 pairs the smallest possible p is 0.5: nothing here ever prints p = 0.
- Multiple comparisons: Holm's step-down adjustment over every p-value of one report.
- Probability that A beats B: the share of pairs A wins (ties count half), with a Wilson
  score interval (never zero-width, even when A wins every pair).
- Small samples are said, not hidden: no interval below `MIN_INTERVAL_N` values, when all
  values are equal (no spread to resample) or when ties leave the mean at an end of the
  interval; under `SMALL_N` the smallest difference the design could detect at 80% power is
  reported.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
RESAMPLES = 20_000
EXACT_BOOTSTRAP_MAX_N = 6
CHUNK = 2_000
LARGE_N = 64
EXACT_PERMUTATION_MAX_N = 16
# With 2 values a bootstrap has 4 resamples and its interval collapses; with 3 the
# bootstrap-t interval covered 85% in simulation, not 95% (benchmarks/stats_coverage.py).
MIN_INTERVAL_N = 4
SMALL_N = 5
POWER = 0.8
SEED = 20211101


@dataclass(frozen=True)
class Summary:
    """One sample (a group's runs, or paired differences): location, spread and a 95% interval."""

    n: int
    mean: float
    std: float          # sample std (ddof=1); NaN for one value
    ci_low: float       # NaN when there is no interval (see `no_interval_reason`)
    ci_high: float
    median: float
    iqm: float          # interquartile mean (rliable); NaN below 4 values

    @property
    def has_interval(self) -> bool:
        return not math.isnan(self.ci_low)


@dataclass(frozen=True)
class Paired(Summary):
    """A paired comparison A - B: the differences' summary plus the test and P(A beats B)."""

    p_value: float = math.nan      # sign-flip permutation, two-sided, unadjusted
    p_exact: bool = True
    win_prob: float = math.nan     # P(A > B) over the pairs, ties half
    win_low: float = math.nan
    win_high: float = math.nan
    detectable: float = math.nan   # smallest |difference| detectable at 80% power (n < SMALL_N)


def describe(values, seed: int = SEED) -> Summary:
    """n, mean, std, 95% bootstrap-t interval, median and IQM of the finite `values`."""
    x = finite(values)
    n = len(x)
    if n == 0:
        return Summary(0, *(math.nan,) * 6)
    low, high = bootstrap_t_interval(x, seed)
    return Summary(n, float(x.mean()), float(x.std(ddof=1)) if n > 1 else math.nan, low, high,
                   float(np.median(x)), interquartile_mean(x) if n >= 4 else math.nan)


def paired(a, b, seed: int = SEED) -> Paired:
    """Compare A and B on matched pairs (same seed, fold, dataset): the differences a - b."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    diffs = a[keep] - b[keep]
    base = describe(diffs, seed)
    if base.n == 0:
        return Paired(**base.__dict__)
    wins = float(np.sum(diffs > 0) + 0.5 * np.sum(diffs == 0))
    low, high = wilson_interval(wins, base.n)
    return Paired(**base.__dict__, p_value=sign_flip_p(diffs, seed), p_exact=base.n <= EXACT_PERMUTATION_MAX_N,
                  win_prob=wins / base.n, win_low=low, win_high=high,
                  detectable=detectable_difference(base.std, base.n) if base.n < SMALL_N else math.nan)


def finite(values) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return x[np.isfinite(x)]


def no_interval_reason(summary: Summary) -> str | None:
    """Why a summary has no interval, in words (None when it has one)."""
    if summary.has_interval:
        return None
    if summary.n < MIN_INTERVAL_N:
        return f"n = {summary.n}: an interval needs at least {MIN_INTERVAL_N} (run {MIN_INTERVAL_N - summary.n} more)"
    if summary.std == 0 or not math.isfinite(summary.std):
        return f"all {summary.n} values are equal: no spread to estimate an interval from"
    return f"{summary.n} values with ties: too few distinct resamples for a bootstrap interval (run more seeds)"


# --- bootstrap ---------------------------------------------------------------------------------
def resamples(n: int) -> int:
    """How many random resamples for n values. An endpoint's Monte Carlo error scales with the
    standard error sd / sqrt(n): from LARGE_N values a quarter of RESAMPLES keeps it as small
    (and keeps compare over thousands of runs quick)."""
    return RESAMPLES if n < LARGE_N else RESAMPLES // 4


@functools.lru_cache(maxsize=8)
def exact_resamples(n: int) -> np.ndarray:
    """Every ordered resample of n <= EXACT_BOOTSTRAP_MAX_N items, as index rows (n^n x n)."""
    draws = np.array(list(itertools.product(range(n), repeat=n)), dtype=np.int64)
    draws.flags.writeable = False
    return draws


def resample_moments(centred: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std of every resample: all of them up to 6 values, else RESAMPLES seeded
    draws, taken in chunks (a 20,000 x n index array would not fit in cache for large n)."""
    n = len(centred)
    if n <= EXACT_BOOTSTRAP_MAX_N:
        chunks = [exact_resamples(n)]
    else:
        rng, total = np.random.default_rng(seed), resamples(n)
        chunks = (rng.integers(0, n, size=(min(CHUNK, total - start), n)) for start in range(0, total, CHUNK))
    means, sds = [], []
    for draws in chunks:
        samples = centred[draws]
        means.append(samples.mean(axis=1))
        sds.append(samples.std(axis=1, ddof=1))
    return np.concatenate(means), np.concatenate(sds)


@functools.lru_cache(maxsize=32)
def sign_patterns(n: int, seed: int) -> np.ndarray:
    """Every pattern of n signs (2^n x n) up to EXACT_PERMUTATION_MAX_N, else RESAMPLES seeded
    random ones (cached, read-only)."""
    if n <= EXACT_PERMUTATION_MAX_N:
        signs = (1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)).astype(float)
    else:
        signs = 1.0 - 2.0 * np.random.default_rng(seed).integers(0, 2, size=(resamples(n), n))
    signs.flags.writeable = False
    return signs


def bootstrap_t_interval(x: np.ndarray, seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Studentized bootstrap interval of the mean: mean - t*_{hi} se, mean - t*_{lo} se.
    (NaN, NaN) below MIN_INTERVAL_N values or with zero spread."""
    n = len(x)
    if n < MIN_INTERVAL_N:
        return math.nan, math.nan
    sd = float(x.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(float(x.mean()))):
        return math.nan, math.nan
    means, sds = resample_moments(x - x.mean(), seed)  # of centred values: t* = mean* / se*
    varied = sds > 1e-9 * sd  # a resample of one repeated value has no t statistic (sd 0, or rounding noise)
    t = means[varied] / (sds[varied] / math.sqrt(n))
    t_low, t_high = np.quantile(t, [(1 - level) / 2, (1 + level) / 2])
    se = sd / math.sqrt(n)
    low, high = float(x.mean() - t_high * se), float(x.mean() - t_low * se)
    if not low < float(x.mean()) < high:  # ties leave too few distinct resamples: no honest interval
        return math.nan, math.nan
    return low, high


def interquartile_mean(x: np.ndarray) -> float:
    """Mean of the middle 50% (rliable's IQM; scipy's trim_mean(x, 0.25)): robust to one diverged seed."""
    cut = int(0.25 * len(x))
    return float(np.sort(x)[cut:len(x) - cut].mean())


# --- tests -------------------------------------------------------------------------------------
def sign_flip_p(diffs, seed: int = SEED) -> float:
    """Two-sided sign-flip permutation p-value of "the mean difference is 0"."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return math.nan
    observed = abs(d.mean())
    # Sums in another order differ in their last bits: a relative tolerance lets the observed
    # pattern (and its mirror) always count as "at least as extreme".
    tolerance = 1e-9 * max(observed, float(np.abs(d).max()))
    flipped = np.abs(sign_patterns(n, seed) @ d) / n
    if n <= EXACT_PERMUTATION_MAX_N:
        return float(np.mean(flipped >= observed - tolerance))
    return (1 + int(np.sum(flipped >= observed - tolerance))) / (1 + len(flipped))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment (controls the family-wise error rate); NaN stays NaN."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    present = np.flatnonzero(np.isfinite(p))
    m = len(present)
    running = 0.0
    for rank, index in enumerate(present[np.argsort(p[present], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def wilson_interval(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion (sensible at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf((1 + level) / 2)
    phat = successes / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def detectable_difference(std: float, n: int, power: float = POWER, level: float = LEVEL) -> float:
    """Smallest true mean difference a paired test of n pairs detects with `power`, given the
    observed spread of the differences (t approximation; NaN when the spread is unknown)."""
    from scipy.special import stdtrit  # Student t quantiles (scipy.special: no scipy.stats import)

    if n < 2 or not math.isfinite(std) or std <= 0:
        return math.nan
    df = n - 1
    return float((stdtrit(df, (1 + level) / 2) + stdtrit(df, power)) * std / math.sqrt(n))
