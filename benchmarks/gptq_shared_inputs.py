"""GPTQ with one X Xᵀ per distinct input against llm-compressor's one per Linear: time and weights, side by side.

    python benchmarks/gptq_shared_inputs.py                    # SmolLM2-135M, GPTQ W4A16-g64, 16 x 512 C4 tokens
    python benchmarks/gptq_shared_inputs.py --samples 64 --rounds 1

compress.backends.llmcompressor._one_product_per_input makes q, k and v (and gate and up) share the product of
their common input instead of each computing it (issue 29: the calibration cost). This script builds the same GPTQ
variant both ways on the embedded SmolLM2-135M in fp32, in alternating order (A B, B A, ...) in one process so that
a load that comes and goes hits both, and prints each build's seconds, the median ratio, the number of products
computed, and whether the two checkpoints' tensors are bit-identical (they must be). The load average is recorded:
figures from a busy machine are not speed figures. Prints a table, then JSON last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # run from a checkout without installing

VARIANT = {"name": "gptq-w4a16", "method": "gptq", "bits": 4, "group_size": 64}  # the lab's


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2, help="each round builds both ways (order alternating)")
    args = p.parse_args(argv)

    from compress.environment import configure_cpu, cpu_features

    configure_cpu()
    import torch
    from llmcompressor.modifiers.gptq import base
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.backends import llmcompressor as quantize
    from compress.load import resolve_source
    from compress.recipe import ModelSpec, parse_variant
    from compress_speed import _windows  # the C4 calibration windows every calibration benchmark packs

    source = resolve_source(ModelSpec(), prepare=True)
    tok = AutoTokenizer.from_pretrained(source.path)
    windows = _windows(tok, args.samples, args.seq_len)
    variant = parse_variant(VARIANT)
    real_accumulate, shared_context = base.accumulate_hessian, quantize._one_product_per_input
    products = {"n": 0}

    def counting(*a):
        products["n"] += 1
        return real_accumulate(*a)

    def build(shared: bool) -> tuple[float, int, dict]:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
        products["n"] = 0
        base.accumulate_hessian = counting
        quantize._one_product_per_input = shared_context if shared else contextlib.nullcontext
        try:
            t0 = time.perf_counter()
            quantize.compress_model(model, variant, windows)
            seconds = time.perf_counter() - t0
        finally:
            base.accumulate_hessian, quantize._one_product_per_input = real_accumulate, shared_context
            quantize.release_session()
        return seconds, products["n"], {k: v.detach().clone() for k, v in model.state_dict().items()}

    out: dict = {"model": source.description, "device": cpu_features(), "torch_threads": torch.get_num_threads(),
                 "samples": args.samples, "seq_len": args.seq_len, "variant": VARIANT,
                 "load1_start": os.getloadavg()[0], "seconds": {"per_linear": [], "shared": []}}
    first: dict = {}
    for r in range(args.rounds):
        for shared in ((False, True) if r % 2 == 0 else (True, False)):
            seconds, n, weights = build(shared)
            key = "shared" if shared else "per_linear"
            out["seconds"][key].append(round(seconds, 2))
            out[f"products_{key}"] = n
            if key in first:
                assert all(torch.equal(first[key][k], weights[k]) for k in weights), "a build is not repeatable"
            first.setdefault(key, weights)
    out["load1_end"] = os.getloadavg()[0]
    a, b = first["per_linear"], first["shared"]
    out["bit_identical"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ratios = [x / y for x, y in zip(out["seconds"]["per_linear"], out["seconds"]["shared"])]
    out["speedup_median"] = statistics.median(ratios)

    print(f"{out['model']}; {out['device']}; {out['torch_threads']} threads; GPTQ W4A16-g64 on {args.samples} x "
          f"{args.seq_len} C4 tokens, fp32; load average {out['load1_start']:.2f} -> {out['load1_end']:.2f}")
    print("| build | seconds per round | median s | X Xᵀ products |\n|---|---|---|---|")
    for key, label in (("per_linear", "llm-compressor: one product per Linear"),
                       ("shared", "compress: one product per distinct input")):
        s = out["seconds"][key]
        print(f"| {label} | {', '.join(f'{x:.1f}' for x in s)} | {statistics.median(s):.1f} | "
              f"{out[f'products_{key}']} |")
    print(f"speed-up (median of per-round ratios): {out['speedup_median']:.3f}x; weights bit-identical: "
          f"{out['bit_identical']}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
