"""KV-cache compression: what storing keys and values in fewer bits costs in accuracy, and what it frees in memory.

At serving time every generated token appends one key and one value vector per layer and KV head; at long context x
many concurrent sequences, that cache, not the weights, is what fills the GPU. Storing it in 8 or 4 bits instead of
16 halves or quarters it. The accuracy cost is measured the way it happens: each key and value is quantized and
dequantized as it enters the cache (after RoPE, so keys are stored exactly as the engine stores them), and attention
then reads the rounded values.

Formats (plain tensor functions below; shapes are (batch, kv_heads, tokens, head_dim)):

| dtype | granularity | scale                                        | who serves it                                 |
|-------|-------------|----------------------------------------------|-----------------------------------------------|
| fp8   | tensor      | 1 static scale per layer for K, 1 for V      | vLLM `--kv-cache-dtype fp8` (checkpoint scales)|
| fp8   | head        | 1 static scale per layer and KV head         | vLLM, FlashAttention-3 backend                |
| int8/4| token       | scale + min per token and head (or per group)| llama.cpp q8_0/q4_0 cache (blocks of 32)      |
| int8/4| channel     | keys: per channel over `group_size` tokens;  | KIVI; transformers QuantizedCache             |
|       |             | values: per token                            |                                               |

Why KIVI quantizes keys per channel: a few key channels carry outliers across all tokens (an effect of RoPE and of
the model's learned biases), so a per-token scale is stretched by them and the other channels lose resolution;
values have no such channels and are quantized per token. Integer formats here are asymmetric (scale and minimum,
both rounded to fp16 as an engine stores them).

fp8 scales come from llm-compressor's calibration and live in the checkpoint; compressed-tensors applies them when
transformers reloads it, so evaluating the reloaded model measures exactly what ships. The other formats are not
part of any checkpoint (vLLM has no integer KV cache), so evaluation installs `attach(model, kv)`.

Simulation limits, stated where the figures are reported: the channel format quantizes every key, including the
last < group_size tokens that KIVI keeps in full precision (slightly pessimistic), and its group scale sees the whole
group of tokens at once, as in a prefill.
"""

from __future__ import annotations

import inspect

import torch

from compress.planner import DEFAULT_CHANNEL_GROUP, KV_BITS as BITS
from compress.options import KVCache

FP8_MAX = 448.0  # largest finite float8_e4m3fn
TORCH_16 = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ tensor functions


