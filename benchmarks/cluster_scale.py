"""What a sweep would take on N workers, from the per-task times a cluster run measured (scale on paper).

    python benchmarks/cluster_scale.py runs/smollm2-135m-lab-ray [--workers 1 2 4 7 8] [--variants 20]
        [--scale 59.5]

Reads results.json of a `compress run --cluster` run: each variant's `cluster.build.seconds` and
`cluster.measure.seconds` (the task's wall time on its worker). Then it schedules the same task graph on N identical
workers, as Ray would (a task starts when its inputs exist and a worker is free, in the order compress submits
them): build(v) -> measure(v), and every measure(v) after measure(baseline), the KL reference. `--variants K`
repeats the run's non-baseline variants (their measured times, in order) up to K variants plus the baseline;
`--scale F` multiplies every time by F (e.g. a model F times larger, where a task's work grows with the
parameters: calibration forwards, GPTQ's per-layer solves, lm-eval's forwards). Prints one table row per N and
JSON last. This is arithmetic on measured figures, not a measurement: a shared filesystem, a slower node or a
memory limit would add to it.
"""

from __future__ import annotations

import argparse
import heapq
import json
from pathlib import Path


def tasks_from_run(run: Path) -> tuple[str, list[tuple[str, float, float]]]:
    """(baseline name, [(variant, build_s, measure_s)]) in recipe order, from a cluster run's results.json."""
    records = json.loads((run / "results.json").read_text())["variants"]
    rows = []
    for r in records:
        c = r.get("cluster") or {}
        if "build" not in c or "measure" not in c:
            raise SystemExit(f"{run}: {r['name']} has no cluster build/measure times (was it cached, or a serial "
                             f"run?); use a fresh `compress run --cluster` run")
        rows.append((r["name"], c["build"]["seconds"], c["measure"]["seconds"]))
    base = next(r["name"] for r in records if r["method"] == "baseline")
    return base, rows


def makespan(base: str, rows: list[tuple[str, float, float]], workers: int) -> float:
    """Seconds until the last measurement ends, list-scheduling the task graph on `workers` workers."""
    durations = {}
    deps: dict[tuple, list[tuple]] = {}
    for name, b, m in rows:
        durations[("build", name)] = b
        durations[("measure", name)] = m
    # compress/cluster.py's submission order: the baseline's build and measurement (every other measurement waits
    # for it), then the other builds, then their measurements
    order = [("build", base), ("measure", base)] + [("build", n) for n, _, _ in rows if n != base] + \
        [("measure", n) for n, _, _ in rows if n != base]
    for name, _, _ in rows:
        deps[("build", name)] = []
        deps[("measure", name)] = [("build", name)] + ([] if name == base else [("measure", base)])
    done_at: dict[tuple, float] = {}
    free = [0.0] * workers  # when each worker is next free
    heapq.heapify(free)
    pending = list(order)
    now = 0.0
    running: list[tuple[float, tuple]] = []
    while pending or running:
        ready = [t for t in pending if all(d in done_at and done_at[d] <= now for d in deps[t])]
        while ready and free and free[0] <= now:
            task = ready.pop(0)
            pending.remove(task)
            heapq.heappop(free)
            end = now + durations[task]
            heapq.heappush(running, (end, task))
        if not running:
            now = free[0]
            continue
        end, task = heapq.heappop(running)
        now = end
        done_at[task] = end
        heapq.heappush(free, end)
    return max(done_at.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--variants", type=int, default=None, help="non-baseline variants to extrapolate to")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every task time by this")
    args = ap.parse_args()
    base, rows = tasks_from_run(args.run)
    others = [r for r in rows if r[0] != base]
    if args.variants:
        others = [(f"{others[i % len(others)][0]}#{i}", *others[i % len(others)][1:]) for i in range(args.variants)]
    rows = [next(r for r in rows if r[0] == base)] + others
    rows = [(n, b * args.scale, m * args.scale) for n, b, m in rows]
    work = sum(b + m for _, b, m in rows)
    out = {"run": str(args.run), "variants": len(rows), "scale": args.scale, "task_seconds_total": round(work),
           "critical_path_seconds": round(makespan(base, rows, 10 ** 6)), "workers": {}}
    print(f"{len(rows)} variants (baseline + {len(rows) - 1}), task times x{args.scale:g}: "
          f"{work / 3600:.2f} h of tasks, critical path {out['critical_path_seconds'] / 3600:.2f} h")
    for n in args.workers:
        span = makespan(base, rows, n)
        out["workers"][n] = {"makespan_seconds": round(span), "speedup_vs_1": round(makespan(base, rows, 1) / span, 2)}
        print(f"  {n:3d} worker(s): {span / 3600:6.2f} h  ({out['workers'][n]['speedup_vs_1']:.2f}x one worker)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
