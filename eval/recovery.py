"""Recovery: a variant's score as % of the baseline's, with a 95% CI from a paired bootstrap.

Every variant is scored on the same documents, so the uncertainty that matters is in the *difference*, not in each
score alone: two variants that both miss the same hard items should not look uncertain relative to each other. The
paired bootstrap resamples documents (the same indices for baseline and variant) and recomputes the ratio of mean
scores; the 2.5th and 97.5th percentiles of the replicates are the CI. The average recovery across tasks resamples
every task in each replicate and averages the per-task ratios, so its CI carries every task's uncertainty.
"""

from __future__ import annotations

import warnings

import numpy as np


def _replicates(base: np.ndarray, variant: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.integers(0, len(base), size=(n_boot, len(base)))
    b, v = base[idx].mean(axis=1), variant[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, 100.0 * v / b, np.nan)


def _ci95(replicates: np.ndarray) -> list[float] | None:
    """2.5th and 97.5th percentiles; None when no replicate is defined (every resample had a zero baseline)."""
    if np.isnan(replicates).all():
        return None
    return [float(np.nanpercentile(replicates, 2.5)), float(np.nanpercentile(replicates, 97.5))]


def recovery(tasks_base: dict[str, list[float]], tasks_variant: dict[str, list[float]], n_boot: int = 2000,
             seed: int = 0) -> dict:
    """{task: {"pct", "ci95"}, "average": {"pct", "ci95"}} over tasks present in both, with equal item counts."""
    rng = np.random.default_rng(seed)
    out, reps = {}, []
    for task in tasks_base:
        base, variant = np.asarray(tasks_base[task], float), np.asarray(tasks_variant.get(task, []), float)
        if len(base) == 0 or len(base) != len(variant) or base.mean() == 0:
            continue
        r = _replicates(base, variant, n_boot, rng)
        reps.append(r)
        out[task] = {"pct": float(100.0 * variant.mean() / base.mean()), "ci95": _ci95(r)}
    if reps:
        with warnings.catch_warnings():  # a replicate whose every task resampled a zero baseline stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            avg = np.nanmean(np.stack(reps), axis=0)
        out["average"] = {"pct": float(np.mean([v["pct"] for v in out.values()])),
                          "ci95": _ci95(avg)}
    return out
