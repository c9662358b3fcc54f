"""Decode speed of GGUF files in llama.cpp against the fp32 transformers baseline, side by side in one run.

    python benchmarks/edge_speed.py --run runs/smollm2-135m-edge --threads 1 2
    python benchmarks/edge_speed.py --baseline runs/x/baseline FILE.gguf [FILE.gguf ...]
    python benchmarks/edge_speed.py --baseline runs/synthetic-1.1b/hf runs/synthetic-1.1b/model-Q4_0.gguf

(the last on a random-weight model of a 1.1B shape from benchmarks/synthetic_llama.py: speed only, see there.)

Measured in this order, on one machine, in one invocation: the memory read bandwidth (as the pipeline measures it),
the baseline checkpoint with transformers (eager, fp32, batch 1, its own process), then every GGUF file with
llama.cpp at every thread count given (each in its own process). Every row decodes exactly `--new-tokens` greedy
tokens after a prompt of `--prompt-tokens` tokens (the same sentence), after one warm-up, and reports the median
of `--repeats` runs. The roofline bound of a GGUF row uses the file's tensor bytes (what llama.cpp reads per
token) plus its F16 KV cache; the baseline's, its fp32 weights and fp32 KV cache. The read bandwidth is probed
before the first row and after every row, and each row's bound uses the mean of the two probes around it: a shared
host's bandwidth drifts by tens of percent within minutes (the `raw` records keep the figure passed to the worker).

The ratio to the baseline ("x base") is not the quotient of those two medians, which were timed minutes apart on a
machine whose load changes: each GGUF row is timed again against the baseline in interleaved rounds, both loaded
in one process, A B / B A (eval/interleaved.py, `--rounds`), and the median ratio is printed with its
distribution-free 95% interval; an interval containing 1 reads "no measurable difference". Every timed run is
checked for other processes' CPU time and steal on our cores (eval/contention.py): a contended run or round is
timed again (at most `--retries` more) and a row that never got a quiet machine is printed with "CONTENDED".

Prints the table, then for the fastest 4-bit GGUF row its ratio to the baseline's tok/s and its utilisation, then
JSON last. The load average before and after is printed and kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from compress.environment import available_cores, configure_cpu  # noqa: E402


def _gguf_files(run: Path) -> list[tuple[str, Path, int | None]]:
    """(variant name, .gguf path, nominal bits) of every ok GGUF row of a run, in the run's order."""
    results = json.loads((run / "results.json").read_text())
    out = []
    for r in results["variants"]:
        if r.get("status") == "ok" and r.get("gguf"):
            out.append((r["name"], Path(r["checkpoint"]) / r["gguf"]["file"], r.get("bits")))
    return out


