"""How well the Fisher proxy ranks what the measured KL ranks (issue 30: "both compared once on the lab model").

    python benchmarks/sensitivity_scores.py                    # SmolLM2-135M, W4A16-g64 and W8A16-g64, 4 x 256 C4
    python benchmarks/sensitivity_scores.py --windows 2 --seq-len 128

Method `auto` scores every (unit, format) pair one of two ways (compress/sensitivity.py): "kl", measured (that unit
alone rounded, the model run from its layer on, mean KL to the baseline), or "fisher", the squared-gradient proxy
NVIDIA ModelOpt's auto_quantize uses (one backward pass per window). This script computes both tables on the same
model, calibration windows, units and formats as method auto's defaults, and prints:

- each score's wall time and the process's peak RSS while it ran (one process, one after the other; the machine's
  load average is recorded), beside the peak the run's memory check allows (compress/resources.py);
- Spearman's rank correlation of the two tables over all pairs and within each format (ranking the units of one
  format is what decides where the bytes go), and how many of the KL's ten most sensitive units Fisher names too;
- what the proxy's choices cost by the measured score: for several effective-bits targets, the choice made from
  each table (compress/choose.py, the same solver), both judged by the summed KL. The proxy is good enough where
  its choice's KL is near the KL table's own optimum.

Both tables are of one-unit damages on calibration text; the whole checkpoint's KL on held-out text is what the
evaluation measures (benchmarks/results/auto_smollm2_epyc.md). Prints a table, then JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # run from a checkout without installing

FORMATS = ["W4A16", "W8A16", "unquantized"]  # method auto's default candidates
TARGETS_BITS = [4.75, 5.0, 5.5, 6.0, 7.0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--memory-only", choices=("kl", "fisher"),
                   help="run this score alone in this process and print its peak RSS beside the memory check's "
                        "estimate (a second score in the same process starts from the first one's heap)")
    args = p.parse_args(argv)

    from compress.environment import configure_cpu, cpu_features

    configure_cpu()
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress import choose, sensitivity
    from compress.backends.auto import size_table
    from compress.backends.llmcompressor import fake_quantize_weights
    from compress.load import resolve_source
    from compress.recipe import ModelSpec, parse_variant
    from compress_speed import _windows  # the C4 calibration windows every calibration benchmark packs

    source = resolve_source(ModelSpec(), prepare=True)
    tok = AutoTokenizer.from_pretrained(source.path)
    windows = _windows(tok, args.windows, args.seq_len)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    v = parse_variant({"name": "a", "method": "auto", "formats": FORMATS, "group_size": args.group_size,
                       "target": {"effective_bits": TARGETS_BITS[0]}})
    units = sensitivity.units(model, v.granularity, tuple(v.ignore))
    formats = [(None if f == "unquantized" else f, v.format_group(f)) for f in v.formats]
    out: dict = {"model": source.description, "device": cpu_features(), "torch_threads": torch.get_num_threads(),
                 "windows": args.windows, "seq_len": args.seq_len, "formats": v.formats, "units": len(units),
                 "load1_start": os.getloadavg()[0], "seconds": {}, "tables": {}}
    from compress.environment import peak_memory_bytes, reset_peak_memory
    from compress.load import load_config
    from compress.resources import expected_peak_memory_bytes

    config = load_config(source)
    out["memory_check_bytes"] = expected_peak_memory_bytes(config, 4, None)  # the check without an auto variant
    out["peak_rss_bytes"] = {}
    if args.memory_only:
        a = parse_variant({"name": "a", "method": "auto", "formats": FORMATS, "group_size": args.group_size,
                           "target": {"effective_bits": TARGETS_BITS[0]},
                           "analysis": {"windows": args.windows, "seq_len": args.seq_len, "score": args.memory_only}})
        estimate = expected_peak_memory_bytes(config, 4, None, a.analysis_bytes(config, 4))
        reset_peak_memory("cpu")
        t0 = time.perf_counter()
        sensitivity.SCORES[args.memory_only](model, windows, units, formats, fake_quantize_weights)
        peak = peak_memory_bytes("cpu")[0]
        print(f"{args.memory_only} alone: {time.perf_counter() - t0:.1f} s, peak RSS {peak / 1e9:.2f} GB; the run's "
              f"memory check with this analysis counted: {estimate / 1e9:.2f} GB")
        print(json.dumps({"score": args.memory_only, "peak_rss_bytes": peak, "memory_check_bytes": estimate,
                          "windows": args.windows, "seq_len": args.seq_len}))
        return {}
    for score in ("kl", "fisher"):
        reset_peak_memory("cpu")
        t0 = time.perf_counter()
        table = sensitivity.SCORES[score](model, windows, units, formats, fake_quantize_weights)
        out["seconds"][score] = round(time.perf_counter() - t0, 1)
        out["peak_rss_bytes"][score] = peak_memory_bytes("cpu")[0]
        out["tables"][score] = table
    out["load1_end"] = os.getloadavg()[0]

    kl, fisher = (np.array([[np.inf if c is None else c for c in row] for row in out["tables"][s]])
                  for s in ("kl", "fisher"))
    measured = [j for j, f in enumerate(v.formats) if f != "unquantized"]
    pairs = [(i, j) for i in range(len(units)) for j in measured if np.isfinite(kl[i, j])]
    out["spearman_all"] = sensitivity.spearman([kl[p] for p in pairs], [fisher[p] for p in pairs])
    out["spearman_per_format"] = {
        v.formats[j]: sensitivity.spearman([kl[i, j] for i, jj in pairs if jj == j],
                                           [fisher[i, j] for i, jj in pairs if jj == j]) for j in measured}
    top = measured[0]
    by_kl = sorted(range(len(units)), key=lambda i: -kl[i, top])[:10]
    by_fisher = sorted(range(len(units)), key=lambda i: -fisher[i, top])[:10]
    out["top10_overlap"] = {"format": v.formats[top], "shared": len(set(by_kl) & set(by_fisher)),
                            "kl": [units[i].name for i in by_kl], "fisher": [units[i].name for i in by_fisher]}

    sizes = size_table(v, units, 32)
    weights = sum(u.weights for u in units)
    by = {s: choose.solve(sizes, c) for s, c in (("kl", kl), ("fisher", fisher))}
    out["choices"] = []
    for bits in TARGETS_BITS:
        row = {"effective_bits": bits}
        for s, frontier in by.items():
            picks = frontier.picks(bits * weights / 8)
            row[s] = None if picks is None else {
                "bits": round(frontier.size_of(picks) * 8 / weights, 4),
                "summed_kl": float(sum(kl[i, j] for i, j in enumerate(picks))),
                "agree_with_kl_choice": None}
        if row["kl"] and row["fisher"]:
            a, b = by["kl"].picks(bits * weights / 8), by["fisher"].picks(bits * weights / 8)
            row["fisher"]["agree_with_kl_choice"] = sum(x == y for x, y in zip(a, b))
        out["choices"].append(row)

    print(f"{out['model']}; {out['device']}; {out['torch_threads']} threads; {len(units)} units x "
          f"{v.formats}, g{args.group_size}; {args.windows} x {args.seq_len} calibration tokens (C4); load average "
          f"{out['load1_start']:.2f} -> {out['load1_end']:.2f}")
    print(f"time: kl {out['seconds']['kl']} s, fisher {out['seconds']['fisher']} s; peak RSS of the process: " +
          ", ".join(f"{s} {b / 1e9:.2f} GB" for s, b in out["peak_rss_bytes"].items()) +
          f" (the run's memory check allows {out['memory_check_bytes'] / 1e9:.2f} GB)")
    print(f"Spearman (kl vs fisher): all {len(pairs)} pairs {out['spearman_all']:.3f}; " +
          ", ".join(f"{f} {r:.3f}" for f, r in out["spearman_per_format"].items()))
    print(f"the 10 units most sensitive to {v.formats[top]} by kl, also in fisher's 10: "
          f"{out['top10_overlap']['shared']}")
    print("\n| target bits | kl's choice: bits | summed kl | fisher's choice: bits | its summed kl | ratio | units "
          "chosen alike |\n|---|---|---|---|---|---|---|")
    for row in out["choices"]:
        k, f = row["kl"], row["fisher"]
        if not (k and f):
            print(f"| {row['effective_bits']} | unreachable | | | | | |")
            continue
        print(f"| {row['effective_bits']} | {k['bits']:.3f} | {k['summed_kl']:.4f} | {f['bits']:.3f} | "
              f"{f['summed_kl']:.4f} | {f['summed_kl'] / k['summed_kl']:.2f} | {f['agree_with_kl_choice']}/"
              f"{len(units)} |")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
