"""Ablation statistics: how much of a difference between two rows is real, over images and over seeds.

Everything starts from the per-image counts of `per_image.npz` (`records.PerImageCounts`): for each
image i and class c the intersection I[i, c] and union U[i, c]. The dataset mIoU is
mIoU(I, U) = mean over the classes c with sum_i U[i, c] > 0 of sum_i I[i, c] / sum_i U[i, c].

Image sampling (bootstrap). A resample draws N images with replacement; its multiplicities
w_b ~ Multinomial(N, 1/N, ..., 1/N) (numpy `default_rng(seed)`, so the same seed gives the same
resamples), and its mIoU is m_b = mIoU(w_b I, w_b U): counts summed over the drawn images, classes with
an empty union in that resample left out, exactly as in the full evaluation. B resamples (default
2,000) are one matrix product W (B x N) @ I (N x C), in float64, which is exact for integer counts below
2**53. Every run evaluated on the same images uses the same W: differences are paired by construction.

- one run and protocol: the 95 % interval is the percentile interval [q 2.5 %, q 97.5 %] of m_b;
- a cell (a table row x column: runs r = 1..n, one per seed, values m_r): the mean m = mean_r m_r, the seed
  std s = sample std of m_r (ddof 1), n; the image variance of the mean v_img = Var_b(mean_r m_rb). Its
  interval is the percentile interval of mean_r m_rb when n = 1, and m +- 1.96 sqrt(s^2 / n + v_img)
  when n >= 2 (seed and image sampling are independent, so their variances add). The spread of one run
  ("seeds + images") is sqrt(s^2 + mean_r Var_b(m_rb)): the law of total variance, Var(m) =
  Var_seed(E[m | seed]) + E_seed[Var_images(m | seed)];
- a difference D = m_A - m_B between two cells on the same images: D_b = mean_r m_A,rb - mean_r m_B,rb.
  The images-only interval is the percentile interval of D_b (the paired bootstrap). Seed variance:
  when A and B are the same runs (two protocols, or without and with the CRF, of the same checkpoints),
  v_seed = Var(d_r) / n with d_r = m_A,r - m_B,r; when they are different runs, v_seed = s_A^2 / n_A +
  s_B^2 / n_B, estimated only when both have n >= 2. The combined interval is D +- 1.96 sqrt(Var_b(D_b) +
  v_seed); it is the one the verdict reads when it exists, else the images-only one.

Verdict on an ordering the paper claims (its two numbers differ, sign p):
  "agrees, significant"     our D has sign p and the interval excludes 0;
  "agrees within noise"     our D has sign p and the interval contains 0;
  "disagrees"               our D is 0 or of the other sign, and the interval contains 0;
  "disagrees, significant"  our D has the other sign and the interval excludes 0.
Two identical runs give D_b = 0 for every resample: the interval is [0, 0] and contains 0.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from deeplab_lit.records import PerImageCounts, miou_from_counts

Z = {0.90: 1.6448536269514722, 0.95: 1.959963984540054, 0.99: 2.5758293035489004}
AGREES_SIGNIFICANT = "agrees, significant"
AGREES_WITHIN_NOISE = "agrees within noise"
DISAGREES = "disagrees"
DISAGREES_SIGNIFICANT = "disagrees, significant"
VERDICTS = (AGREES_SIGNIFICANT, AGREES_WITHIN_NOISE, DISAGREES, DISAGREES_SIGNIFICANT)


def miou_rows(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """mIoU of each row of summed counts (..., C): mean IoU over the row's classes with a non-zero union
    (NaN where there is none)."""
    present = union > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(present, intersection / np.where(present, union, 1), 0.0)
        classes = present.sum(-1)
        return np.where(classes > 0, iou.sum(-1) / np.maximum(classes, 1), np.nan)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    method: str  # "images" (percentile bootstrap) or "images + seeds" (normal, combined variance)

    def contains(self, value: float = 0.0) -> bool:
        return self.low <= value <= self.high

    def scaled(self, factor: float) -> "Interval":
        return Interval(self.estimate * factor, self.low * factor, self.high * factor, self.method)


class Bootstrap:
    """Image resamples shared by every run evaluated on the same images (so every difference is paired),
    cached per image list; resampled mIoUs cached per counts object."""

    def __init__(self, resamples: int = 2000, seed: int = 0, level: float = 0.95):
        if resamples < 1000:
            raise ValueError(f"{resamples} resamples: use at least 1,000 for a 95 % interval")
        if level not in Z:
            raise ValueError(f"level {level}: one of {sorted(Z)}")
        self.resamples, self.seed, self.level = resamples, seed, level
        self._weights: dict[tuple[str, ...], np.ndarray] = {}
        self._values: dict[tuple[int, tuple[str, ...]], np.ndarray] = {}

    @property
    def z(self) -> float:
        return Z[self.level]

    def weights(self, names: tuple[str, ...]) -> np.ndarray:
        """B x N multiplicities of the images `names` (each row sums to N), the same for the same names."""
        names = tuple(names)
        if names not in self._weights:
            n = len(names)
            rng = np.random.default_rng(self.seed)
            self._weights[names] = rng.multinomial(n, np.full(n, 1.0 / n), size=self.resamples).astype(np.float64)
        return self._weights[names]

    def values(self, counts: PerImageCounts, names: Optional[tuple[str, ...]] = None) -> np.ndarray:
        """The B resampled mIoUs of one run's counts (restricted to `names` if given)."""
        names = tuple(counts.names if names is None else names)
        cache = (id(counts), names)
        if cache not in self._values:
            subset = counts if names == counts.names else counts.subset(names)
            w = self.weights(names)
            self._values[cache] = miou_rows(w @ subset.intersection.astype(np.float64),
                                            w @ subset.union.astype(np.float64))
        return self._values[cache]

    def percentile(self, estimate: float, values: np.ndarray) -> Interval:
        tail = (1 - self.level) / 2
        low, high = np.nanquantile(values, [tail, 1 - tail])
        return Interval(float(estimate), float(low), float(high), "images")

    def interval(self, counts: PerImageCounts) -> Interval:
        """The percentile interval of one run's mIoU over image resamples."""
        return self.percentile(counts.miou, self.values(counts))


