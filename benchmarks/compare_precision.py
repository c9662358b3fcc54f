"""The same checkpoints measured twice, e.g. in fp32 and in bf16 (evaluation.dtype): is every figure within its
error bar? compare_runs.py asks for equal figures; a change of arithmetic cannot give them, so this asks how far.

    python benchmarks/compare_precision.py runs/fp32 runs/bf16

Per variant present and ok in both runs, with each run's measured dtype (the record's `measured_dtype`):
- perplexity: both values and the relative gap (it has no stderr: the windows are fixed);
- KL to each run's own baseline: both values, the gap in units of the larger stderr;
- each task: both scores, the gap in units of the larger stderr (the figure's own error bar), and how many of its
  documents were scored alike (the per-item scores in eval/<variant>.json), then the mean task score;
- stage seconds side by side (perplexity, tasks, throughput, speed ratio): timed, printed, not judged.
The last line says WITHIN (every task and KL gap at most one stderr) or OUTSIDE, with the largest gap.
"""
import json
import sys
from pathlib import Path


def records(run: Path) -> dict:
    return {r["name"]: r for r in json.loads((run / "results.json").read_text())["variants"] if r["status"] == "ok"}


def items(run: Path, name: str, task: str) -> list | None:
    try:
        return json.loads((run / "eval" / f"{name}.json").read_text())["tasks"][task].get("items")
    except (OSError, KeyError, ValueError):
        return None


def dtypes(record: dict) -> str:
    """What the row was measured in: one dtype, or perplexity's / the tasks' (fp32 before measured_dtype existed)."""
    m = record.get("measured_dtype") or {}
    if "dtype" in m:
        return m["dtype"]
    return f"{m.get('perplexity') or 'float32'}, tasks {m.get('tasks') or 'float32'}"


def gap_in_se(a: dict, b: dict) -> float | None:
    se = max(a.get("stderr") or 0, b.get("stderr") or 0)
    return abs(b["value"] - a["value"]) / se if se else None


def main(old: Path, new: Path) -> int:
    ra, rb = records(old), records(new)
    worst, lines = 0.0, []
    stages = ("perplexity", "tasks", "throughput", "speed_ratio")
    print(f"A = {old}\nB = {new}\n")
    print("| variant | dtype A / B | perplexity A / B (gap) | KL A / B (gap in se) | tasks: largest gap in se, "
          "items alike | mean task A / B | " + " | ".join(f"{s} s A / B" for s in stages) + " |")
    print("|---" * (6 + len(stages)) + "|")
    for name, a in ra.items():
        b = rb.get(name)
        if b is None:
            continue
        dt = f"{dtypes(a)} / {dtypes(b)}"
        pa, pb = (a.get("perplexity") or {}).get("value"), (b.get("perplexity") or {}).get("value")
        ppl = f"{pa:.3f} / {pb:.3f} ({100 * (pb - pa) / pa:+.2f}%)" if pa and pb else "-"
        ka, kb = a.get("kl") or {}, b.get("kl") or {}
        kl = "-"
        if ka.get("mean") and kb.get("mean"):
            g = gap_in_se({"value": ka["mean"], "stderr": ka.get("stderr")},
                          {"value": kb["mean"], "stderr": kb.get("stderr")})
            worst = max(worst, g or 0)
            kl = f"{ka['mean']:.4f} / {kb['mean']:.4f} ({g:.2f})"
        ta, tb = a.get("tasks") or {}, b.get("tasks") or {}
        gaps, alike, total = {}, 0, 0
        for t in ta:
            if t not in tb:
                continue
            gaps[t] = gap_in_se(ta[t], tb[t]) or 0.0
            ia, ib = items(old, name, t), items(new, name, t)
            if ia and ib and len(ia) == len(ib):
                alike += sum(x == y for x, y in zip(ia, ib))
                total += len(ia)
            lines.append(f"  {name} {t}: {ta[t]['value']:.4f} / {tb[t]['value']:.4f} ± {ta[t].get('stderr') or 0:.4f} "
                         f"(gap {gaps[t]:.2f} se)")
        top = max(gaps, key=gaps.get) if gaps else None
        if top:
            worst = max(worst, gaps[top])
        mean = "-"
        if gaps:
            mean_a, mean_b = (sum(r[t]["value"] for t in gaps) / len(gaps) for r in (ta, tb))
            mean = f"{mean_a:.4f} / {mean_b:.4f}"
        task_cell = f"{gaps[top]:.2f} ({top}), {alike}/{total}" if top else "-"
        sa, sb = a.get("stage_seconds") or {}, b.get("stage_seconds") or {}
        secs = " | ".join(f"{sa.get(s, '-')} / {sb.get(s, '-')}" for s in stages)
        print(f"| {name} | {dt} | {ppl} | {kl} | {task_cell} | {mean} | {secs} |")
    print("\nper task (A / B ± A's stderr):")
    print("\n".join(lines))
    print(f"\n{'WITHIN' if worst <= 1.0 else 'OUTSIDE'}: largest gap {worst:.2f} stderr")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
