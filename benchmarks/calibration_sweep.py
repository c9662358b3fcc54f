"""Which calibration text, and how much of it: GPTQ/AWQ W4A16 quality against compress time on SmolLM2-135M.

    python benchmarks/calibration_sweep.py                       # the default grid
    python benchmarks/calibration_sweep.py --method awq --sources c4 wikitext --shapes 16x256 64x256

For each (source, samples x seq_len), quantize a fresh copy of the model through
`compress.backends.llmcompressor.compress_model`,
time it, and score it on WikiText-2 *test* windows (perplexity, and KL to the unquantized model on the same tokens).
RTN (no calibration) is the reference every calibrated point must beat. Sources, none of them an evaluation split:

- c4:          C4 validation documents (web text), calibration/c4_validation_2k.jsonl
- wikitext:    WikiText-2 *valid* (tokenized release, `<unk>` kept), wikitext2_tok_valid.txt -- in-domain for the
               WikiText-2 test perplexity, so its gain there is partly domain match; KL shows whether it is general
- chat:        GSM8K train question/answer pairs rendered with the model's chat template (what an instruct model sees)
- shakespeare: Tiny Shakespeare, deliberately off-domain

Runs one configuration at a time in this process; timings need a quiet machine (the load average is recorded).
Prints a table, then JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def source_texts(name: str, tok) -> list[str]:
    from compress.calibration import load_texts
    from compress.recipe import Calibration

    if name == "c4":
        return load_texts(Calibration(source=str(DATA / "calibration" / "c4_validation_2k.jsonl")))
    if name == "wikitext":
        return load_texts(Calibration(source=str(DATA / "wikitext2_tok_valid.txt")))
    if name == "shakespeare":
        return load_texts(Calibration(source=str(DATA / "calibration" / "tinyshakespeare.txt")))
    if name == "chat":
        rows = [json.loads(line) for line in open(DATA / "gsm8k_train.jsonl")]
        return [tok.apply_chat_template([{"role": "user", "content": r["question"]},
                                         {"role": "assistant", "content": r["answer"]}], tokenize=False)
                for r in rows]
    raise ValueError(name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=["gptq", "awq"], default="gptq")
    p.add_argument("--sources", nargs="+", default=["c4", "wikitext", "chat", "shakespeare"])
    p.add_argument("--shapes", nargs="+", default=["64x512"], help="SAMPLESxSEQ_LEN")
    p.add_argument("--ppl-windows", type=int, default=20)
    p.add_argument("--pipelines", nargs="+", choices=["basic", "sequential"], default=["sequential"],
                   help="llm-compressor's calibration pipeline. sequential (what compress uses): layer by layer, each "
                        "layer calibrated on the outputs of the already-quantized layers before it; basic: one pass "
                        "through the unquantized model")
    p.add_argument("--no-rtn", action="store_true", help="skip the RTN reference point")
    args = p.parse_args(argv)

    from compress.environment import configure_cpu, environment

    configure_cpu()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.calibration import pack_token_windows
    from compress.load import resolve_source
    from eval.perplexity import evaluate_tokens
    from compress.backends.llmcompressor import compress_model
    from compress.recipe import ModelSpec, parse_variant

    source = resolve_source(ModelSpec(), prepare=True)
    tok = AutoTokenizer.from_pretrained(source.path)
    ids = tok((DATA / "wikitext2_raw_wiki.test.raw").read_text(), return_tensors="pt").input_ids[0]

    def fresh():
        return AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()

    reference = fresh()
    base = evaluate_tokens(reference, ids, context=512, stride=512, max_windows=args.ppl_windows)

    def score(model) -> dict:
        r = evaluate_tokens(model, ids, context=512, stride=512, max_windows=args.ppl_windows, reference=reference)
        return {"perplexity": r["value"], "kl": r["kl"]["mean"], "kl_stderr": r["kl"]["stderr"],
                "top1": r["kl"]["top1_agreement"]}

    variant = parse_variant(dict(name=args.method, method=args.method, bits=4, group_size=64))
    points = []
    if not args.no_rtn:  # plain rounding of the same format (AWQ's has zero points) is the bar to beat
        model = fresh()
        t0 = time.perf_counter()
        rtn = parse_variant(dict(name="rtn", method="rtn", bits=4, group_size=64, symmetric=variant.symmetric))
        compress_model(model, rtn, None)
        points.append({"source": None, "samples": 0, "seq_len": 0, "method": "rtn", "pipeline": "datafree",
                       "symmetric": variant.symmetric, "seconds": time.perf_counter() - t0, **score(model)})
        print(f"rtn: ppl {points[-1]['perplexity']:.2f} KL {points[-1]['kl']:.4f}", file=sys.stderr)
    texts_cache: dict[str, list[str]] = {}
    for shape in args.shapes:
        samples, seq_len = (int(x) for x in shape.split("x"))
        for name in args.sources:
            texts = texts_cache.setdefault(name, source_texts(name, tok))
            windows = pack_token_windows(texts, tok, samples, seq_len, seed=0)
            for pipeline in args.pipelines:
                model = fresh()
                load1 = os.getloadavg()[0]
                t0 = time.perf_counter()
                compress_model(model, variant, windows, pipeline=pipeline)
                seconds = time.perf_counter() - t0
                points.append({"source": name, "samples": samples, "seq_len": seq_len, "method": args.method,
                               "pipeline": pipeline,
                               "symmetric": variant.symmetric, "seconds": seconds, "load1": load1, **score(model)})
                del model
                pt = points[-1]
                print(f"{args.method} {name} {shape} {pt['pipeline']}: {seconds:.1f} s, ppl {pt['perplexity']:.2f} "
                      f"KL {pt['kl']:.4f}", file=sys.stderr)

    rtn = next((pt for pt in points if pt["method"] == "rtn"), None)
    print(f"| method | pipeline | source | samples x seq_len | tokens | compress s | perplexity | KL ± se | top-1 % | "
          f"beats RTN (ppl / KL) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for pt in points:
        beats = "—" if pt["method"] == "rtn" or rtn is None else (
            f"{'yes' if pt['perplexity'] < rtn['perplexity'] else 'no'} / {'yes' if pt['kl'] < rtn['kl'] else 'no'}")
        print(f"| {pt['method']} | {pt['pipeline']} | {pt['source'] or '—'} | {pt['samples']} x {pt['seq_len']} | "
              f"{pt['samples'] * pt['seq_len']:,} | {pt['seconds']:.1f} | {pt['perplexity']:.2f} | "
              f"{pt['kl']:.4f} ± {pt['kl_stderr']:.4f} | {100 * pt['top1']:.1f} | {beats} |")
    print(f"\nbaseline perplexity {base['value']:.2f}; scored on {base['tokens']:,} tokens ({args.ppl_windows} x 512) "
          f"of wikitext2_raw_wiki.test.raw; fp32 CPU, llm-compressor via compress.backends.llmcompressor")
    print(json.dumps({"environment": environment("cpu", torch.float32), "baseline_perplexity": base["value"],
                      "points": points}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