def round_trip_16bit(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Store in bf16/fp16 and read back: what a 16-bit cache does to fp32 activations."""
    return x.to(TORCH_16[dtype]).to(x.dtype)


def fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize to float8 e4m3 with a static scale (broadcast over x) and dequantize: round(x / s) * s, saturating
    at +-448 as vLLM's cache write does."""
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.to(x.dtype) * scale


def int_asymmetric(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric integer round trip with one scale and minimum per slice along `dim` (min/max over that dim).

        scale = (max - min) / (2^bits - 1),  q = clamp(round((x - min) / scale), 0, 2^bits - 1),  x' = q * scale + min

    scale and min are rounded to fp16 first, since that is how an engine stores them."""
    lo = x.amin(dim=dim, keepdim=True).half().float()
    hi = x.amax(dim=dim, keepdim=True).float()
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).clamp(min=1e-8).half().float()
    q = ((x.float() - lo) / scale).round().clamp(0, qmax)
    return (q * scale + lo).to(x.dtype)


def per_token(x: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """One scale per token and head, or per `group_size` consecutive channels of it (llama.cpp's blocks of 32)."""
    d = x.shape[-1]
    g = group_size or d
    if d % g:
        raise ValueError(f"KV group_size {g} does not divide head_dim {d}")
    return int_asymmetric(x.reshape(*x.shape[:-1], d // g, g), bits, dim=-1).reshape(x.shape)


def per_channel_keys(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """KIVI keys: one scale per channel over each block of `group_size` consecutive tokens (the last block may be
    shorter: it is padded by repeating its last token, which changes neither its min nor its max)."""
    b, h, s, d = x.shape
    pad = (-s) % group_size
    if pad:
        x_p = torch.cat([x, x[:, :, -1:].expand(b, h, pad, d)], dim=2)
    else:
        x_p = x
    blocks = x_p.reshape(b, h, (s + pad) // group_size, group_size, d)
    return int_asymmetric(blocks, bits, dim=3).reshape(b, h, s + pad, d)[:, :, :s]


def fake_quantize(k: torch.Tensor, v: torch.Tensor, kv: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as the cache format `kv` would return them. fp8 needs calibrated scales and is applied by
    compressed-tensors from the checkpoint, not here."""
    if kv.dtype in TORCH_16:
        return round_trip_16bit(k, kv.dtype), round_trip_16bit(v, kv.dtype)
    if kv.dtype == "fp8":
        raise ValueError("fp8 KV uses the checkpoint's calibrated scales (compressed-tensors applies them on load)")
    bits = BITS[kv.dtype]
    if kv.granularity == "channel":
        return per_channel_keys(k, bits, kv.group_size or DEFAULT_CHANNEL_GROUP), per_token(v, bits, None)
    return per_token(k, bits, kv.group_size), per_token(v, bits, kv.group_size)


# ------------------------------------------------------------------------------------------------ model hook


class _QuantizingCache:
    """Stands in for the attention layer's `past_key_values`: K/V pass through `fake_quantize` on their way into
    the real cache (or straight to attention when there is none, as in a scoring forward pass)."""

    def __init__(self, inner, kv: KVCache):
        self._inner, self._kv = inner, kv

    def update(self, key_states, value_states, *args, **kwargs):
        key_states, value_states = fake_quantize(key_states, value_states, self._kv)
        if self._inner is None:
            return key_states, value_states
        return self._inner.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name):
        if self._inner is None:
            raise AttributeError(name)
        return getattr(self._inner, name)


def attention_modules(model) -> list[torch.nn.Module]:
    """Every self-attention block (a module with k_proj and v_proj children), in layer order."""
    return [m for _, m in model.named_modules()
            if isinstance(getattr(m, "k_proj", None), torch.nn.Module)
            and isinstance(getattr(m, "v_proj", None), torch.nn.Module)]


def attach(model, kv: KVCache) -> list:
    """Quantize K/V on their way into the cache in every attention block of `model`. Returns the hook handles
    (call .remove() to undo). Works whether or not the caller passes a cache (scoring passes none)."""
    handles = []
    for attn in attention_modules(model):
        name = "past_key_values" if "past_key_values" in inspect.signature(attn.forward).parameters \
            else "past_key_value"

        def hook(module, args, kwargs, name=name):
            kwargs[name] = _QuantizingCache(kwargs.get(name), kv)
            return args, kwargs

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    if not handles:
        raise ValueError("no attention blocks with k_proj/v_proj found: cannot quantize this model's KV cache")
    return handles


def checkpoint_kv_scales(model) -> dict[str, torch.Tensor]:
    """`self_attn.k_scale` / `v_scale` tensors compressed-tensors loaded from an fp8-KV checkpoint (empty if none)."""
    return {f"{n}.{s}": getattr(m, s).detach() for n, m in model.named_modules()
            for s in ("k_scale", "v_scale") if isinstance(getattr(m, s, None), torch.Tensor)}


def apply_kv_cache(model, record: dict) -> dict:
    """Make `model` store its KV cache as the variant says, before anything is measured. Returns how.

    fp8: the checkpoint carries the calibrated scales and compressed-tensors already quantizes K/V with them on
    load; this only checks that it did (positive, finite scales in every layer), so fp8 figures can never silently
    come from a 16-bit cache. Other formats: the quantize-dequantize hook of eval/kvcache.py."""
    import math

    kv = KVCache(**record["kv_cache"])
    if record.get("kv_in_checkpoint"):
        scales = checkpoint_kv_scales(model)
        layers = len(attention_modules(model))
        if len(scales) != 2 * layers:
            raise RuntimeError(f"{record['name']}: expected k_scale and v_scale in each of {layers} attention layers "
                               f"after loading, found {len(scales)}: the fp8 KV cache would not be applied")
        values = [float(x) for t in scales.values() for x in t.flatten()]
        if not all(math.isfinite(x) and x > 0 for x in values):
            raise RuntimeError(f"{record['name']}: non-positive or non-finite KV scales in the checkpoint")
        return {"format": kv.label, "how": "checkpoint scales, applied by compressed-tensors on load",
                "scales": len(values), "scale_min": min(values), "scale_max": max(values)}
    attach(model, kv)
    return {"format": kv.label, "how": "quantize-dequantize as K/V enter the cache (eval/kvcache.py)"}
