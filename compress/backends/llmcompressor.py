"""Quantization through llm-compressor, the vLLM project's library. The only module that imports it.

A variant becomes a list of llm-compressor modifiers and one `oneshot` call on calibration windows we tokenized
ourselves. llm-compressor writes compressed-tensors checkpoints, the format `vllm serve` reads natively.

| method            | modifiers                                   | weights                   | activations          |
|-------------------|---------------------------------------------|---------------------------|----------------------|
| rtn               | QuantizationModifier (data-free)            | int4/int8, group or chan. | 16-bit               |
| gptq              | GPTQModifier                                | int4/int8, group or chan. | 16-bit               |
| awq               | AWQModifier + QuantizationModifier          | int4, group, asymmetric   | 16-bit               |
| smoothquant-gptq  | SmoothQuantModifier + GPTQModifier          | int8 per channel          | int8 dynamic/token   |
| fp8               | QuantizationModifier FP8_DYNAMIC (data-free)| fp8 e4m3 per channel      | fp8 dynamic/token    |
| none + fp8 KV     | QuantizationModifier(kv_cache_scheme) only  | unchanged                 | 16-bit               |

Any method can add an fp8 KV cache (`kv_cache: {dtype: fp8}`): its modifier gets llm-compressor's `kv_cache_scheme`,
which makes the run calibrated (the K/V scales are observed on the calibration windows).

auto-gptq and autoawq are not used: both are archived and neither imports with transformers 5.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from compress.options import VariantBase, field_error

log = logging.getLogger("compress")

# what each method can do: weight-only methods keep activations in 16 bits (A16); the two W8A8 methods also
# quantize activations, dynamically per token, so they need 8-bit weights
METHOD_BITS: dict[str, tuple[int, ...]] = {"rtn": (4, 8), "gptq": (4, 8), "awq": (4,), "smoothquant-gptq": (8,),
                                           "fp8": (8,)}
CALIBRATED_METHODS = ("gptq", "awq", "smoothquant-gptq")
GROUPED_METHODS = ("rtn", "gptq", "awq")  # methods whose weights may be quantized in groups along the input dim


class LLMCompressorVariant(VariantBase):
    """rtn / gptq / awq / smoothquant-gptq / fp8: integer or fp8 weights in a compressed-tensors checkpoint."""

    method: Literal["rtn", "gptq", "awq", "smoothquant-gptq", "fp8"]
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    smoothing_strength: float | None = Field(None, gt=0, lt=1)
    dampening_frac: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _method_rules(self) -> "LLMCompressorVariant":
        allowed = METHOD_BITS[self.method]
        if self.bits is None:
            self.bits = allowed[0]
        elif self.bits not in allowed:
            raise field_error("bits", f"method {self.method!r} supports bits in {list(allowed)}, got {self.bits}")
        if self.group_size is not None:
            if self.method not in GROUPED_METHODS:
                raise field_error("group_size", f"method {self.method!r} quantizes weights per channel; "
                                                f"remove group_size (got {self.group_size})")
            if self.group_size <= 0 or self.group_size & (self.group_size - 1):
                raise field_error("group_size", f"expected a power of two such as 32, 64 or 128, "
                                                f"got {self.group_size}")
        if self.symmetric is None:
            self.symmetric = self.method != "awq"  # AWQ's scales pair with zero points (llm-compressor W4A16_ASYM)
        elif not self.symmetric and self.method in ("smoothquant-gptq", "fp8"):
            raise field_error("symmetric", f"method {self.method!r} needs symmetric weights (vLLM's W8A8 kernels)")
        if self.smoothing_strength is not None and self.method != "smoothquant-gptq":
            raise field_error("smoothing_strength", "only method 'smoothquant-gptq' takes smoothing_strength")
        if self.dampening_frac is not None and self.method not in ("gptq", "smoothquant-gptq"):
            raise field_error("dampening_frac", "only the GPTQ methods take dampening_frac")
        self._no_calibration_keys()
        return self

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED_METHODS or super().calibrated

    @property
    def uses_llmcompressor(self) -> bool:
        return True

    def calibration_extras(self) -> dict:
        return {"pipeline": PIPELINE}

    @property
    def scheme(self) -> str:
        """The scheme's conventional name, as vLLM and llm-compressor docs call it."""
        if self.method == "fp8":
            return "FP8-dynamic" + self._suffix()
        if self.method == "smoothquant-gptq":
            return "W8A8-INT8" + self._suffix()
        group = f"-g{self.group_size}" if self.group_size else "-channel"
        return f"W{self.bits}A16{group}{'' if self.symmetric else '-asym'}" + self._suffix()

    def build(self, job) -> dict:
        return build(job, self)


