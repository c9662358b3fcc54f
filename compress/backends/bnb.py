"""bitsandbytes NF4 and LLM.int8: quantized as transformers loads the weights. The only module that imports
bitsandbytes (an optional extra: `pip install -e '.[edge]'`).

- NF4 (QLoRA's 4-bit NormalFloat): weights in blocks of 64, each block scaled by its absmax and rounded to the 16
  levels of a normal distribution's quantiles, packed two per byte. Double quantization stores the per-block fp32
  absmax scales again in 8 bits (blocks of 256), ~0.4 bits per weight less. Matmuls dequantize to `compute_dtype`.
- LLM.int8: int8 weights per output row; at run time, the input columns with an outlier (|x| > 6) are multiplied in
  16 bits and the rest in int8 (vector-wise quantized), which keeps large-activation features exact.

Neither needs calibration data. Both save as ordinary safetensors checkpoints with a `quantization_config`
(quant_method: bitsandbytes) that transformers reloads and vLLM serves with `--quantization bitsandbytes`.

On a CPU, bitsandbytes >= 0.45 has a CPU backend: both formats load, run and save here (checked on this machine
with bitsandbytes 0.50.2 and transformers 5.17). Two things about NF4 on a CPU with AVX512-BF16:
- on the first forward, each Linear4bit repacks its weight into a CPU layout (and dequantizes double-quantized
  scales), and its matmul then runs in bf16 whatever the compute dtype: logits differ slightly from an exact fp32
  dequantize-and-multiply;
- saving after that first forward inverts the repacking "best effort", and the inverse is lossy (the reloaded
  weights differ from the quantized ones, much more without double quantization than with it). So the pipeline
  saves a bitsandbytes checkpoint before it runs any forward pass, and the self-check then compares the in-memory
  model with the reloaded one, both repacked the same way from the same bytes.
The fused 4-bit CPU kernel comes from the `kernels` hub package, which is not reachable offline; the decode figures
say how fast this bitsandbytes runs on this CPU. On a GPU the same checkpoints run its CUDA kernels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, ClassVar, Literal, NamedTuple

from pydantic import model_validator

from compress.options import VariantBase, field_error

log = logging.getLogger("compress")


class BnbFormat(NamedTuple):
    """One bitsandbytes format: what it stores and how transformers is asked for it."""

    name: str
    bits: int
    block: int | None  # weights per absmax scale; None: one scale per row
    options: tuple[str, ...]  # the variant keys it takes
    facts: dict  # what the record and the model card say besides the options
    config: Callable  # (variant, compute dtype) -> BitsAndBytesConfig keyword arguments


FORMATS: dict[str, BnbFormat] = {
    "bnb-nf4": BnbFormat("NF4", 4, 64, ("compute_dtype", "double_quant"), {"block_size": 64},
                         lambda v, compute: {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                             "bnb_4bit_use_double_quant": bool(v.double_quant),
                                             "bnb_4bit_compute_dtype": compute}),
    "bnb-int8": BnbFormat("LLM.int8", 8, None, (), {"outlier_threshold": 6.0},
                          lambda v, compute: {"load_in_8bit": True}),
}
BNB_METHODS = tuple(FORMATS)
_OPTIONS = ("compute_dtype", "double_quant")


class BnbVariant(VariantBase):
    """bnb-nf4 / bnb-int8. Their formats are fixed by bitsandbytes (NF4 blocks of 64, LLM.int8 per row): only the
    matmul dtype and NF4's double quantization are choices."""

    LIBRARY: ClassVar[str] = "bitsandbytes"  # its version decides the weights (part of the cache key)
    # import, distribution, how to install it (optional)
    REQUIRES: ClassVar[tuple[str, str, str]] = ("bitsandbytes", "bitsandbytes", "pip install -e '.[edge]'")

    method: Literal[BNB_METHODS]  # the keys of FORMATS
    # the dtype NF4's matmuls run in (default: the model's compute dtype, fp32 on CPU) and double quantization (the
    # per-block absmax scales quantized again to 8 bits; saves ~0.4 bits per weight)
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    double_quant: bool | None = None

    @model_validator(mode="after")
    def _rules(self) -> "BnbVariant":
        for key in _OPTIONS:
            if key not in self.format.options and getattr(self, key) is not None:
                takers = [m for m, f in FORMATS.items() if key in f.options]
                raise field_error(key, f"only method {', '.join(map(repr, takers))} takes {key}")
        if "double_quant" in self.format.options and self.double_quant is None:
            self.double_quant = True
        if self.kv_cache is not None:
            raise field_error("kv_cache", f"method {self.method!r} keeps its engine's own KV cache; quantized KV "
                                          f"caches go with method none and the llm-compressor methods")
        self._no_calibration_keys()
        return self

    @property
    def format(self) -> BnbFormat:
        return FORMATS[self.method]

    @property
    def bits(self) -> int:
        return self.format.bits

    def checkpoint_bytes(self, config, dtype_bytes: int) -> float:
        """NF4 stores a scale per block of 64 weights; LLM.int8 one per row."""
        from compress.planner import weight_bytes_estimate

        return weight_bytes_estimate(config, self.bits, self.format.block,
                                     ignore_lm_head="lm_head" in self.ignore, embed_bytes=dtype_bytes)

    @property
    def label(self) -> str:
        return f"{self.format.name}{'-dq' if self.double_quant else ''} (bitsandbytes)" + self._suffix()

    def build(self, job) -> dict:
        """Quantized as transformers loads the weights; saved before its first forward pass (see above)."""
        from compress.build import transformers_checkpoint

        return transformers_checkpoint(job, self, _compress_step, quantized=False, load_weights=False,
                                       save_before_forward=True, serve_flags={"bitsandbytes": True},
                                       extra={"bnb": self.facts(job.dtype, job.env)})

    def facts(self, dtype, env: dict) -> dict:
        """What the record and the model card say about the format."""
        options = {key: getattr(self, key) for key in self.format.options}
        if "compute_dtype" in options:  # unset: the model's compute dtype
            options["compute_dtype"] = options["compute_dtype"] or str(dtype).removeprefix("torch.")
        return {"format": self.format.name, **self.format.facts, **options, "skip_modules": self.ignore,
                "bitsandbytes": env.get("bitsandbytes")}


