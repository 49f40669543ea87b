"""Ablation statistics against values worked out by hand on small count arrays.

Two images, two classes. With N = 2 a bootstrap resample takes image 1 twice (probability 1/4), each
once (1/2) or image 2 twice (1/4); with >= 1,000 resamples each case holds far more than 2.5 % of them,
so the 95 % percentile interval is exactly [smallest case, largest case].
"""
import math
import time

import numpy as np
import pytest

from deeplab_lit.records import PerImageCounts
from deeplab_lit.report import stats

NAMES = ("img1", "img2")
# run X: image 1 I = [3, 1], U = [4, 2]; image 2 I = [1, 0], U = [2, 2]
X = PerImageCounts(NAMES, [[3, 1], [1, 0]], [[4, 2], [2, 2]])
# (2, 0): I [6, 2] U [8, 4] -> (6/8 + 2/4) / 2 = 0.625
# (1, 1): I [4, 1] U [6, 4] -> (4/6 + 1/4) / 2 = 0.458333...
# (0, 2): I [2, 0] U [4, 4] -> (2/4 + 0/4) / 2 = 0.25
X_CASES = {(2, 0): 0.625, (1, 1): (4 / 6 + 1 / 4) / 2, (0, 2): 0.25}
# run Y: image 1 I = [2, 1], U = [4, 2]; image 2 I = [0, 0], U = [2, 2]
Y = PerImageCounts(NAMES, [[2, 1], [0, 0]], [[4, 2], [2, 2]])
# (2, 0): I [4, 2] U [8, 4] -> 0.5;  (1, 1): I [2, 1] U [6, 4] -> (1/3 + 1/4) / 2;  (0, 2): 0
Y_CASES = {(2, 0): 0.5, (1, 1): (2 / 6 + 1 / 4) / 2, (0, 2): 0.0}


def exact_moments(cases):
    probability = {(2, 0): 0.25, (1, 1): 0.5, (0, 2): 0.25}
    mean = sum(probability[k] * v for k, v in cases.items())
    variance = sum(probability[k] * (v - mean) ** 2 for k, v in cases.items())
    return mean, variance


def test_miou_of_summed_counts_leaves_out_classes_without_union():
    assert X.miou == pytest.approx(X_CASES[(1, 1)])
    rows = stats.miou_rows(np.array([[6, 2], [2, 0], [0, 0]]), np.array([[8, 4], [4, 0], [0, 0]]))
    assert rows[0] == 0.625 and rows[1] == 0.5 and math.isnan(rows[2])  # class 2 absent: mean of class 1 only


def test_one_run_interval_is_the_percentile_interval_of_the_resamples():
    bootstrap = stats.Bootstrap(resamples=4000, seed=0)
    interval = bootstrap.interval(X)
    assert interval.estimate == X.miou
    assert (interval.low, interval.high) == (0.25, 0.625)
    values = bootstrap.values(X)
    assert set(np.round(values, 12)) == {round(v, 12) for v in X_CASES.values()}
    mean, variance = exact_moments(X_CASES)
    assert values.mean() == pytest.approx(mean, abs=0.01) and values.var() == pytest.approx(variance, abs=0.002)


def test_resamples_are_seeded_and_reproducible():
    rng = np.random.default_rng(3)
    counts = PerImageCounts(tuple(f"i{k}" for k in range(50)), rng.integers(0, 50, (50, 4)),
                            rng.integers(50, 100, (50, 4)))
    first = stats.Bootstrap(1000, seed=7).interval(counts)
    assert stats.Bootstrap(1000, seed=7).interval(counts) == first
    assert stats.Bootstrap(1000, seed=8).interval(counts) != first
    with pytest.raises(ValueError, match="at least 1,000"):
        stats.Bootstrap(resamples=999)


def test_paired_difference_uses_the_same_resampled_images():
    bootstrap = stats.Bootstrap(resamples=4000, seed=1)
    result = stats.difference(bootstrap, [X], [Y])
    # per case: X - Y = 0.125, (4/6 + 1/4 - 2/6 - 1/4) / 2 = 1/6, 0.25
    assert result.estimate == pytest.approx(1 / 6)
    assert (result.images.low, result.images.high) == (pytest.approx(0.125), pytest.approx(0.25))
    assert result.combined is None and result.interval is result.images  # one seed each: images only
    assert stats.verdict(+1.0, result.estimate, result.interval) == stats.AGREES_SIGNIFICANT
    assert stats.verdict(-1.0, result.estimate, result.interval) == stats.DISAGREES_SIGNIFICANT


def test_identical_runs_give_a_difference_interval_containing_zero():
    bootstrap = stats.Bootstrap(resamples=1000, seed=0)
    twin = PerImageCounts(NAMES, X.intersection.copy(), X.union.copy())
    result = stats.difference(bootstrap, [X], [twin])
    assert result.estimate == 0.0 and (result.images.low, result.images.high) == (0.0, 0.0)
    assert result.interval.contains(0.0)
    assert stats.verdict(+0.5, result.estimate, result.interval) == stats.DISAGREES  # the paper's gap is not there


