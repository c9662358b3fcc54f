"""The paired bootstrap on synthetic data with known answers."""

import numpy as np
import pytest

from eval.recovery import recovery


def test_identical_items_recover_exactly_100_with_zero_width():
    items = list(np.random.default_rng(1).integers(0, 2, 500).astype(float))
    r = recovery({"t": items}, {"t": items})
    assert r["t"]["pct"] == 100.0 and r["t"]["ci95"] == [100.0, 100.0]
    assert r["average"]["pct"] == 100.0


def test_known_recovery_and_ci_width():
    n = 10_000
    base = np.ones(n)
    variant = np.ones(n)
    variant[: n // 10] = 0  # 90% of the baseline's score, exactly
    r = recovery({"t": list(base)}, {"t": list(variant)})
    assert r["t"]["pct"] == pytest.approx(90.0)
    lo, hi = r["t"]["ci95"]
    expected_half_width = 1.96 * np.sqrt(0.9 * 0.1 / n) * 100  # binomial: 0.59 points
    assert lo < 90 < hi
    assert (hi - lo) / 2 == pytest.approx(expected_half_width, rel=0.15)


def test_pairing_narrows_the_interval():
    """A variant that flips 2% of a noisy baseline's items: the paired CI is much narrower than the scores' own
    spread, because the shared hard items cancel."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 2000).astype(float)
    variant = base.copy()
    flip = rng.choice(2000, 40, replace=False)
    variant[flip] = 1 - variant[flip]
    r = recovery({"t": list(base)}, {"t": list(variant)})
    lo, hi = r["t"]["ci95"]
    unpaired_half_width = 1.96 * np.sqrt(2 * 0.25 / 2000) / base.mean() * 100
    assert (hi - lo) / 2 < unpaired_half_width / 3


def test_average_across_tasks():
    a = [1.0] * 100
    r = recovery({"x": a, "y": a}, {"x": a, "y": [1.0] * 80 + [0.0] * 20})
    assert r["average"]["pct"] == pytest.approx(90.0)
    assert r["average"]["ci95"][0] < 90 < r["average"]["ci95"][1]


def test_mismatched_items_are_skipped():
    assert recovery({"t": [1.0, 0.0]}, {"t": [1.0]}) == {}
