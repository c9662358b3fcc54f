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
  scales), and its matmul then runs in bf16 whatever the compute dtype: logits differ from an exact fp32
  dequantize-and-multiply by ~0.02 on the tests' tiny model;
- saving after that first forward inverts the repacking "best effort", and the inverse is lossy (the reloaded
  weights differ from the quantized ones: 0.36 logits without double quantization, 0.01 with it, on the same
  tiny model). So the pipeline saves a bitsandbytes checkpoint before it runs any forward pass, and the self-check
  then compares the in-memory model with the reloaded one, both repacked the same way from the same bytes.
The fused 4-bit CPU kernel comes from the `kernels` hub package, which is not reachable offline; the decode figures
say how fast this bitsandbytes runs on this CPU. On a GPU the same checkpoints run its CUDA kernels.
"""

from __future__ import annotations

from pathlib import Path

from compress.recipe import Variant

INSTALL_HINT = "install the optional extra: pip install -e '.[edge]' (bitsandbytes)"


def require():
    """bitsandbytes, or an ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"bitsandbytes variants need bitsandbytes ({e}); {INSTALL_HINT}") from None
    return bitsandbytes


def version() -> str | None:
    try:
        return require().__version__
    except ImportError:
        return None


def quantization_config(variant: Variant, model_dtype):
    """transformers' BitsAndBytesConfig for the variant. `ignore` names the modules kept unquantized
    (llm_int8_skip_modules; lm_head by default, as transformers does)."""
    import torch
    from transformers import BitsAndBytesConfig

    require()
    skip = list(variant.ignore) or None
    if variant.method == "bnb-nf4":
        compute = getattr(torch, variant.compute_dtype) if variant.compute_dtype else model_dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=bool(variant.double_quant),
                                  bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
    if variant.method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"variant {variant.name!r} is not a bitsandbytes method")


def load_quantized(folder: Path, variant: Variant, device: str, dtype):
    """Load the full-precision HF folder with bitsandbytes quantizing each Linear as it arrives.

    Raises RuntimeError with the reason when this machine's bitsandbytes cannot run the format (rather than
    producing figures from a model that silently stayed in full precision)."""
    from transformers import AutoModelForCausalLM

    config = quantization_config(variant, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype,
                                                     device_map=device)
    except Exception as e:
        raise RuntimeError(f"bitsandbytes {version()} could not quantize to {variant.scheme} on {device}: "
                           f"{type(e).__name__}: {e}") from e
    quantized = count_quantized_linears(model)
    if quantized == 0:
        raise RuntimeError(f"bitsandbytes {version()} left every Linear in full precision on {device}: "
                           f"{variant.scheme} is not available here")
    return model.eval()


def count_quantized_linears(model) -> int:
    """Linear layers that bitsandbytes replaced (Linear4bit / Linear8bitLt)."""
    bnb = require()
    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