def test_verdicts():
    inside, above, below = stats.Interval(0.1, -0.2, 0.4, "images"), stats.Interval(0.3, 0.1, 0.5, "images"), \
        stats.Interval(-0.3, -0.5, -0.1, "images")
    assert stats.verdict(1.2, 0.1, inside) == "agrees within noise"
    assert stats.verdict(1.2, 0.3, above) == "agrees, significant"
    assert stats.verdict(-1.2, 0.1, inside) == "disagrees"
    assert stats.verdict(-1.2, 0.3, above) == "disagrees, significant"
    assert stats.verdict(-1.2, -0.3, below) == "agrees, significant"
    assert stats.verdict(1.0, 0.2, None) == "agrees (no interval)"
    with pytest.raises(ValueError):
        stats.verdict(0.0, 0.1, inside)


def test_seeds_mean_std_n_and_the_combined_spread():
    bootstrap = stats.Bootstrap(resamples=4000, seed=2)
    # two seeds with identical counts: no seed spread, the image spread alone
    twin = PerImageCounts(NAMES, X.intersection.copy(), X.union.copy())
    cell = stats.cell_stats(bootstrap, [X, twin])
    _, variance = exact_moments(X_CASES)
    assert (cell.mean, cell.seed_std, cell.n, cell.images) == (X.miou, 0.0, 2, 2)
    assert cell.image_std == pytest.approx(math.sqrt(variance), rel=0.03)
    assert cell.spread == pytest.approx(cell.image_std)
    half = 1.959963984540054 * math.sqrt(0.0 / 2 + np.var(bootstrap.values(X), ddof=1))
    assert cell.interval.method == "images + seeds"
    assert (cell.interval.low, cell.interval.high) == (pytest.approx(X.miou - half), pytest.approx(X.miou + half))

    # seeds X and Y: mean, std over seeds, spread = sqrt(s^2 + mean of the two bootstrap variances)
    cell = stats.cell_stats(bootstrap, [X, Y])
    m_x, m_y = X_CASES[(1, 1)], Y_CASES[(1, 1)]
    assert cell.mean == pytest.approx((m_x + m_y) / 2) and cell.seed_std == pytest.approx(abs(m_x - m_y) / math.sqrt(2))
    image_var = (np.var(bootstrap.values(X), ddof=1) + np.var(bootstrap.values(Y), ddof=1)) / 2
    assert cell.spread == pytest.approx(math.sqrt(cell.seed_std ** 2 + image_var))
    mean_b = (bootstrap.values(X) + bootstrap.values(Y)) / 2
    half = 1.959963984540054 * math.sqrt(cell.seed_std ** 2 / 2 + np.var(mean_b, ddof=1))
    assert cell.interval.high - cell.interval.low == pytest.approx(2 * half)

    # one seed: the percentile interval
    single = stats.cell_stats(bootstrap, [X])
    assert single.seed_std is None and single.spread is None and single.interval.method == "images"
    assert (single.interval.low, single.interval.high) == (0.25, 0.625)
    assert stats.seed_summary([0.5, 0.7]) == (pytest.approx(0.6), pytest.approx(0.2 / math.sqrt(2)), 2)
    assert stats.seed_summary([0.5]) == (0.5, None, 1)


def test_difference_across_seeds_adds_the_seed_variance():
    bootstrap = stats.Bootstrap(resamples=2000, seed=4)
    x2 = PerImageCounts(NAMES, X.intersection.copy(), X.union.copy())
    y2 = PerImageCounts(NAMES, [[3, 1], [0, 0]], [[4, 2], [2, 2]])  # a second seed of Y: 0.375 on both images
    result = stats.difference(bootstrap, [X, x2], [Y, y2])
    values_b = [Y.miou, y2.miou]
    seed_var = 0 / 2 + np.var(values_b, ddof=1) / 2
    resampled = (bootstrap.values(X) + bootstrap.values(x2)) / 2 - (bootstrap.values(Y) + bootstrap.values(y2)) / 2
    half = 1.959963984540054 * math.sqrt(np.var(resampled, ddof=1) + seed_var)
    assert result.estimate == pytest.approx(X.miou - np.mean(values_b))
    assert result.combined.high - result.combined.low == pytest.approx(2 * half)
    assert result.interval is result.combined
    # the same runs under two protocols: the seed variance of the per-run differences
    paired = stats.difference(bootstrap, [X, Y], [x2, y2], paired_runs=True)
    d = np.array([X.miou - x2.miou, Y.miou - y2.miou])
    resampled = (bootstrap.values(X) + bootstrap.values(Y)) / 2 - (bootstrap.values(x2) + bootstrap.values(y2)) / 2
    half = 1.959963984540054 * math.sqrt(np.var(resampled, ddof=1) + np.var(d, ddof=1) / 2)
    assert paired.combined.high - paired.combined.low == pytest.approx(2 * half)


def test_only_the_images_both_runs_cover_are_compared():
    shorter = X.subset(("img2",))
    result = stats.difference(stats.Bootstrap(1000), [X], [shorter])
    assert result.image_count == 1 and result.estimate == 0.0


def test_fast_enough_for_voc_val():
    rng = np.random.default_rng(0)
    names = tuple(f"{i:06d}" for i in range(1449))
    union = rng.integers(0, 5000, (1449, 21))
    runs = [PerImageCounts(names, rng.integers(0, 1, (1449, 21)) + union // 2, union) for _ in range(4)]
    started = time.perf_counter()
    bootstrap = stats.Bootstrap(resamples=2000, seed=0)
    for run in runs:
        bootstrap.interval(run)
    stats.difference(bootstrap, runs[:2], runs[2:])
    assert time.perf_counter() - started < 5.0