def build(job, v: VariantBase) -> dict:
    """A compressed-tensors checkpoint of `v` (also a `none` variant whose only change is an fp8 KV cache)."""
    from compress.build import transformers_checkpoint

    try:
        return transformers_checkpoint(job, v, _compress_step, quantized=True, after_save=release_session)
    finally:  # also when the variant failed: its model must not live on into the next one
        release_session()


def _compress_step(job, v: VariantBase, model, tok, weights, cal):
    batch = None
    if cal is not None:
        batch, cal = job.calibration_windows(cal, tok)
    log.info("stage compress: %s %s with llm-compressor", v.name, v.scheme)
    compress_model(model, v, batch)  # layer by layer, which is what lets an offloaded model calibrate
    return model, cal


def _lib():
    """llm-compressor and compressed-tensors, imported on first use (seconds of import time that a recipe check,
    a plan or a report never pay)."""
    try:
        # llm-compressor's logger writes to whatever sys.stdout is when it is imported, and it logs during import;
        # stdout is where `compress plan` prints its JSON, so let it bind to stderr instead.
        with contextlib.redirect_stdout(sys.stderr):
            import llmcompressor
        import compressed_tensors.quantization as ct
        import llmcompressor.modifiers.gptq as gptq
        import llmcompressor.modifiers.quantization as quantization
        import llmcompressor.modifiers.transform as transform
    except ImportError as e:  # pragma: no cover - exercised only on a broken install
        raise ImportError(f"compress needs llm-compressor for quantization ({e}); install it with "
                          f"`pip install -e .`") from e
    return llmcompressor, ct, gptq, quantization, transform


def weight_scheme(variant: VariantBase):
    """The compressed-tensors scheme for one variant: what vLLM will read from config.json."""
    _, ct, _, _, _ = _lib()
    if variant.method == "fp8":
        from compressed_tensors.quantization import preset_name_to_scheme

        return preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    if variant.method == "smoothquant-gptq":
        from compressed_tensors.quantization import preset_name_to_scheme

        return preset_name_to_scheme("W8A8", ["Linear"])
    weights = ct.QuantizationArgs(
        num_bits=variant.bits,
        type="int",
        symmetric=variant.symmetric,
        strategy="group" if variant.group_size else "channel",
        group_size=variant.group_size,
    )
    return ct.QuantizationScheme(targets=["Linear"], weights=weights)


def kv_cache_scheme(variant: VariantBase):
    """llm-compressor's `kv_cache_scheme` for an fp8 KV cache: static symmetric e4m3 scales observed on the
    calibration data, one per tensor (each layer's K and V) or one per KV head ("attn_head"). They are saved as
    `model.layers.N.self_attn.k_scale` / `v_scale`, where vLLM looks for them. Integer KV formats are not written
    into the checkpoint: vLLM refuses a non-fp8 `kv_cache_scheme`, and the checkpoint must stay servable."""
    if not variant.kv_in_checkpoint:
        return None
    strategy = {"tensor": "tensor", "head": "attn_head"}[variant.kv_cache.granularity]
    return _lib()[1].QuantizationArgs(num_bits=8, type="float", strategy=strategy, dynamic=False, symmetric=True)


def build_modifiers(variant: VariantBase) -> list:
    """The llm-compressor recipe for a variant, as modifier objects (also saved as recipe.yaml in the checkpoint)."""
    _, _, gptq, quantization, transform = _lib()
    QuantizationModifier, GPTQModifier = quantization.QuantizationModifier, gptq.GPTQModifier
    ignore = list(variant.ignore)
    kv = {"kv_cache_scheme": scheme} if (scheme := kv_cache_scheme(variant)) else {}
    if variant.method == "none":
        if not kv:
            raise ValueError(f"variant {variant.name!r} changes nothing llm-compressor writes")
        return [QuantizationModifier(ignore=ignore, **kv)]
    groups = {"group_0": weight_scheme(variant)}
    if variant.method in ("rtn", "fp8"):
        return [QuantizationModifier(config_groups=groups, ignore=ignore, **kv)]
    gptq_kwargs = {"dampening_frac": variant.dampening_frac} if variant.dampening_frac else {}
    if variant.method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=ignore, **gptq_kwargs, **kv)]
    if variant.method == "awq":
        return [transform.AWQModifier(duo_scaling=True),
                QuantizationModifier(config_groups=groups, ignore=ignore, **kv)]
    if variant.method == "smoothquant-gptq":
        return [transform.SmoothQuantModifier(smoothing_strength=variant.smoothing_strength or 0.8),
                GPTQModifier(config_groups=groups, ignore=ignore, **gptq_kwargs, **kv)]
    raise ValueError(f"no modifiers for method {variant.method!r}")


