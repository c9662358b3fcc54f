"""The speed figures of two runs of one recipe side by side: does the verdict survive a busy machine?

    python benchmarks/compare_speed.py RUN_A RUN_B        (run directories, or copies holding their results.json)

Per variant: batch-1 tok/s of each run (its own process, median; "!" = timed under contention after its retries),
and the ratio to the baseline of each run (interleaved rounds, median [95% interval], "!" = contended), whether
the two intervals overlap, and the verdict of each. Absolute tok/s are expected to differ between a quiet and a busy
run; the ratios are what must agree. A table, then JSON last.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(run: Path) -> dict[str, dict]:
    out = {}
    for r in json.loads((run / "results.json").read_text())["variants"]:
        b1 = ((r.get("throughput") or {}).get("batches") or {}).get("1") or {}
        sr = r.get("speed_ratio") or {}
        out[r["name"]] = {
            "tok_per_sec": b1.get("tok_per_sec"),
            "tok_contended": bool((b1.get("contention") or {}).get("contended")),
            "tok_max_others_cpu_share": (b1.get("contention") or {}).get("max_others_cpu_share"),
            "ratio": sr.get("ratio"), "lo": sr.get("ratio_lo"), "hi": sr.get("ratio_hi"),
            "verdict": sr.get("verdict") or ("reference" if r.get("method") == "baseline" else None),
            "ratio_contended": bool((sr.get("contention") or {}).get("contended")),
            "rounds": sr.get("rounds"), "rounds_run": sr.get("rounds_run"),
            "ratio_max_others_cpu_share": (sr.get("contention") or {}).get("max_others_cpu_share")}
    return out


def _tok(r: dict) -> str:
    return "—" if r["tok_per_sec"] is None else f"{r['tok_per_sec']:.1f}{'!' if r['tok_contended'] else ''}"


def _ratio(r: dict) -> str:
    if r["ratio"] is None:
        return "1 (reference)" if r["verdict"] == "reference" else "—"
    return f"{r['ratio']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]{'!' if r['ratio_contended'] else ''}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = (_rows(Path(p)) for p in argv)
    names = [n for n in a if n in b]
    print(f"A = {argv[0]}, B = {argv[1]}; '!' = timed under contention (after retries)")
    print(f"{'variant':<16}{'tok/s A':>9}{'tok/s B':>9}  {'x baseline A':<26}{'x baseline B':<26}{'overlap':<9}verdict A / B")
    out = []
    for n in names:
        ra, rb = a[n], b[n]
        overlap = None
        if ra["lo"] is not None and rb["lo"] is not None:
            overlap = ra["lo"] <= rb["hi"] and rb["lo"] <= ra["hi"]
        print(f"{n:<16}{_tok(ra):>9}{_tok(rb):>9}  {_ratio(ra):<26}{_ratio(rb):<26}"
              f"{'—' if overlap is None else 'yes' if overlap else 'NO':<9}{ra['verdict']} / {rb['verdict']}")
        out.append({"variant": n, "a": ra, "b": rb, "intervals_overlap": overlap})
    measured = [r["intervals_overlap"] for r in out if r["intervals_overlap"] is not None]
    print(json.dumps({"runs": argv, "rows": out, "all_intervals_overlap": all(measured) if measured else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
