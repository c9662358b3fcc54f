"""The formats table of one or more runs (issue 28's closing table): one row per variant, every figure from the
runs' results.json, the vLLM column from what vLLM did (the kernel it named, or its own sentence why not).

    python benchmarks/formats_table.py runs/smollm2-135m-formats                 # one run
    python benchmarks/formats_table.py runs/part1 runs/part2                     # a recipe run in parts

Columns: scheme (the record's label), stored bits per weight with scales (the format's table), weights on disk,
perplexity and KL to the baseline (± stderr) on the perplexity windows, mean task score (% over the run's tasks),
average recovery (% of the baseline's, 95% CI), compress seconds (flagged when the machine was busy), and vLLM.
A baseline that appears in several runs is printed once per run, so their agreement can be seen.
"""
import json
import sys
from pathlib import Path

from compress.report.rows import average_score, task_names
from eval.engines.vllm import failure_reason


def vllm_cell(run: Path, r: dict) -> str:
    """What vLLM did with the row: the kernel it named, or its own reason, read again from the server's log with
    today's eval/engines/vllm.failure_reason (a run made before it knew vLLM's wrapper errors recorded those)."""
    v = r.get("vllm") or {}
    if not v:
        return "—"
    if v.get("status") == "ok":
        return "served: " + ("; ".join(v.get("kernels") or []) or "unquantized GEMM")
    if v.get("status") == "too slow":
        return f"loads ({'; '.join(v.get('kernels') or []) or 'kernel not named'}), too slow to measure"
    log = run / "eval" / f"{r['name']}.vllm.log"
    reason = failure_reason(log.read_text()) if log.is_file() else v.get("reason") or v.get("status")
    return f"not served: {reason}"


def main(runs: list[Path]) -> None:
    print("| run | variant | scheme | bits/weight | weights MB | perplexity | KL (± se) | mean task % | "
          "recovery % [95% CI] | compress s | vLLM on this CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        variants = results["variants"]
        tasks = task_names(variants)
        for r in variants:
            if r.get("status") != "ok":
                print(f"| {run.name} | {r['name']} | {r.get('scheme')} | | | | | | | | failed: {r.get('error')} |")
                continue
            bits = (r.get("format") or {}).get("bits_per_weight") or (r.get("auto") or {}).get("effective_bits")
            kl = r.get("kl") or {}
            avg = average_score(r, tasks)
            rec = (r.get("recovery") or {}).get("average") or {}
            ci = rec.get("ci95") or [None, None]
            print(f"| {run.name} | {r['name']} | {r.get('scheme')} | {bits if bits is not None else '—'} | "
                  f"{r['weights_bytes'] / 1e6:.1f} | {(r.get('perplexity') or {}).get('value', float('nan')):.3f} | "
                  f"{kl.get('mean', float('nan')):.4f} ± {kl.get('stderr') or 0:.4f} | "
                  f"{'—' if avg is None else f'{100 * avg:.2f}'} | "
                  + (f"{rec['pct']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if rec.get("pct") is not None and ci[0] is not None
                     else "—")
                  + f" | {r.get('compress_seconds') or 0:.1f} | {vllm_cell(run, r)} |")


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