def common_names(counts: Sequence[PerImageCounts]) -> tuple[str, ...]:
    """The images every record covers, in the first one's order."""
    if not counts:
        return ()
    shared = set(counts[0].names).intersection(*(c.names for c in counts[1:]))
    return tuple(name for name in counts[0].names if name in shared)


def _miou_on(counts: PerImageCounts, names: tuple[str, ...]) -> float:
    return counts.miou if names == counts.names else counts.subset(names).miou


@dataclass(frozen=True)
class CellStats:
    """A cell's runs (one per seed) over seeds and images; fractions."""

    mean: float
    seed_std: Optional[float]  # sample std over seeds, None with one run
    n: int
    image_std: float  # root mean bootstrap variance of one run
    spread: Optional[float]  # sqrt(seed_std^2 + image_std^2): one run, seeds + images; None with one run
    interval: Interval  # of the mean
    images: int  # images every run covers

    def scaled(self, factor: float) -> "CellStats":
        scale = (lambda v: None if v is None else v * factor)
        return CellStats(self.mean * factor, scale(self.seed_std), self.n, self.image_std * factor,
                         scale(self.spread), self.interval.scaled(factor), self.images)


def cell_stats(bootstrap: Bootstrap, runs: Sequence[PerImageCounts]) -> Optional[CellStats]:
    names = common_names(runs)
    if not runs or not names:
        return None
    values = np.array([_miou_on(c, names) for c in runs])
    resampled = np.stack([bootstrap.values(c, names) for c in runs])
    mean, n = float(values.mean()), len(runs)
    seed_std = float(np.std(values, ddof=1)) if n > 1 else None
    image_var = float(np.mean(np.nanvar(resampled, axis=1, ddof=1)))
    mean_b = resampled.mean(0)
    if n == 1:
        interval = bootstrap.percentile(mean, mean_b)
    else:
        half = bootstrap.z * math.sqrt(seed_std ** 2 / n + float(np.nanvar(mean_b, ddof=1)))
        interval = Interval(mean, mean - half, mean + half, "images + seeds")
    spread = math.sqrt(seed_std ** 2 + image_var) if seed_std is not None else None
    return CellStats(mean, seed_std, n, math.sqrt(image_var), spread, interval, len(names))