def _bits_from_name(path: Path) -> int | None:
    from compress.recipe import GGUF_TYPE_BITS

    stem = path.stem.upper()
    return next((b for t, b in sorted(GGUF_TYPE_BITS.items(), key=lambda kv: -len(kv[0])) if t in stem), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="GGUF files (default: every GGUF row of --run)")
    p.add_argument("--run", type=Path, default=Path("runs/smollm2-135m-edge"), help="a compress run directory")
    p.add_argument("--baseline", type=Path, default=None, help="the baseline checkpoint (default: RUN/baseline)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="llama.cpp thread counts to measure (default: 1 .. the cores this process may use)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=8, help="interleaved baseline/GGUF rounds per ratio")
    p.add_argument("--retries", type=int, default=8, help="extra runs (rounds) allowed to replace contended ones")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    configure_cpu()
    from eval.engines import llamacpp
    from compress.environment import _cpu_model
    from eval.engines.transformers import benchmark_checkpoint_in_subprocess
    from eval.interleaved import speed_ratio_in_subprocess
    from eval.throughput import measure_bandwidth

    files = [(f.stem, f, _bits_from_name(f)) for f in args.files] or _gguf_files(args.run)
    if not files:
        p.error(f"no GGUF files given and none in {args.run / 'results.json'}")
    baseline = args.baseline or args.run / "baseline"
    threads = args.threads or list(range(1, available_cores() + 1))
    shape = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
             "retries": args.retries}

    from eval.throughput import bracketed, rebound

    probes = [measure_bandwidth(device="cpu")]

    def judged(raw: dict) -> tuple[dict, dict]:
        """The row's roofline against the mean of the probes just before and just after it."""
        probes.append(measure_bandwidth(device="cpu"))
        bw = bracketed(probes[-2], probes[-1])
        return rebound(raw["roofline"]["1"], bw["bytes_per_sec"]), bw

    base = benchmark_checkpoint_in_subprocess(baseline, batch_sizes=[1], device="cpu", dtype="float32",
                                              bandwidth_bytes_per_sec=probes[0]["bytes_per_sec"], **shape)
    rf, bw = judged(base)
    base_tok = base["batches"]["1"]["tok_per_sec"]
    rows = [{"name": baseline.name, "engine": "transformers-eager", "threads": base["threads"], "bits": 32,
             "tok_per_sec": base_tok, "ttft_s": base["batches"]["1"]["ttft_s"],
             "range": (base["batches"]["1"]["tok_per_sec_min"], base["batches"]["1"]["tok_per_sec_max"]),
             "read_bytes": rf["bytes_per_token"], "bandwidth": bw["bytes_per_sec"],
             "bandwidth_before_after": (bw["before_bytes_per_sec"], bw["after_bytes_per_sec"]),
             "bound": rf["bound_tok_per_sec"], "utilisation": rf["utilisation"], "peak_bytes": base["peak_memory_bytes"],
             "ratio": 1.0, "ratio_interval": (1.0, 1.0), "verdict": "reference",
             "contended": base["batches"]["1"]["contention"]["contended"], "raw": base}]
    base_spec = {"engine": "transformers", "folder": str(baseline), "device": "cpu", "dtype": "float32"}
    for name, path, bits in files:
        for t in threads:
            r = llamacpp.decode_benchmark_in_subprocess(
                path, threads=t, bandwidth_bytes_per_sec=probes[-1]["bytes_per_sec"], **shape)
            one = r["batches"]["1"]
            rf, bw = judged(r)
            ratio = speed_ratio_in_subprocess(base_spec, {"engine": "llama.cpp", "path": str(path), "threads": t},
                                              prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                              rounds=args.rounds, retries=args.retries)
            rows.append({"name": name, "engine": "llama.cpp", "threads": t, "bits": bits, "dtype": r["dtype"],
                         "tok_per_sec": one["tok_per_sec"], "ttft_s": one["ttft_s"],
                         "range": (one["tok_per_sec_min"], one["tok_per_sec_max"]), "read_bytes": rf["bytes_per_token"],
                         "bandwidth": bw["bytes_per_sec"],
                         "bandwidth_before_after": (bw["before_bytes_per_sec"], bw["after_bytes_per_sec"]),
                         "bound": rf["bound_tok_per_sec"], "utilisation": rf["utilisation"],
                         "peak_bytes": r["peak_memory_bytes"], "ratio": ratio["ratio"],
                         "ratio_interval": (ratio["ratio_lo"], ratio["ratio_hi"]), "verdict": ratio["verdict"],
                         "contended": one["contention"]["contended"] or ratio["contention"]["contended"],
                         "interleaved": ratio, "raw": r})
    load_after = os.getloadavg()

    cpp = rows[1]["raw"]
    print(f"device: {_cpu_model() or platform.processor()}, {available_cores()} cores; llama.cpp via "
          f"{cpp['engine_version']} (weight repacking {'on' if cpp['weight_repacking'] else 'off'}; {cpp['cpu_features']})")
    figures = [p["bytes_per_sec"] / 1e9 for p in probes]
    print(f"read bandwidth, probed before the first row and after every row: {', '.join(f'{x:.1f}' for x in figures)} "
          f"GB/s ({probes[0]['method']}); each row's bound uses the mean of the probes around it; "
          f"copy for reference {probes[0]['copy_bytes_per_sec'] / 1e9:.1f} GB/s ({probes[0]['copy_method']})")
    synthetic = baseline / "SYNTHETIC.md"
    if synthetic.is_file():
        print(f"model: {synthetic.read_text().strip()}")
    print(f"shape: prompt {args.prompt_tokens} tokens, {args.new_tokens} generated, batch 1, 1 warm-up + "
          f"{args.repeats} timed runs each, median; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"{'row':<22}{'engine':<20}{'thr':>4}{'tok/s':>9}{'(min-max)':>16}{'TTFT ms':>9}{'read MB/tok':>12}"
          f"{'GB/s':>6}{'bound':>8}{'util':>7}{'peak MB':>9}  x base [95% interval, {args.rounds} interleaved rounds]")
    for r in rows:
        lo, hi = r["ratio_interval"]
        print(f"{r['name']:<22}{r['engine']:<20}{r['threads']:>4}{r['tok_per_sec']:>9.1f}"
              f"{r['range'][0]:>8.1f}-{r['range'][1]:<7.1f}{r['ttft_s'] * 1000:>9.1f}{r['read_bytes'] / 1e6:>12.1f}"
              f"{r['bandwidth'] / 1e9:>6.1f}{r['bound']:>8.0f}{100 * r['utilisation']:>6.0f}%"
              f"{r['peak_bytes'] / 1e6:>9.0f}  {r['ratio']:.2f} [{lo:.2f}, {hi:.2f}]"
              f"{' no measurable difference' if r['verdict'] == 'no measurable difference' else ''}"
              f"{' CONTENDED' if r['contended'] else ''}")
    four = [r for r in rows[1:] if r["bits"] == 4]
    summary = None
    if four:
        best = max(four, key=lambda r: r["tok_per_sec"])
        summary = {"row": best["name"], "threads": best["threads"], "tok_per_sec": best["tok_per_sec"],
                   "baseline_tok_per_sec": base_tok, "ratio_vs_fp32_baseline": best["ratio"],
                   "ratio_interval": best["ratio_interval"], "contended": best["contended"],
                   "utilisation": best["utilisation"], "bound_tok_per_sec": best["bound"],
                   "read_bytes_per_token": best["read_bytes"]}
        print(f"fastest 4-bit GGUF row: {best['name']} ({best['dtype']}), llama.cpp {best['threads']} thread(s): "
              f"{best['tok_per_sec']:.1f} tok/s; {best['ratio']:.2f}x [{best['ratio_interval'][0]:.2f}, "
              f"{best['ratio_interval'][1]:.2f}] (interleaved rounds) the fp32 transformers baseline "
              f"({base_tok:.1f} tok/s, {base['threads']} threads); {100 * best['utilisation']:.0f}% of its "
              f"memory-bandwidth bound ({best['bound']:.0f} tok/s = {best['bandwidth'] / 1e9:.1f} GB/s / "
              f"{best['read_bytes'] / 1e6:.1f} MB per token)")
    for r in rows:
        del r["raw"]
    print(json.dumps({"bandwidth_probes": probes, "load_avg_1min_before": load_before[0], "load_avg_1min_after": load_after[0],
                      "shape": shape, "baseline": str(baseline), "synthetic_weights": synthetic.is_file(), "rows": rows, "summary": summary,
                      "baseline_raw": base, "llamacpp_example_raw": cpp}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
