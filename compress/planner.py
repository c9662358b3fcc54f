"""Will a variant fit on a GPU? Weight and KV-cache bytes from the model config alone, no weights loaded.

Serving memory is weights + KV cache + a margin (activations, CUDA context, allocator fragmentation, the engine's own
buffers). Weights are fixed by the variant; the KV cache grows with context x concurrent sequences, and is what
quantizing the weights buys room for: every byte the weights give back is KV for more sequences. This is the
handbook's VRAM lab as a function: `plan_rows` for the numbers, `format_plan` for the table.

The margin is a flat `headroom` fraction of the card (10% by default), not a model of any engine: vLLM's
gpu_memory_utilization=0.9 plays the same role. Estimates are for Llama-family configs (dense MLP with gate, up and
down projections, grouped-query attention); mixture-of-experts or other layouts need their own count.
"""

from __future__ import annotations

import math

GB = 10**9  # vendors state GPU memory in decimal GB: "80 GB" is 80e9 bytes (74.5 GiB)

GPUS = (
    ("L4 24GB", 24 * GB),
    ("A10G 24GB", 24 * GB),
    ("A100 40GB", 40 * GB),
    ("A100 80GB", 80 * GB),
    ("H100 80GB", 80 * GB),
    ("H200 141GB", 141 * GB),
)


# bits per element of each KV-cache format (recipe `kv_cache.dtype`)
KV_BITS = {"fp8": 8, "int8": 8, "int4": 4, "bf16": 16, "fp16": 16}
DEFAULT_CHANNEL_GROUP = 32  # tokens per key scale in the channel (KIVI) format, KIVI's own default


def attention_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a Llama-family config: the three numbers every KV-cache size is made of.
    head_dim is the config's own when it has one (Llama-3, Qwen), else hidden_size / attention heads."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, bits: float = 16) -> float:
    """Bytes of the KV cache: 2 (K and V) x layers x kv_heads x head_dim x tokens x bits / 8, the one formula every
    KV figure of compress comes from (planner, roofline, llama.cpp rows, KV formats).

    Grouped-query attention stores only `num_key_value_heads` heads, which is why Llama-3-8B (8 KV heads of 32) holds
    a 8k-token sequence in 1 GiB at bf16 instead of 4 GiB.
    """
    return 2 * layers * kv_heads * head_dim * tokens * bits / 8


def kv_bytes(config, seq_len: int, batch: int, dtype_bytes: int) -> int:
    """Bytes of a plain (unquantized) KV cache of `batch` sequences of `seq_len` tokens, from the config."""
    return int(kv_cache_bytes(*attention_shape(config), seq_len * batch, dtype_bytes * 8))


def kv_bytes_per_token(config, kv=None) -> float:
    """KV bytes one token adds to the cache, over all layers, scales included; `kv` is the recipe's KVCache.

    per layer: 2 (K, V) x kv_heads x head_dim x bits / 8, plus for integer formats a 16-bit scale and minimum per
    group: per token and head (token), or for keys per channel per block of tokens (channel). fp8 scales are per
    layer, not per token. `kv=None` is the 16-bit cache an engine uses by default.
    """
    layers, kv_heads, head_dim = attention_shape(config)
    total = kv_cache_bytes(layers, kv_heads, head_dim, 1, 16 if kv is None else KV_BITS[kv.dtype])
    if kv is not None and kv.dtype in ("int8", "int4"):
        meta = 4  # fp16 scale + fp16 minimum
        if kv.granularity == "channel":
            keys = kv_heads * head_dim * meta / (kv.group_size or DEFAULT_CHANNEL_GROUP)
            values = kv_heads * meta
        else:
            groups = head_dim // (kv.group_size or head_dim)
            keys = values = kv_heads * groups * meta
        total += layers * (keys + values)
    return total