@dataclass(frozen=True)
class Difference:
    """D = mean of A's runs - mean of B's runs on the same images; fractions."""

    estimate: float
    images: Interval  # paired percentile bootstrap
    combined: Optional[Interval]  # images + seeds, when the seed variance can be estimated
    paired_runs: bool  # A and B are the same runs (protocols or CRF of the same checkpoints)
    n_a: int
    n_b: int
    image_count: int

    @property
    def interval(self) -> Interval:
        """The interval verdicts read: the combined one if any, else images only."""
        return self.combined or self.images

    def scaled(self, factor: float) -> "Difference":
        return Difference(self.estimate * factor, self.images.scaled(factor),
                          self.combined.scaled(factor) if self.combined else None, self.paired_runs, self.n_a,
                          self.n_b, self.image_count)


def difference(bootstrap: Bootstrap, a: Sequence[PerImageCounts], b: Sequence[PerImageCounts],
               paired_runs: bool = False) -> Optional[Difference]:
    """The paired bootstrap of mean(A) - mean(B) over the images both cover (see the module docstring)."""
    names = common_names([*a, *b])
    if not a or not b or not names:
        return None
    values_a = np.array([_miou_on(c, names) for c in a])
    values_b = np.array([_miou_on(c, names) for c in b])
    resampled = np.stack([bootstrap.values(c, names) for c in a]).mean(0) - \
        np.stack([bootstrap.values(c, names) for c in b]).mean(0)
    estimate = float(values_a.mean() - values_b.mean())
    images = bootstrap.percentile(estimate, resampled)
    seed_var = None
    if paired_runs and len(a) == len(b) and len(a) > 1:
        seed_var = float(np.var(values_a - values_b, ddof=1)) / len(a)
    elif not paired_runs and len(a) > 1 and len(b) > 1:
        seed_var = float(np.var(values_a, ddof=1)) / len(a) + float(np.var(values_b, ddof=1)) / len(b)
    combined = None
    if seed_var is not None:
        half = bootstrap.z * math.sqrt(float(np.nanvar(resampled, ddof=1)) + seed_var)
        combined = Interval(estimate, estimate - half, estimate + half, "images + seeds")
    return Difference(estimate, images, combined, paired_runs, len(a), len(b), len(names))


def verdict(paper_difference: float, ours: float, interval: Optional[Interval]) -> str:
    """One of VERDICTS for the paper's claim sign(paper_difference) (nonzero); without an interval
    (no per-image record) "agrees (no interval)" or "disagrees (no interval)"."""
    sign = _sign(paper_difference)
    if sign == 0:
        raise ValueError("the paper makes no ordering claim for a tie")
    same = _sign(ours) == sign
    if interval is None:
        return f"{'agrees' if same else 'disagrees'} (no interval)"
    excludes = not interval.contains(0.0)
    if same:
        return AGREES_SIGNIFICANT if excludes else AGREES_WITHIN_NOISE
    return DISAGREES_SIGNIFICANT if excludes and _sign(ours) == -sign else DISAGREES


def seed_summary(values: Sequence[float]) -> tuple[Optional[float], Optional[float], int]:
    """(mean, sample std (ddof 1, None with one value), n)."""
    values = list(values)
    if not values:
        return None, None, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


__all__ = ["AGREES_SIGNIFICANT", "AGREES_WITHIN_NOISE", "Bootstrap", "CellStats", "DISAGREES",
           "DISAGREES_SIGNIFICANT", "Difference", "Interval", "VERDICTS", "cell_stats", "common_names", "difference",
           "miou_from_counts", "miou_rows", "seed_summary", "verdict"]
