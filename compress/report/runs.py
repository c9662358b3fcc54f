"""Loading runs: one run's results.json, or several runs merged into one results dict for one table.

This is the first step of the report and the only one that reads files; everything after it works on the dict.
"""

from __future__ import annotations

from pathlib import Path

from compress.options import InputError
from compress.record import RESULTS, read_results


def load_results(run_dir: Path) -> dict:
    """One run's results.json, read through its schema (compress/record.py: migrated by its format number), as the
    dict the report works on. Raises InputError naming the file when it is missing, not JSON or not a results
    file of a format this version reads."""
    return read_results(Path(run_dir) / RESULTS).dump()


def merge_runs(run_dirs: list[Path]) -> dict:
    """Several runs as one results dict, so variants from different recipes sit in one table.

    Each record gets a "run" key (its run directory): compression ratio is computed against the baseline of the
    same run, and KL and recovery were measured against that baseline too. A name that occurs in more than one run
    (every run has a "baseline") is prefixed with its run directory's name, "lab-a/baseline"; names that are
    unique stay as they are. The top-level fields are the first run's, and "runs" keeps every run's own
    provenance (recipe, model, environment, bandwidth, evaluation) for the "Where the figures come from" section.
    """
    runs = [(Path(d), load_results(Path(d))) for d in run_dirs]
    if not runs:
        raise InputError("no run directories given")
    labels = _run_labels([d for d, _ in runs])
    counts: dict[str, int] = {}
    for _, data in runs:
        for rec in data["variants"]:
            counts[rec.get("name", "?")] = counts.get(rec.get("name", "?"), 0) + 1
    variants = []
    for (run_dir, data), label in zip(runs, labels):
        for rec in data["variants"]:
            name = rec.get("name", "?")
            variants.append({**rec, "name": f"{label}/{name}" if counts[name] > 1 else name, "run": str(run_dir)})
    first = runs[0][1]
    merged = {k: v for k, v in first.items() if k != "variants"}
    merged["variants"] = variants
    merged["runs"] = [{"dir": str(d), "label": label, **{k: v for k, v in data.items() if k != "variants"}}
                      for (d, data), label in zip(runs, labels)]
    return merged


def _run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run directory's name, numbered when two runs share a name (runs/a/out and runs/b/out)."""
    names = [d.resolve().name or str(d) for d in run_dirs]
    seen: dict[str, int] = {}
    labels = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        labels.append(n if names.count(n) == 1 else f"{n}#{seen[n]}")
    return labels