def _compress_step(job, v: BnbVariant, model, tok, weights, cal):
    log.info("stage compress: %s %s with bitsandbytes %s", v.name, v.label, version())
    return load_quantized(weights or job.source.path, v, job.device, job.dtype), cal


INSTALL_HINT = "install the optional extra: pip install -e '.[edge]' (bitsandbytes)"


def require():
    """bitsandbytes, or an ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"bitsandbytes variants need bitsandbytes ({e}); {INSTALL_HINT}") from None
    return bitsandbytes


def version() -> str | None:
    from compress.environment import installed_version

    return installed_version("bitsandbytes")


def quantization_config(variant: BnbVariant, model_dtype):
    """transformers' BitsAndBytesConfig for the variant. `ignore` names the modules kept unquantized
    (llm_int8_skip_modules; lm_head by default, as transformers does)."""
    import torch
    from transformers import BitsAndBytesConfig

    require()
    compute = getattr(torch, variant.compute_dtype) if variant.compute_dtype else model_dtype
    return BitsAndBytesConfig(**variant.format.config(variant, compute),
                              llm_int8_skip_modules=list(variant.ignore) or None)


def load_quantized(folder: Path, variant: BnbVariant, device: str, dtype):
    """Load the full-precision HF folder with bitsandbytes quantizing each Linear as it arrives.

    Raises RuntimeError with the reason when this machine's bitsandbytes cannot run the format (rather than
    producing figures from a model that silently stayed in full precision)."""
    from transformers import AutoModelForCausalLM

    config = quantization_config(variant, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype,
                                                     device_map=device)
    except Exception as e:
        raise RuntimeError(f"bitsandbytes {version()} could not quantize to {variant.label} on {device}: "
                           f"{type(e).__name__}: {e}") from e
    quantized = count_quantized_linears(model)
    if quantized == 0:
        raise RuntimeError(f"bitsandbytes {version()} left every Linear in full precision on {device}: "
                           f"{variant.label} is not available here")
    return model.eval()


def count_quantized_linears(model) -> int:
    """Linear layers that bitsandbytes replaced (Linear4bit / Linear8bitLt)."""
    bnb = require()
    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
