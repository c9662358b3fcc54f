"""The transformers pass's lm-eval tasks and perplexity of one checkpoint under several settings, side by side: the
measurement behind evaluation.task_scorer and the transformers precision (issue 29: the same figures, faster).

    python benchmarks/lm_eval_speed.py runs/smollm2-135m-lab/baseline \
        [--configs float32/lm-eval float32/shared-context bfloat16/shared-context] [--tasks hellaswag ...]
        [--limit 200] [--windows 40] [--batch-size 16]

Each config is DTYPE/SCORER: the checkpoint loaded as compress loads it (eval/engines/transformers.load_checkpoint) in
that dtype, its perplexity on the lab's windows (eval/perplexity.evaluate_tokens: 512-token windows, stride 512;
once per dtype, as the scorer does not change it) and the lab's tasks through eval/accuracy.run_tasks with that
scorer (the same documents, 0-shot), each timed, with the other processes' CPU share over the config (eval/contention). Then each
config against the first: every figure beside it, the gap in combined standard errors (sqrt(se_a^2 + se_b^2)), the
items both scored alike, and the time ratio. The CPU's features are printed: bf16 is only fast where the CPU
computes it natively (AMX on Sapphire Rapids, AVX512-BF16 on Zen 4). JSON last.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

LAB_TASKS = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai"]


def measure(folder: Path, config: str, tasks: list[str], data_dir: Path, *, limit: int, windows: int,
            batch_size: int) -> dict:
    """One config's figures and wall seconds per stage."""
    import torch
    from transformers import AutoTokenizer

    from eval.accuracy import run_tasks
    from eval.engines.transformers import load_checkpoint
    from eval.perplexity import evaluate_tokens

    dtype_name, scorer = config.split("/")
    dtype = getattr(torch, dtype_name)
    out: dict = {"config": config, "seconds": {}}
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder)
    model = load_checkpoint(folder, dtype, "cpu")
    out["seconds"]["load"] = time.perf_counter() - t0
    if windows:
        ids = tok((data_dir / "wikitext2_raw_wiki.test.raw").read_text(), return_tensors="pt").input_ids[0]
        t0 = time.perf_counter()
        p = evaluate_tokens(model, ids, context=512, stride=512, max_windows=windows)
        out["seconds"]["perplexity"] = time.perf_counter() - t0
        out["perplexity"] = {k: p[k] for k in ("value", "tokens") if k in p}
        print(f"{config}: perplexity {p['value']:.3f} over {p['tokens']} tokens in "
              f"{out['seconds']['perplexity']:.0f} s", flush=True)
    if tasks:
        t0 = time.perf_counter()
        scores = run_tasks(model, tok, tasks, data_dir, num_fewshot=0, limit=limit, batch_size=batch_size,
                           device="cpu", scorer=scorer)
        out["seconds"]["tasks"] = time.perf_counter() - t0
        out["tasks"] = scores
        print(f"{config}: tasks in {out['seconds']['tasks']:.0f} s: "
              + ", ".join(f"{t} {100 * s['value']:.1f}" for t, s in scores.items()), flush=True)
    return out


def compare(a: dict, b: dict) -> list[str]:
    """The table: each figure of `b` beside `a`'s, the gap in combined standard errors, items scored alike."""
    lines = [f"| figure | {a['config']} | {b['config']} | gap (combined se) | items alike |", "|---|---|---|---|---|"]
    for task, sa in (a.get("tasks") or {}).items():
        sb = b["tasks"][task]
        se = math.hypot(sa["stderr"] or 0, sb["stderr"] or 0)
        gap = (sb["value"] - sa["value"]) / se if se else float("nan")
        alike = sum(x == y for x, y in zip(sa["items"], sb["items"]))
        lines.append(f"| {task} ({sa['metric']}, n={sa['n']}) | {100 * sa['value']:.1f} ± {100 * sa['stderr']:.1f} "
                     f"| {100 * sb['value']:.1f} ± {100 * sb['stderr']:.1f} | {gap:+.2f} | {alike}/{len(sa['items'])} |")
    if "perplexity" in a:
        lines.append(f"| perplexity ({a['perplexity']['tokens']} tokens) | {a['perplexity']['value']:.3f} | "
                     f"{b['perplexity']['value']:.3f} | {b['perplexity']['value'] / a['perplexity']['value'] - 1:+.2%} "
                     f"(relative) | |")
    for stage in a["seconds"]:
        lines.append(f"| {stage} seconds | {a['seconds'][stage]:.0f} | {b['seconds'][stage]:.0f} | "
                     f"{a['seconds'][stage] / b['seconds'][stage]:.2f}x as fast | |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--configs", nargs="+", default=["float32/lm-eval", "float32/shared-context"])
    p.add_argument("--tasks", nargs="*", default=LAB_TASKS)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    args = p.parse_args(argv)
    from compress.environment import cpu_features, installed_version
    from eval import contention

    print(f"command: python benchmarks/lm_eval_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    cpu = cpu_features()
    print(f"cpu: {cpu.get('model')}; flags: {', '.join(cpu.get('flags') or [])}", flush=True)
    runs, ppl = [], {}  # perplexity once per dtype: the scorer does not touch it
    for config in args.configs:
        before = contention.snapshot()
        dtype = config.split("/")[0]
        runs.append(measure(args.checkpoint, config, args.tasks, args.data_dir, limit=args.limit,
                            windows=0 if dtype in ppl else args.windows, batch_size=args.batch_size))
        if "perplexity" in runs[-1]:
            ppl[dtype] = (runs[-1]["perplexity"], runs[-1]["seconds"]["perplexity"])
        elif dtype in ppl:
            runs[-1]["perplexity"], runs[-1]["seconds"]["perplexity"] = ppl[dtype]
        runs[-1]["contention"] = contention.between(before, contention.snapshot())
        print(f"{config}: other processes on these cores: {runs[-1]['contention']}", flush=True)
    for other in runs[1:]:
        print("\n" + "\n".join(compare(runs[0], other)))
    for r in runs:
        for s in (r.get("tasks") or {}).values():
            s.pop("items", None)
    print(json.dumps({"checkpoint": str(args.checkpoint), "cpu": cpu, "torch": installed_version("torch"),
                      "transformers": installed_version("transformers"), "lm_eval": installed_version("lm_eval"),
                      "limit": args.limit, "windows": args.windows, "batch_size": args.batch_size,
                      "date": time.strftime("%Y-%m-%d"), "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
