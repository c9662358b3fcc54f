"""Compression cost: the same job through `compress` and through llm-compressor called directly, against the floor.

    python benchmarks/compress_speed.py                      # GPTQ W4A16, AWQ W4A16, SmoothQuant+GPTQ W8A8
    python benchmarks/compress_speed.py --methods gptq --samples 16

For each method, in one run on the embedded SmolLM2-135M (fp32, CPU):

- floor:   one no-grad forward pass of the model over the calibration windows, one window at a time as the
           calibration pipelines feed them. Every calibrated method has to see every calibration token at least
           once, so no driver can beat this.
- compress: `compress.backends.llmcompressor.compress_model` (the pipeline it picks, its CPU thread settings).
- direct:  llm-compressor's `oneshot` as its docs show it: the same modifiers and token windows, the library's
           default pipeline and torch's default threads. On a CPU-only torch, AWQ needs compress's pin_memory
           workaround to run at all; it is applied here too and the JSON says so.

Each measurement runs in its own Python process (so peak RSS is its own), one after another, never in parallel.
After compressing, both results are scored on the same WikiText-2 test windows (perplexity). Targets (issue:
compression cost): compress <= 1.25x floor, compress <= direct, |perplexity difference| <= 1%.

Timings from a busy machine are meaningless on 2 cores: the 1-minute load average is recorded, and a warning is
printed when the machine was busy at the start. Prints a table, then JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

METHODS = {  # name -> variant settings (the lab recipe's)
    "gptq": {"name": "gptq-w4a16", "method": "gptq", "bits": 4, "group_size": 64},
    "awq": {"name": "awq-w4a16", "method": "awq", "bits": 4, "group_size": 64},
    "sq": {"name": "w8a8-int8", "method": "smoothquant-gptq", "bits": 8, "smoothing_strength": 0.8},
}
CALIBRATION = ROOT.parent / "shared" / "data" / "calibration" / "c4_validation_2k.jsonl"
PPL_FILE = ROOT.parent / "shared" / "data" / "wikitext2_raw_wiki.test.raw"


# ------------------------------------------------------------------------------------------------ worker


def _windows(tok, samples: int, seq_len: int) -> list[list[int]]:
    from compress.calibration import load_texts, pack_token_windows
    from compress.recipe import Calibration

    return pack_token_windows(load_texts(Calibration(source=str(CALIBRATION))), tok, samples, seq_len, seed=0)


def worker(job: dict) -> dict:
    """One measurement in this process: job = {kind: floor|compress|direct, method, samples, seq_len, ppl_windows}."""
    if job["kind"] != "direct":  # direct = the library's defaults, torch's own thread settings
        from compress.environment import configure_cpu

        configure_cpu()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.environment import peak_memory_bytes, reset_peak_memory
    from compress.load import resolve_source
    from compress.recipe import ModelSpec, parse_variant

    source = resolve_source(ModelSpec(), prepare=True)
    tok = AutoTokenizer.from_pretrained(source.path)
    windows = _windows(tok, job["samples"], job["seq_len"])
    reset_peak_memory("cpu")
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    out = {**job, "torch_threads": torch.get_num_threads(), "load1_start": os.getloadavg()[0]}
    t0 = time.perf_counter()
    if job["kind"] == "floor":
        with torch.no_grad():
            for w in windows:
                model(torch.tensor([w]), use_cache=False)
    elif job["kind"] == "compress":
        from compress.backends.llmcompressor import compress_model

        compress_model(model, parse_variant(METHODS[job["method"]]), windows)
    else:
        out["workarounds"] = _direct(model, parse_variant(METHODS[job["method"]]), windows)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"], _ = peak_memory_bytes("cpu")
    out["load1_end"] = os.getloadavg()[0]
    if job["kind"] != "floor" and job["ppl_windows"]:
        from eval.perplexity import evaluate_tokens

        ids = tok(PPL_FILE.read_text(), return_tensors="pt").input_ids[0]
        out["perplexity"] = evaluate_tokens(model, ids, context=512, stride=512, max_windows=job["ppl_windows"])
    return out


def _direct(model, variant, windows) -> list[str]:
    """llm-compressor as its README shows it: oneshot(model, dataset, recipe, max_seq_length,
    num_calibration_samples), default pipeline."""
    from datasets import Dataset

    from compress.backends.llmcompressor import _lib, _no_pinning_without_accelerator, build_modifiers

    oneshot = _lib().oneshot  # llm-compressor's own entry point, imported where compress imports it

    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    # the one workaround compress applies too, to every method: llm-compressor 0.14 pins the intermediates it keeps
    # between layers, which raises on a CPU-only torch (AWQ's pipeline hit it)
    workarounds = ["pin_memory disabled (llm-compressor 0.14 crashes on a CPU-only torch otherwise)"]
    with _no_pinning_without_accelerator():
        oneshot(model=model, dataset=ds, recipe=build_modifiers(variant), max_seq_length=len(windows[0]),
                num_calibration_samples=len(windows))
    return workarounds


# ------------------------------------------------------------------------------------------------ driver


def _run_job(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {**job, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--samples", type=int, default=64, help="calibration windows (GPTQ and SmoothQuant)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--awq-samples", type=int, default=16, help="AWQ's grid search costs ~10x GPTQ per token")
    p.add_argument("--awq-seq-len", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=20, help="WikiText-2 test windows of 512 tokens")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"warning: the machine is busy (1-min load {load1:.1f}): these timings will be inflated",
              file=sys.stderr)
    rows = []
    for m in args.methods:
        samples, seq_len = (args.awq_samples, args.awq_seq_len) if m == "awq" else (args.samples, args.seq_len)
        base = {"method": m, "samples": samples, "seq_len": seq_len, "ppl_windows": args.ppl_windows}
        r = {k: _run_job({**base, "kind": k}) for k in ("floor", "compress", "direct")}
        for k, v in r.items():
            print(f"{m} {k}: {v.get('seconds', float('nan')):.1f} s {v.get('error', '')}", file=sys.stderr)
        rows.append(r)

    def f(x, spec=".1f"):
        return format(x, spec) if isinstance(x, (int, float)) else "—"

    print("| method | calib tokens | floor s | compress s | direct s | compress/floor | compress/direct | "
          "ppl compress | ppl direct | ppl diff % | peak RSS compress MB | peak RSS direct MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    for r in rows:
        fl, co, di = r["floor"], r["compress"], r["direct"]
        ratio_floor = co.get("seconds") / fl["seconds"] if "seconds" in co and "seconds" in fl else None
        ratio_direct = co.get("seconds") / di["seconds"] if "seconds" in co and "seconds" in di else None
        pc, pd = (co.get("perplexity") or {}).get("value"), (di.get("perplexity") or {}).get("value")
        diff = 100 * (pc - pd) / pd if pc and pd else None
        summary.append({"method": fl["method"], "calibration_tokens": fl["samples"] * fl["seq_len"],
                        "floor_seconds": fl.get("seconds"), "compress_seconds": co.get("seconds"),
                        "direct_seconds": di.get("seconds"), "compress_over_floor": ratio_floor,
                        "compress_over_direct": ratio_direct, "perplexity_compress": pc, "perplexity_direct": pd,
                        "perplexity_diff_pct": diff,
                        "within_target": {"floor_1.25x": ratio_floor is not None and ratio_floor <= 1.25,
                                          "not_slower_than_direct": ratio_direct is not None and ratio_direct <= 1.0,
                                          "perplexity_1pct": diff is not None and abs(diff) <= 1.0},
                        "runs": r})
        print(f"| {fl['method']} | {fl['samples']} x {fl['seq_len']} | {f(fl.get('seconds'))} | "
              f"{f(co.get('seconds'))} | {f(di.get('seconds'))} | {f(ratio_floor, '.2f')} | {f(ratio_direct, '.2f')} | "
              f"{f(pc, '.2f')} | {f(pd, '.2f')} | {f(diff, '+.2f')} | {f((co.get('peak_rss_bytes') or 0) / 1e6, '.0f')} | "
              f"{f((di.get('peak_rss_bytes') or 0) / 1e6, '.0f')} |")
    from compress.environment import environment

    env = environment("cpu", "float32")
    print(f"\ndevice: {env.get('device_name')}, {env.get('cpu_threads')} threads, fp32; perplexity: "
          f"{args.ppl_windows} x 512-token windows of {PPL_FILE.name}; calibration: {CALIBRATION.name}; "
          f"load average at start {load1:.2f}")
    print(json.dumps({"environment": env, "load1_start": load1, "results": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
