"""Random-weight Llamas of real models' shapes, saved as an HF folder and exported to GGUF, for decode speed only.

    python benchmarks/synthetic_llama.py --shape 1.1b --types Q4_0 Q8_0       # -> runs/synthetic-1.1b/
    python benchmarks/edge_speed.py --baseline runs/synthetic-1.1b/hf runs/synthetic-1.1b/model-Q4_0.gguf

Why: a batch-1 decode step costs (bytes read) / (bandwidth) plus a fixed cost per token that does not grow with
the weights: building the graph, ~700 small ops each ended by a barrier between threads, attention, the logits.
On SmolLM2-135M the fixed part is about half of a llama.cpp step on a 2-core CPU, so its roofline utilisation says
more about that overhead than about how well a format streams. Decode speed depends on the shapes and the bytes,
not on the values (no kernel here skips zeros or branches on data), so a model with random weights and a real
model's shape decodes exactly as fast as the real one. It says nothing about accuracy: never evaluate its
perplexity or tasks.

Shapes (hidden, layers, heads, KV heads, MLP width): SmolLM2-360M and TinyLlama-1.1B; both use SmolLM2's
tokenizer and vocabulary (49,152) from the embedded model, since no hub is reachable, and tie the output head to
the embedding as SmolLM2 does (TinyLlama does not; the GGUF file then reads one 49,152-row matrix per token, not
two). The weights are N(0, 0.02) from a fixed seed, saved in F16 (half the disk of fp32; the benchmark loads them
in fp32). The GGUF files go through llama.cpp's converter and quantizer, as the pipeline's own GGUF rows do.
A finished folder is reused: `hf/` and each `model-<TYPE>.gguf` appear only once complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# name -> (hidden, layers, attention heads, KV heads, MLP width); head_dim = hidden / heads
SHAPES = {
    "360m": (960, 32, 15, 5, 2560),  # SmolLM2-360M
    "1.1b": (2048, 22, 32, 4, 5632),  # TinyLlama-1.1B
}


def build_hf(shape: str, out: Path, tokenizer_folder: Path, seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM of `shape` with the tokenizer of `tokenizer_folder`, in `out` (atomic)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    hidden, layers, heads, kv_heads, mlp = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    base = json.loads((tokenizer_folder / "config.json").read_text())
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=base["vocab_size"],
                         max_position_embeddings=2048, rope_theta=base.get("rope_theta", 10000.0),
                         rms_norm_eps=base.get("rms_norm_eps", 1e-5), tie_word_embeddings=True,
                         bos_token_id=base.get("bos_token_id"), eos_token_id=base.get("eos_token_id"),
                         initializer_range=0.02)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float16).eval()
    from compress.ownership import new_staging_dir

    staging = new_staging_dir(out.parent, "synthetic-hf")  # compress's own staging name: never a user's folder
    try:
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / "SYNTHETIC.md").write_text(
            f"Random weights, N(0, 0.02), seed {seed}, in the shape '{shape}' (hidden {hidden}, {layers} layers, "
            f"{heads} heads, {kv_heads} KV heads, MLP {mlp}) with SmolLM2's tokenizer. For decode-speed measurements "
            f"only: its outputs are meaningless. Built by benchmarks/synthetic_llama.py.\n")
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q8_0"], help="llama.cpp file types to export")
    p.add_argument("--out", type=Path, default=None, help="default: runs/synthetic-<shape>")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from compress import llamacpp
    from compress.load import resolve_source
    from compress.ownership import staging_name
    from compress.recipe import EMBEDDED_MODEL, GGUF_TYPE_BITS, ModelSpec

    unknown = [t for t in args.types if t not in GGUF_TYPE_BITS]
    if unknown:
        p.error(f"--types: unknown llama.cpp file type(s) {unknown}; expected some of {sorted(GGUF_TYPE_BITS)}")
    llamacpp.require()
    out = args.out or Path("runs") / f"synthetic-{args.shape}"
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_source(ModelSpec(source=EMBEDDED_MODEL), prepare=True)  # SmolLM2: tokenizer and vocabulary
    hf = build_hf(args.shape, out / "hf", Path(source.path), seed=args.seed)
    files = {}
    for t in args.types:
        dest = out / f"model-{t}.gguf"
        if not dest.is_file():
            partial = out / staging_name(f"model-{t}.gguf")
            try:
                llamacpp.export(hf, partial, t, tokenizer_from=Path(source.gguf))
                partial.rename(dest)
            finally:
                partial.unlink(missing_ok=True)
        files[t] = str(dest)
    print(json.dumps({"shape": args.shape, "hf": str(hf), "gguf": files}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
