"""The multiple-choice knapsack solver against brute force on small tables, and the targets read off its frontier."""

import itertools
import math

import numpy as np
import pytest

from compress.choose import solve


def brute(sizes, costs, capacity):
    """The exact optimum by enumeration: (cost, size) of the least-cost choice within capacity, or None."""
    best = None
    for picks in itertools.product(*(range(len(r)) for r in sizes)):
        s = sum(sizes[i][j] for i, j in enumerate(picks))
        c = sum(costs[i][j] for i, j in enumerate(picks))
        if math.isfinite(s) and math.isfinite(c) and s <= capacity and (best is None or c < best[0]):
            best = (c, s)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_within_the_gap(seed):
    rng = np.random.default_rng(seed)
    units, options = rng.integers(2, 6), rng.integers(2, 4)
    sizes = rng.integers(100, 10_000, (units, options)).astype(float)
    costs = rng.random((units, options))
    f = solve(sizes, costs, grid_steps=4096)
    lo, hi = sizes.min(1).sum(), sizes.max(1).sum()
    for capacity in np.linspace(lo, hi, 9):
        picks = f.picks(capacity)
        assert picks is not None and f.size_of(picks) <= capacity + 1e-6  # feasible with the real sizes
        exact = brute(sizes, costs, capacity)
        looser = brute(sizes, costs, capacity - f.gap_bytes)
        assert f.cost_of(picks) >= exact[0] - 1e-12  # never better than exact: the bound is honest
        if looser is not None:  # and at least as good as the exact optimum of a budget gap_bytes smaller
            assert f.cost_of(picks) <= looser[0] + 1e-12


def test_exact_sizes_on_a_fine_grid_are_exact():
    sizes = [[1, 2, 4], [1, 3, 5], [2, 4, 8]]
    costs = [[0.9, 0.4, 0.0], [0.8, 0.1, 0.0], [0.5, 0.3, 0.0]]
    f = solve(sizes, costs, grid_steps=13)  # span 3 + 4 + 6 bytes: one step per byte
    assert f.gap_bytes == pytest.approx(3.0) and f.step_bytes == pytest.approx(1.0)
    for capacity in range(4, 18):
        assert f.cost_of(f.picks(capacity)) == pytest.approx(brute(sizes, costs, capacity)[0])


def test_beats_damage_per_byte_greedy():
    """Greedy upgrades the unit that saves most damage per byte first; here that is unit 0's small step, after which
    unit 1's big step no longer fits. The exact solver spends the budget on unit 1 alone."""
    sizes = [[0, 1], [0, 10]]
    costs = [[1.0, 0.0], [10.0, 0.5]]
    f = solve(sizes, costs, grid_steps=11)
    assert f.picks(10) == (0, 1) and f.cost_of(f.picks(10)) == pytest.approx(1.5)
    greedy_cost = 0.0 + 10.0  # unit 0 upgraded (1 byte, saves 1.0/byte), then 10 bytes no longer fit in 10
    assert f.cost_of(f.picks(10)) < greedy_cost


def test_targets_and_limits():
    sizes = [[4, 8, 16], [4, 8, 16]]
    costs = [[0.5, 0.1, 0.0], [0.3, 0.2, 0.0]]
    f = solve(sizes, costs, grid_steps=24)
    assert f.min_bytes == 8 and f.max_bytes == 32 and f.min_cost == 0.0
    assert f.picks(7.9) is None  # below the smallest choice
    assert f.picks(math.inf) == (2, 2)
    assert f.picks(12) == (1, 0)  # 0.1 + 0.3 beats 0.5 + 0.2
    assert f.smallest_within(0.4) == (1, 0)
    assert f.smallest_within(0.2) in {(2, 1), (1, 2)} and f.size_of(f.smallest_within(0.2)) == 24
    assert f.smallest_within(-1) is None  # no choice that good
    points = f.points()
    assert points[0] == (8.0, 0.8) and points[-1] == (32.0, 0.0)
    assert all(a[0] < b[0] and a[1] > b[1] for a, b in zip(points, points[1:]))  # strictly better as it grows


def test_disallowed_options_are_never_chosen():
    inf = math.inf
    sizes = [[1, 2, inf], [1, 2, 3]]
    costs = [[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]]
    f = solve(sizes, costs, grid_steps=64)
    assert f.picks(math.inf) == (1, 2) and f.max_bytes == 5


def test_one_size_per_unit():
    f = solve([[3, 3], [5, 5]], [[0.2, 0.1], [0.0, 0.4]])
    assert f.step_bytes == 0 and f.picks(8) == (1, 0) and f.picks(7) is None


@pytest.mark.parametrize("sizes, costs, match", [
    ([[1, 2]], [[1, 2, 3]], "same"),
    ([1, 2], [1, 2], "same"),
    ([[math.inf, math.inf], [1, 2]], [[0, 0], [0, 0]], r"units \[0\]"),
    ([[-1, 2]], [[0, 0]], "negative"),
])
def test_bad_tables(sizes, costs, match):
    with pytest.raises(ValueError, match=match):
        solve(sizes, costs)


def test_lab_sized_table_is_fast_and_fine():
    """120 units (SmolLM2's 30 layers x 4 serving units) x 4 formats at the default grid: the gap is a few
    kilobytes in a checkpoint of tens of megabytes."""
    rng = np.random.default_rng(0)
    sizes = np.sort(rng.integers(100_000, 2_000_000, (120, 4)), axis=1).astype(float)
    costs = np.sort(rng.random((120, 4)), axis=1)[:, ::-1].copy()
    f = solve(sizes, costs)
    span = sizes.max(1).sum() - sizes.min(1).sum()
    assert f.gap_bytes < 1e-3 * span
    picks = f.picks(sizes.min(1).sum() + span / 2)
    assert f.size_of(picks) <= sizes.min(1).sum() + span / 2
