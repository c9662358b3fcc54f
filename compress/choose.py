"""Choosing one format per unit (a layer, or a group of layers vLLM serves together) under a size or damage target.

The problem is the multiple-choice knapsack: unit i takes exactly one option j, which costs `sizes[i, j]` bytes
and does `costs[i, j]` damage (a sensitivity: the KL to the baseline with that unit alone quantized that way).
Damage is taken as additive over units, the assumption every per-layer search makes (ModelOpt's auto_quantize,
AutoRound's AutoScheme, HAWQ); the chosen checkpoint is then measured, so the assumption is checked, not trusted.

Why not a greedy pass (give the bytes to the unit with the best damage saved per byte)? It is optimal for the
fractional problem only: with unequal steps it can stop at a point an exact solver beats by a wide margin (tests
show one). The exact problem is NP-hard in general but easy here: sizes are bytes, so a dynamic programme over a
grid of sizes is exact up to the grid step. Each unit's size is rounded *up* to the grid, so any choice the grid
accepts fits the real budget too; and any real choice that fits `capacity - gap_bytes` is representable on the
grid, so the answer is at least as good as the true optimum of a budget `gap_bytes` smaller (gap_bytes = units x
step, under a thousandth of the range with the default grid). One pass computes the optimum for every budget at
once: the whole size-damage frontier, from which each target is a lookup.

Options a unit cannot take (a group size that does not divide its width) have an infinite size or cost and are
never chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GRID_STEPS = 1 << 17  # grid points over the range of sizes; time and memory are units x options x GRID_STEPS


@dataclass(frozen=True)
class Frontier:
    """The optimum of every budget, from one dynamic programme. Sizes in bytes, costs in the sensitivities' unit."""

    sizes: np.ndarray  # (units, options), inf where not allowed
    costs: np.ndarray  # (units, options), inf where not allowed
    base_bytes: float  # every unit at its smallest allowed option
    step_bytes: float  # the grid step; 0 when every unit has one size
    best: np.ndarray  # (grid + 1,) least total cost with the extra size over base_bytes at most g steps
    choice: np.ndarray  # (units, grid + 1) the option unit i takes in the optimum of the first i + 1 units at g
    steps: np.ndarray  # (units, options) each option's extra size in grid steps (rounded up)

    @property
    def gap_bytes(self) -> float:
        """How far from exact: a pick for budget B is at least as good as any choice of size <= B - gap_bytes."""
        return self.step_bytes * len(self.sizes)

    @property
    def min_bytes(self) -> float:
        return self.base_bytes

    @property
    def max_bytes(self) -> float:
        """The size of the least-damage choice (every unit at its least-cost option, the smallest such)."""
        return self.size_of(self.picks(math.inf))

    @property
    def min_cost(self) -> float:
        return float(self.best[-1])

    def size_of(self, picks) -> float:
        return float(sum(self.sizes[i, j] for i, j in enumerate(picks)))

    def cost_of(self, picks) -> float:
        return float(sum(self.costs[i, j] for i, j in enumerate(picks)))

    def _grid(self, capacity_bytes: float) -> int:
        last = len(self.best) - 1
        if capacity_bytes == math.inf or self.step_bytes == 0:
            return last
        return min(last, int(math.floor((capacity_bytes - self.base_bytes) / self.step_bytes + 1e-9)))

    def _walk(self, g: int) -> tuple[int, ...]:
        picks = []
        for i in range(len(self.sizes) - 1, -1, -1):
            j = int(self.choice[i, g])
            picks.append(j)
            g -= int(self.steps[i, j])
        return tuple(reversed(picks))

    def picks(self, capacity_bytes: float) -> tuple[int, ...] | None:
        """The least-damage option per unit within `capacity_bytes` (None: below the smallest choice)."""
        if capacity_bytes < self.base_bytes:
            return None
        return self._walk(self._grid(capacity_bytes))

    def smallest_within(self, max_cost: float) -> tuple[int, ...] | None:
        """The smallest choice whose summed damage is at most `max_cost` (None: no choice is that good)."""
        ok = np.flatnonzero(self.best <= max_cost)
        return None if ok.size == 0 else self._walk(int(ok[0]))

    def points(self) -> list[tuple[float, float]]:
        """The frontier as (size_bytes, cost) pairs: every grid budget where the optimum changes, real sizes."""
        changes = np.flatnonzero(np.r_[True, self.best[1:] < self.best[:-1]])
        out = []
        for g in changes:
            p = self._walk(int(g))
            out.append((self.size_of(p), self.cost_of(p)))
        return out


def solve(sizes, costs, grid_steps: int = GRID_STEPS) -> Frontier:
    """The frontier of the multiple-choice knapsack `sizes` x `costs` (units x options, inf = not allowed)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    if sizes.ndim != 2 or sizes.shape != costs.shape or sizes.shape[0] == 0:
        raise ValueError(f"sizes and costs must be the same (units, options) table, got {sizes.shape} and "
                         f"{costs.shape}")
    allowed = np.isfinite(sizes) & np.isfinite(costs)
    if not allowed.any(axis=1).all():
        raise ValueError(f"units {np.flatnonzero(~allowed.any(axis=1)).tolist()} have no allowed option")
    if (sizes[allowed] < 0).any() or (costs[allowed] < 0).any():
        raise ValueError("sizes and costs must not be negative")
    sizes = np.where(allowed, sizes, np.inf)
    costs = np.where(allowed, costs, np.inf)
    low = sizes.min(axis=1)
    extra = sizes - low[:, None]
    span = float(np.where(allowed, extra, 0).max(axis=1).sum())
    step = span / grid_steps if span > 0 else 0.0
    with np.errstate(invalid="ignore"):
        steps = np.where(allowed, np.ceil(extra / step - 1e-9) if step else 0, 0).astype(np.int64)
    grid = int(steps.max(axis=1).sum())  # rounding up may add up to one step per unit beyond grid_steps

    units, options = sizes.shape
    best = np.zeros(grid + 1)
    choice = np.zeros((units, grid + 1), dtype=np.int8 if options < 128 else np.int16)
    for i in range(units):
        new = np.full(grid + 1, np.inf)
        pick = np.zeros(grid + 1, dtype=choice.dtype)
        for j in range(options):
            w = int(steps[i, j])
            if not allowed[i, j]:
                continue
            cand = np.full(grid + 1, np.inf)
            cand[w:] = best[:grid + 1 - w] + costs[i, j]
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        best, choice[i] = new, pick
    return Frontier(sizes, costs, float(low.sum()), step, best, choice, steps)