PIPELINE = "sequential"  # the llm-compressor calibration pipeline every calibrated method runs under: see below


def compress_model(model, variant: VariantBase, windows: list[list[int]] | None, pipeline: str = PIPELINE) -> None:
    """Quantize `model` in place. `windows` are the calibration token windows (None for data-free methods).

    Every calibrated method runs under llm-compressor's "sequential" pipeline: one decoder layer at a time, each
    calibrated on the outputs of the layers before it *after* they were quantized, so GPTQ corrects the error the
    earlier layers made (as in the GPTQ paper). The "basic" pipeline (one pass through the unquantized model, all
    layers calibrated on clean inputs) was 26% faster but lost to plain rounding: SmolLM2-135M, GPTQ W4A16 g64,
    64 x 512 tokens of C4, WikiText-2 test (20 windows): RTN ppl 51.45 / KL 0.462, GPTQ basic 51.88 / 0.355 in 93 s,
    GPTQ sequential 49.39 / 0.310 in 125 s (benchmarks/calibration_sweep.py --pipelines basic sequential).
    AWQ needs "sequential" anyway: its grid search replays each layer's cached inputs. So does an offloaded model:
    one layer in memory at a time. `pipeline="basic"` remains for that benchmark.

    Windows go through one at a time (llm-compressor's `batch_size=1`). Batching them does not pay on a CPU: GPTQ
    W4A16 on 64 x 512 tokens took 189 s at batch 1, 223 s at 16 and 262 s at 64 (2-core AMD EPYC, fp32), and a
    batched forward pass of the decoder alone was no faster either (62 / 66 / 70 s).
    """
    modifiers = build_modifiers(variant)
    oneshot = _lib()[0].oneshot
    if windows is None:
        oneshot(model=model, recipe=modifiers, pipeline="datafree")
        return
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    with _no_pinning_without_accelerator():
        oneshot(
            model=model,
            recipe=modifiers,
            dataset=ds,
            num_calibration_samples=len(windows),
            max_seq_length=len(windows[0]),
            shuffle_calibration_samples=False,
            pipeline=pipeline,
        )


def release_session() -> None:
    """Drop what llm-compressor keeps of the last model it compressed, so that nothing of one variant is alive while
    the next one is built. Called after the checkpoint is saved (saving writes the session's recipe.yaml).

    Two holders, both found with gc.get_referrers on SmolLM2's lab run (peak RSS per variant rose 0.64 -> 3.51 GB):
    - the global session, whose state keeps the model and its hooks;
    - torch.fx's global registry of wrapped functions (`torch.fx.wrap`). The sequential pipeline compiles each
      model's forward (and each traced subgraph) with `exec` into a fresh namespace that holds the model as `self`,
      and the code registers its wrapped functions with that namespace; llm-compressor never removes the entries.
      They are the entries whose namespace is not a module's own `__dict__` (a `torch.fx.wrap` at import time, the
      documented use, registers the module's globals), and nothing traces between two variants, so they can go.
    """
    import sys

    from llmcompressor.core import active_session

    active_session().reset()
    try:
        from torch.fx import _symbolic_trace
    except ImportError:
        return
    registry = getattr(_symbolic_trace, "_wrapped_fns_to_patch", None)
    if isinstance(registry, dict):
        for key, namespace in list(registry.items()):
            module = sys.modules.get(namespace.get("__name__", ""))
            if module is None or vars(module) is not namespace:
                del registry[key]


@contextlib.contextmanager
def _no_pinning_without_accelerator():
    """llm-compressor 0.14's AWQ pins its cached activations in page-locked memory to speed up host-to-GPU copies;
    on a CPU-only torch, pin_memory() raises "Cannot access accelerator device". Pinning buys nothing without an
    accelerator, so skip it there (and only there, and only for the duration of the call)."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def _ignored(name: str, module, ignore: list[str]) -> bool:
    """llm-compressor's matching rules: exact or suffix name, `re:` regex on the name, or the class name."""
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern) or type(module).__name__ == pattern:
            return True
    return False


def quantized_input_widths(config, ignore: list[str]) -> dict[str, int]:
    """Input width of every Linear a variant will quantize, from the config alone (weights on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: m.in_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not _ignored(name, m, ignore)}
