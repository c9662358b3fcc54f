"""Decode speed of one or more checkpoint folders with transformers (eager), against the memory-bandwidth roofline.

    python benchmarks/decode_speed.py runs/smollm2-135m-lab/baseline runs/smollm2-135m-lab/gptq-w4a16 \
        --prompt-tokens 64 --new-tokens 32 --repeats 2

Bandwidth is measured once; each folder is then benchmarked in its own Python process, so its peak RSS is its own
and not the largest of all folders so far (ru_maxrss is a process-lifetime peak). Prints a table, then JSON last.
The ratio column is each folder's batch-1 speed over the first folder's: put the baseline first. It is not the
quotient of their medians (timed minutes apart, each under whatever load the machine had then) but the median of
`--rounds` interleaved rounds of the two, both loaded in one process, A B / B A (eval/interleaved.py), printed with
its distribution-free 95% interval; "~" marks an interval containing 1 (no measurable difference).

Every timed run is checked for other processes' CPU time and steal on our cores (eval/contention.py); a contended
run or round is timed again, at most `--retries` more, and a row that never got a quiet machine says CONTENDED.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from compress.environment import configure_cpu  # noqa: E402

MiB = 1 << 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="torch dtype name (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--bandwidth-mib", type=int, default=None, help="copy size for the bandwidth probe")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds per ratio to the first folder")
    p.add_argument("--retries", type=int, default=8, help="extra runs (rounds) allowed to replace contended ones")
    args = p.parse_args(argv)

    configure_cpu()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    from eval.throughput import measure_bandwidth

    size = args.bandwidth_mib * MiB if args.bandwidth_mib else None
    bw = measure_bandwidth(size, device=args.device)
    from eval.engines.transformers import benchmark_checkpoint_in_subprocess

    results = []
    for folder in args.folders:
        r = benchmark_checkpoint_in_subprocess(
            folder, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, batch_sizes=args.batch_sizes,
            repeats=args.repeats, device=args.device, dtype=args.dtype, bandwidth_bytes_per_sec=bw["bytes_per_sec"],
            retries=args.retries)
        # the same roofline with the copy bandwidth (read + write counted), for comparison
        r["roofline_copy"] = {b: {**rf, "bound_tok_per_sec": rf["bound_tok_per_sec"] * bw["copy_bytes_per_sec"] /
                                  bw["bytes_per_sec"], "utilisation": rf["utilisation"] * bw["bytes_per_sec"] /
                                  bw["copy_bytes_per_sec"]} for b, rf in r["roofline"].items()}
        results.append(r)

    from eval.interleaved import speed_ratio_in_subprocess

    def spec(folder: Path) -> dict:
        return {"engine": "transformers", "folder": str(folder), "device": args.device, "dtype": args.dtype}

    for folder, r in zip(args.folders[1:], results[1:]):
        r["vs_first"] = speed_ratio_in_subprocess(spec(args.folders[0]), spec(folder), prompt_tokens=args.prompt_tokens,
                                                  new_tokens=args.new_tokens, rounds=args.rounds, retries=args.retries)

    def ratio_text(r: dict, b: str) -> str:
        if b != "1" or "vs_first" not in r:
            return ""
        v = r["vs_first"]
        same = "~" if v["verdict"] == "no measurable difference" else ""
        return f"{same}{v['ratio']:.2f} [{v['ratio_lo']:.2f}, {v['ratio_hi']:.2f}]"

    def flag(r: dict, m: dict, b: str) -> str:
        contended = m["contention"]["contended"] or (b == "1" and r.get("vs_first", {}).get("contention", {})
                                                     .get("contended"))
        return " CONTENDED" if contended else ""

    print(f"bandwidth {bw['bytes_per_sec'] / 1e9:.2f} GB/s (range {bw['bytes_per_sec_min'] / 1e9:.2f}-"
          f"{bw['bytes_per_sec_max'] / 1e9:.2f}; {bw['method']}); copy {bw['copy_bytes_per_sec'] / 1e9:.2f} GB/s "
          f"({bw['copy_method']})")
    print(f"engine transformers-eager, device {args.device}, dtype {args.dtype}, prompt {args.prompt_tokens}, "
          f"new {args.new_tokens}, repeats {args.repeats}, load avg {os.getloadavg()[0]:.2f}")
    print(f"{'folder':<28}{'batch':>6}{'tok/s':>9}{'(min-max)':>16}{'TTFT ms':>9}{'ms/tok':>8}{'bound':>8}"
          f"{'util':>6}{'cp bnd':>8}{'cp util':>8}{'disk MB':>9}{'read MB':>9}{'peak MB':>9}  vs 1st [95%, interleaved]")
    for r in results:
        for b, m in r["batches"].items():
            rf, rr = r["roofline"][b], r["roofline_copy"][b]
            ratio = ratio_text(r, b) + flag(r, m, b)
            print(f"{Path(r['folder']).name:<28}{b:>6}{m['tok_per_sec']:>9.1f}"
                  f"{m['tok_per_sec_min']:>8.1f}-{m['tok_per_sec_max']:<7.1f}{m['ttft_s'] * 1000:>9.1f}"
                  f"{m['ms_per_token']:>8.1f}{rf['bound_tok_per_sec']:>8.1f}{rf['utilisation']:>6.2f}"
                  f"{rr['bound_tok_per_sec']:>8.1f}{rr['utilisation']:>8.2f}"
                  f"{r['weight_bytes_stored'] / 1e6:>9.0f}{r['weight_bytes_in_memory'] / 1e6:>9.0f}"
                  f"{r['peak_memory_bytes'] / 1e6:>9.0f}  {ratio}")
    print("bound = read bandwidth / (weights in memory + KV at mean context) x batch; 'cp bnd' the same with the "
          "copy bandwidth; 'read MB' is the weights decode actually reads (compressed-tensors checkpoints "
          "are decompressed to the float dtype on the first forward); peak = process peak RSS (own process)")
    print(json.dumps({"bandwidth": bw, "load_avg_1min": os.getloadavg()[0], "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