def kv_memory(config, kv, weight_bytes: int, context: int, batch: int, headroom: float) -> dict:
    """What a KV format buys at serving time: bytes per token, bytes at context x batch, and per planner GPU how
    many sequences of `context` tokens fit beside `weight_bytes` of weights, against a 16-bit cache."""
    per_token = kv_bytes_per_token(config, kv)
    per_token_16 = kv_bytes_per_token(config, None)
    gpus = {}
    for gpu, memory_bytes in GPUS:
        free = memory_bytes * (1 - headroom) - weight_bytes
        seqs = max(0, int(free // (per_token * context)))
        seqs_16 = max(0, int(free // (per_token_16 * context)))
        gpus[gpu] = {"max_sequences": seqs, "max_sequences_16bit_kv": seqs_16, "extra_sequences": seqs - seqs_16}
    return {"format": kv.label if kv else "KV-16bit", "bytes_per_token": per_token,
            "bytes_per_token_16bit": per_token_16, "ratio_vs_16bit": per_token_16 / per_token,
            "context": context, "batch": batch, "bytes_at_context_batch": int(per_token * context * batch),
            "headroom": headroom, "weight_bytes": weight_bytes, "gpus": gpus}


def _shape(config) -> tuple[int, int, int, int, int, int, int]:
    layers, kv_heads, head_dim = attention_shape(config)
    return (config.hidden_size, config.intermediate_size, layers, config.num_attention_heads, kv_heads, head_dim,
            config.vocab_size)


def _layer_linears(config) -> list[tuple[int, int]]:
    """(out_features, in_features) of each Linear in one decoder layer."""
    hidden, inter, _, heads, kv_heads, head_dim, _ = _shape(config)
    return [
        (heads * head_dim, hidden),     # q_proj
        (kv_heads * head_dim, hidden),  # k_proj
        (kv_heads * head_dim, hidden),  # v_proj
        (hidden, heads * head_dim),     # o_proj
        (inter, hidden),                # gate_proj
        (inter, hidden),                # up_proj
        (hidden, inter),                # down_proj
    ]


def _quantized_linear_bytes(out_f: int, in_f: int, bits: int, group_size: int | None) -> float:
    """Packed weights plus one 16-bit scale per group of `group_size` inputs in each output row (per row when
    group_size is None). At 16 bits nothing is quantized, so there are no scales."""
    if bits >= 16:
        return out_f * in_f * bits / 8
    groups = 1 if group_size is None else math.ceil(in_f / group_size)
    return out_f * in_f * bits / 8 + out_f * groups * 2


def weight_bytes_estimate(config, bits: int, group_size: int | None, ignore_lm_head: bool = True,
                          embed_bytes: int = 2, act_bits: int = 16) -> int:
    """Bytes of the weights of a Llama-family model quantized to `bits`, from its config alone.

        quantized   = sum over the 7 Linears of every layer of out x in x bits/8 + out x ceil(in/group_size) x 2
        unquantized = (vocab x hidden embeddings, + vocab x hidden lm_head if untied) x embed_bytes
                      + (2 norms per layer + final norm) x hidden x embed_bytes

    This is the llm-compressor W4A16/W8A16 layout: symmetric integer weights (no zero points), 16-bit scales, the
    embeddings and norms left alone, and lm_head left alone by default (`ignore: [lm_head]`) because it is the most
    sensitive layer. With ignore_lm_head=False an untied lm_head is counted like the other Linears; a tied one shares
    the embedding matrix and stays at embed_bytes. bits=16 gives parameters x 2, the bf16 size.

    `act_bits` does not change the weight bytes: activation scales are computed per token at run time (dynamic) or are
    one number per Linear (static). It is accepted so a variant such as W8A8 reads the same here as in a recipe.
    """
    if act_bits not in (4, 8, 16):
        raise ValueError(f"act_bits must be 4, 8 or 16, got {act_bits}")
    hidden, _, layers, _, _, _, vocab = _shape(config)
    total = layers * sum(_quantized_linear_bytes(o, i, bits, group_size) for o, i in _layer_linears(config))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    total += vocab * hidden * embed_bytes  # input embeddings: a lookup table, never quantized here
    if not tied:
        total += (vocab * hidden * embed_bytes if ignore_lm_head
                  else _quantized_linear_bytes(vocab, hidden, bits, group_size))
    total += (2 * layers + 1) * hidden * embed_bytes  # RMSNorm weights
    return int(round(total))


def parameters(config) -> int:
    """Parameters of a Llama-family model from its config (its bytes at 8 bits per weight)."""
    return weight_bytes_estimate(config, 8, None, embed_bytes=1)


def plan_rows(config, variants: list[tuple[str, int, int | None]], context: int, batch: int,
              headroom: float = 0.10, kv_dtype_bytes: int = 2,
              kv_bytes_per_token: dict[str, float] | None = None) -> list[dict]:
    """One row per (name, bits, group_size) variant: weights, KV at context x batch, their total, and per GPU
    whether it fits in memory x (1 - headroom) and how many sequences of `context` tokens fit beside the weights.
    The KV cache is `kv_dtype_bytes` per element unless `kv_bytes_per_token` gives a variant's own figure (a
    quantized KV cache, kv_bytes_per_token)."""
    rows = []
    for name, bits, group_size in variants:
        if kv_bytes_per_token and name in kv_bytes_per_token:
            kv_one = int(round(kv_bytes_per_token[name] * context))
        else:
            kv_one = kv_bytes(config, context, 1, kv_dtype_bytes)
        weights = weight_bytes_estimate(config, bits, group_size)
        kv = kv_one * batch
        total = weights + kv
        gpus = {}
        for gpu, memory_bytes in GPUS:
            usable = memory_bytes * (1 - headroom)
            gpus[gpu] = {
                "memory_bytes": memory_bytes,
                "usable_bytes": int(usable),
                "fits": total <= usable,
                "max_sequences": max(0, int((usable - weights) // kv_one)),
            }
        rows.append({"variant": name, "bits": bits, "group_size": group_size, "context": context, "batch": batch,
                     "weight_bytes": weights, "kv_bytes": kv, "total_bytes": total, "headroom": headroom,
                     "gpus": gpus})
    return rows


def format_plan(rows: list[dict]) -> str:
    """Markdown table: one line per variant, one column per GPU with 'yes (N seq)' or 'no (N seq)', where N is how
    many sequences of the row's context fit beside the weights."""
    if not rows:
        return ""
    gpus = list(rows[0]["gpus"])
    r0 = rows[0]
    lines = [f"Context {r0['context']} tokens x batch {r0['batch']}; usable = memory x (1 - {r0['headroom']:g}); "
             "GB = 1e9 bytes",
             "",
             "| variant | weights GB | KV GB | total GB | " + " | ".join(gpus) + " |",
             "|---|---:|---:|---:|" + "---|" * len(gpus)]
    for r in rows:
        cells = [f"{'yes' if g['fits'] else 'no'} ({g['max_sequences']} seq)" for g in r["gpus"].values()]
        lines.append(f"| {r['variant']} | {r['weight_bytes'] / GB:.2f} | {r['kv_bytes'] / GB:.2f} | "
                     f"{r['total_bytes'] / GB:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
