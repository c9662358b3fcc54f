"""Quantization through llm-compressor, the vLLM project's library. The only module that imports it.

A variant is two choices, both entries of the tables below: `method`, the algorithm that decides the weights
(METHODS), and `scheme`, the format it writes (SCHEMES: a compressed-tensors preset, the format `vllm serve` reads
natively), with an optional Hadamard rotation first (`rotate`, ROTATIONS). The variant becomes a list of
llm-compressor modifiers and one `oneshot` call on calibration windows we tokenized ourselves.

Everything that differs between methods or schemes is a field of their entry: which schemes a method can write,
whether it reads calibration text and how much by default, which options it takes with their defaults, which
optional package it needs, its modifiers; per scheme, its preset, bits, group, scales, whether its activation
scales are calibrated, and which vLLM kernel family serves it on what hardware. Validation, the scheme's name, the
size estimate, the cache key, the report and the model card read these entries; no other module compares a method
or scheme name. Adding a method is one entry in METHODS (README: "How to add a method or an engine").

Any method can add an fp8 KV cache (`kv_cache: {dtype: fp8}`): its quantizing modifier gets llm-compressor's
`kv_cache_scheme`, which makes the run calibrated (the K/V scales are observed on the calibration windows).

auto-gptq and autoawq are not used: both are archived and neither imports with transformers 5.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from types import SimpleNamespace
from typing import Any, Callable, Literal, NamedTuple

from pydantic import Field, PrivateAttr, field_validator, model_validator

from compress.options import VariantBase, field_error

log = logging.getLogger("compress")


class Scheme(NamedTuple):
    """A format llm-compressor writes into a compressed-tensors checkpoint, and what serving it takes."""

    preset: str  # the compressed-tensors preset it is built from (compressed_tensors.quantization.PRESET_SCHEMES)
    weights: str  # what is stored, in words
    activations: str  # what the weights are multiplied with, in words
    bits: int  # bits of information per weight (the grid it is rounded to)
    stored_bits: int  # bits each weight takes on disk, scales not counted
    symmetric: bool  # False: a zero point beside every scale
    group: int | None  # weights per scale, when the format fixes it; None: per output channel, or the recipe's
    #                    group_size when `groupable`
    groupable: bool  # integer weights: the recipe may set group_size (None: one scale per output channel)
    scale_bits: float | None  # bits of each scale per row; None: the checkpoint's dtype (fp32 on a CPU, bf16 on a GPU)
    calibrates: bool  # static activation scales, observed on calibration text
    vllm: str  # REFERENCE, read from vLLM 0.32's source, not measured here: the kernel family and the hardware it needs
    # the compute dtype the model must be in to build it and reload it; None: any. compressed-tensors 0.19
    # decompresses fp4 weights to bf16, so an fp32 model reloads them as bf16 weights beside fp32 activations and
    # every Linear raises "expected m1 and m2 to have the same dtype" (measured on the tests' tiny Llama)
    model_dtype: str | None = None

    @property
    def weight_only(self) -> bool:
        """Activations stay in 16 bits: only the weights change, so one layer's damage is the weights' alone."""
        return self.activations == "16-bit"

    def bits_per_weight(self, group_size: int | None, dtype_bits: int) -> float:
        """Stored bits per weight including its share of scales and zero points (zero points are packed at the
        weight's width). Per-channel and per-tensor scales are one number per row or matrix: counted as 0."""
        group = group_size or self.group
        if group is None:
            return float(self.stored_bits)
        per_group = (self.scale_bits or dtype_bits) + (0 if self.symmetric else self.stored_bits)
        return self.stored_bits + per_group / group


# REFERENCE, not measured: read from vLLM 0.32.0's source (compressed_tensors.py `_get_scheme_from_parts`, each
# scheme's get_min_capability, the kernel choosers in model_executor/kernels/linear/; file and line per scheme in
# benchmarks/results/vllm_scheme_kernels.md). Compute capability: 75 Turing, 80 Ampere, 89 Ada, 90 Hopper,
# 100 Blackwell. On vLLM's CPU build every capability check passes (the platform reports none), so the CPU column
# is what its kernel choosers accept.
_WNA16 = "GPU: Machete (sm90), Marlin (sm75+), Conch, Exllama; CPU: CPUWNA16 (x86 AVX2/AVX512; AMX bf16 path)"
SCHEMES: dict[str, Scheme] = {
    "W4A16": Scheme("W4A16", "int4 symmetric", "16-bit", 4, 4, True, None, True, None, False, _WNA16),
    "W4A16-asym": Scheme("W4A16_ASYM", "int4 with zero points", "16-bit", 4, 4, False, None, True, None, False,
                         _WNA16),
    "W8A16": Scheme("W8A16", "int8 symmetric", "16-bit", 8, 8, True, None, True, None, False,
                    "GPU: Machete, Marlin (sm75+), Conch, Exllama; CPU: none (CPUWNA16 takes uint4/uint4b8 only)"),
    "W8A16-asym": Scheme("W8A16", "int8 with zero points", "16-bit", 8, 8, False, None, True, None, False,
                         "GPU: Machete, Marlin (sm75+), Conch; CPU: none (CPUWNA16 takes uint4/uint4b8 only)"),
    "W8A8-INT8": Scheme("W8A8", "int8 per output channel", "int8 dynamic per token", 8, 8, True, None, False, None,
                        False, "GPU: CUTLASS int8 scaled_mm (sm75+); CPU: CPUInt8ScaledMM (AMX, else oneDNN)"),
    # an integer-weight scheme that also quantizes activations is saved int-quantized: one int4 per int8 byte
    "W4A8-INT": Scheme("W4A8", "int4 symmetric (stored one per byte)", "int8 dynamic per token", 4, 8, True, None,
                       True, None, False, "GPU: Humming only (unverified); CPU: Dynamic4bitLinear "
                                          "(torch _dyn_quant_matmul_4bit; KleidiAI on Arm)"),
    "W4AFP8": Scheme("W4AFP8", "int4 symmetric (stored one per byte)", "fp8 e4m3 dynamic per token", 4, 8, True,
                     None, True, None, False, "GPU: CUTLASS W4A8 (exactly sm90, group 128); CPU: none"),
    "FP8-dynamic": Scheme("FP8_DYNAMIC", "fp8 e4m3 per output channel", "fp8 e4m3 dynamic per token", 8, 8, True,
                          None, False, None, False, "GPU: CUTLASS/FlashInfer (sm89+), Marlin W8A16 (sm75+); "
                                                    "CPU: torch._scaled_mm (AMX-FP8 kernel on Diamond Rapids only)"),
    "FP8-static": Scheme("FP8", "fp8 e4m3 per tensor", "fp8 e4m3 static per tensor", 8, 8, True, None, False, None,
                         True, "GPU: CUTLASS/FlashInfer (sm89+), Marlin W8A16 (sm75+); CPU: CPUFp8PerTensor "
                               "(AMX tiles, bf16 activations), else torch._scaled_mm"),
    "FP8-block": Scheme("FP8_BLOCK", "fp8 e4m3, one scale per 128x128 block", "fp8 e4m3 dynamic per 128 channels",
                        # one fp32 scale per 128 x 128 block: per row, 32 / 128 bits for each 128 inputs
                        8, 8, True, 128, False, 0.25, False, "GPU: DeepGEMM/CUTLASS block (sm90+), Triton; "
                                                          "CPU: CPUFp8BlockScaledMM (AMX tiles only)"),
    "NVFP4": Scheme("NVFP4", "fp4 e2m1, fp8 scale per 16", "fp4 e2m1, fp8 scale per 16 (global scale calibrated)",
                    4, 4, True, 16, False, 8, True, "GPU: CUTLASS/FlashInfer FP4 (sm100+), Marlin weight-only "
                                                    "fallback (sm75+); CPU: none", "bfloat16"),
    "NVFP4A16": Scheme("NVFP4A16", "fp4 e2m1, fp8 scale per 16", "16-bit", 4, 4, True, 16, False, 8, False,
                       "GPU: Marlin FP4 (sm75+), FlashInfer CuteDSL (sm100); CPU: none", "bfloat16"),
    "MXFP4": Scheme("MXFP4", "fp4 e2m1, e8m0 scale per 32", "fp4 e2m1, e8m0 scale per 32 (dynamic)", 4, 4, True, 32,
                    False, 8, False, "GPU: FlashInfer (sm100), Marlin weight-only (sm80+); CPU: none", "bfloat16"),
    "MXFP4A16": Scheme("MXFP4A16", "fp4 e2m1, e8m0 scale per 32", "16-bit", 4, 4, True, 32, False, 8, False,
                       "GPU: Marlin FP4 (sm80+), FlashInfer (sm100); CPU: none", "bfloat16"),
}


class Method(NamedTuple):
    """An algorithm that decides the weights of a scheme, as llm-compressor modifiers."""

    schemes: tuple[str, ...]  # what it can write; the first is its default
    # the schemes it wrote before `scheme` was a recipe key: their cache key says them with bits and symmetric (and
    # `fp8` as the method's name), as it did then, so those checkpoints keep their keys
    first_schemes: tuple[str, ...]
    calibrates: bool  # reads calibration text
    options: dict[str, Any]  # the variant fields it takes -> default (None: the library's own default)
    modifiers: Callable  # (lib, variant, quantizing modifier's kwargs, model dtype) -> llm-compressor modifiers
    shape: tuple[int, int] | None = None  # default calibration (samples, seq_len) when the recipe sets none
    # an optional package it needs: (import name, distribution, pip install line); its version enters the cache key
    package: tuple[str, str, str] | None = None
    what: str = ""  # one line for the README and the model card


def _given(v, *names) -> dict:
    return {n: getattr(v, n) for n in names if getattr(v, n) is not None}


def _rtn(lib, v, q: dict, dtype=None) -> list:
    return [lib.quantization.QuantizationModifier(**q)]


def _gptq(lib, v, q: dict, dtype=None) -> list:
    return [lib.gptq.GPTQModifier(**q, **_given(v, "dampening_frac"))]


def _awq(lib, v, q: dict, dtype=None) -> list:
    return [lib.transform.AWQModifier(duo_scaling=True), lib.quantization.QuantizationModifier(**q)]


def _smoothquant_gptq(lib, v, q: dict, dtype=None) -> list:
    return [lib.transform.SmoothQuantModifier(smoothing_strength=v.smoothing_strength), *_gptq(lib, v, q, dtype)]


def _autoround(lib, v, q: dict, dtype=None) -> list:
    import torch
    from llmcompressor.modifiers.autoround import AutoRoundModifier

    class InModelDtype(AutoRoundModifier):
        """AutoRound tunes an fp32 model in fp32. llm-compressor 0.14 leaves auto-round's `amp` on, and on a CPU
        with bf16 support auto-round 0.15.1 then casts each decoder layer to bf16 while llm-compressor feeds it the
        fp32 model's activations: "expected m1 and m2 to have the same dtype" on the tests' fp32 model. A bf16
        model needs `amp` on (with it off the same error comes the other way round). The hook is the last thing
        llm-compressor calls with the AutoRound arguments before it builds the tuner."""

        def _update_device_map_for_dp(self, kwargs):
            kwargs["amp"] = dtype != torch.float32
            return super()._update_device_map_for_dp(kwargs)

    # torch.compile of the tuning loop costs more than it saves on a CPU and on a model this small
    return [InModelDtype(**q, iters=v.iters, enable_torch_compile=False, **_given(v, "lr"))]


_INT_W16 = ("W4A16", "W4A16-asym", "W8A16", "W8A16-asym")
METHODS: dict[str, Method] = {
    "rtn": Method(tuple(SCHEMES), _INT_W16 + ("FP8-dynamic",), False, {}, _rtn,
                  what="round to nearest, data-free (static activation scales, if the scheme has them, are observed)"),
    "gptq": Method(_INT_W16 + ("W8A8-INT8", "W4A8-INT", "W4AFP8"), _INT_W16, True, {"dampening_frac": None}, _gptq,
                   what="GPTQ: column by column, each rounding error spread over the columns not yet rounded"),
    "awq": Method(("W4A16-asym", "W4A16"), ("W4A16-asym", "W4A16"), True, {}, _awq,
                  # AWQ's grid search costs several times GPTQ's per calibration token (see Calibration.shape_for)
                  shape=(16, 256), what="AWQ: per-channel scales searched on activations, then round to nearest"),
    "smoothquant-gptq": Method(("W8A8-INT8", "W4A8-INT"), ("W8A8-INT8",), True,
                               {"smoothing_strength": 0.8, "dampening_frac": None}, _smoothquant_gptq,
                               what="SmoothQuant moves activation outliers into the weights, then GPTQ"),
    "autoround": Method(("W4A16", "W4A16-asym", "W8A16"), (), True, {"iters": 200, "lr": None}, _autoround,
                        package=("auto_round", "auto-round", "pip install auto-round==0.15.1"),
                        what="AutoRound: rounding offsets and clipping tuned by signed gradient descent per block"),
}
# a first-format method name that is another method writing a given scheme
ALIASES: dict[str, tuple[str, str]] = {"fp8": ("rtn", "FP8-dynamic")}
# Hadamard rotations applied before quantization (llm-compressor's transforms): they spread activation outliers over
# channels. SpinQuant's R1/R2 rotate the residual stream and each head's values and are fused into the neighbouring
# weights, so the checkpoint is an ordinary one. QuIP is not offered: its input rotation stays an online transform
# (`transform_config`) that transformers 5.17 does not apply when it reloads the checkpoint (self-check on the tests'
# tiny Llama: 3.7 logits apart), so the checkpoint would not load unchanged.
# name -> SpinQuantModifier's settings, keyed with the name (key_fields). "random-hadamard": a Hadamard matrix of any
# size with a known factor (SmolLM2's 576 = 16 x 36), from torch's default generator seed, so a rebuild is the same;
# the deterministic "hadamard" takes powers of two only ("Cannot construct deterministic hadamard of size != 2^n")
ROTATIONS: dict[str, dict] = {
    "spinquant": {"transform_type": "random-hadamard"},
}
# the method options every first-format variant hashed as null when unset; they keep that (see key_fields)
_FIRST_OPTIONS = ("smoothing_strength", "dampening_frac")


def scheme_table() -> list[dict]:
    """The formats table, as the README and `compress formats` print it: per scheme, its preset, bits per weight
    (g64 where the group is the recipe's, bf16 scales), which methods write it and what serves it."""
    return [{"scheme": name, "preset": s.preset, "weights": s.weights, "activations": s.activations,
             "bits_per_weight": round(s.bits_per_weight(64 if s.groupable else None, 16), 3),
             "calibrated": s.calibrates, "methods": [m for m, e in METHODS.items() if name in e.schemes],
             "vllm_reference": s.vllm} for name, s in SCHEMES.items()]


class LLMCompressorVariant(VariantBase):
    """A method of METHODS writing a scheme of SCHEMES into a compressed-tensors checkpoint.

    `bits` and `symmetric` are the first recipe format's way to choose a scheme (`method: gptq, bits: 8` is
    W8A16); they must agree with `scheme` when both are given, and are set from it after validation."""

    method: str
    scheme: str | None = None
    rotate: Literal["spinquant"] | None = None
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    smoothing_strength: float | None = Field(None, gt=0, lt=1)
    dampening_frac: float | None = Field(None, gt=0, lt=1)
    iters: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)

    _defaulted: set[str] = PrivateAttr(default_factory=set)  # options the recipe left to the method's defaults

    @classmethod
    def methods(cls) -> tuple[str, ...]:
        return (*METHODS, *ALIASES)

    @classmethod
    def methods_taking(cls, key: str) -> list[str]:
        if key in {o for m in METHODS.values() for o in m.options}:  # a method's own option
            return [n for n, m in METHODS.items() if key in m.options]
        return super().methods_taking(key)

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in cls.methods():
            raise ValueError(f"expected one of {list(cls.methods())}, got {method!r}")
        return method

    @model_validator(mode="before")
    @classmethod
    def _alias(cls, data):
        """`method: fp8` is rtn writing FP8-dynamic (the first format's name for it)."""
        if isinstance(data, dict) and data.get("method") in ALIASES:
            method, scheme = ALIASES[data["method"]]
            if data.get("scheme") not in (None, scheme):
                raise field_error("scheme", f"method {data['method']!r} writes {scheme}; for another scheme use "
                                            f"method {method!r} with that scheme")
            data = {**data, "method": method, "scheme": scheme}
        return data

    @model_validator(mode="after")
    def _method_rules(self) -> "LLMCompressorVariant":
        entry = METHODS[self.method]
        if self.scheme is None:  # the first format: bits and symmetric choose among the method's schemes
            fits = [s for s in entry.schemes if (self.bits is None or SCHEMES[s].bits == self.bits) and
                    (self.symmetric is None or SCHEMES[s].symmetric == self.symmetric)]
            if not fits:
                bits = {SCHEMES[s].bits for s in entry.schemes}
                field = "bits" if self.bits is not None and self.bits not in bits else "symmetric"
                raise field_error(field, f"method {self.method!r} writes no scheme with bits={self.bits}, "
                                         f"symmetric={self.symmetric}; it writes {list(entry.schemes)}")
            self.scheme = fits[0]
        elif self.scheme not in entry.schemes:
            known = "" if self.scheme in SCHEMES else f" (schemes: {list(SCHEMES)})"
            raise field_error("scheme", f"method {self.method!r} cannot write {self.scheme!r}; it writes "
                                        f"{list(entry.schemes)}{known}")
        s = SCHEMES[self.scheme]
        for field, value in (("bits", s.bits), ("symmetric", s.symmetric)):
            if getattr(self, field) not in (None, value):
                raise field_error(field, f"scheme {self.scheme!r} has {field}={value}, got {getattr(self, field)}")
        self.bits, self.symmetric = s.bits, s.symmetric
        if self.group_size is not None:
            if not s.groupable:
                how = f"in groups of {s.group} fixed by the format" if s.group else "per output channel"
                raise field_error("group_size", f"scheme {self.scheme!r} quantizes weights {how}; remove "
                                                f"group_size (got {self.group_size})")
            if self.group_size <= 0 or self.group_size & (self.group_size - 1):
                raise field_error("group_size", f"expected a power of two such as 32, 64 or 128, "
                                                f"got {self.group_size}")
        options = {o for m in METHODS.values() for o in m.options}
        for option in sorted(options):
            if option not in entry.options:
                if getattr(self, option) is not None:
                    takers = [n for n, m in METHODS.items() if option in m.options]
                    raise field_error(option, f"method {self.method!r} does not take {option}; only method"
                                              f"{'s' if len(takers) > 1 else ''} {', '.join(map(repr, takers))} do")
            elif getattr(self, option) is None:
                setattr(self, option, entry.options[option])
                self._defaulted.add(option)
        self._no_calibration_keys()
        return self

    @property
    def requires_dtype(self) -> str | None:
        """The compute dtype the model must be in to build and reload this scheme (checked before any work)."""
        return self.format.model_dtype

    @property
    def entry(self) -> Method:
        return METHODS[self.method]

    @property
    def format(self) -> Scheme:
        return SCHEMES[self.scheme]

    @property
    def calibrated(self) -> bool:
        return self.entry.calibrates or self.format.calibrates or super().calibrated

    @property
    def uses_llmcompressor(self) -> bool:
        return True

    @property
    def REQUIRES(self) -> tuple[str, str, str] | None:  # noqa: N802 - the name compress.checks reads on every class
        return self.entry.package

    @property
    def LIBRARY(self) -> str | None:  # noqa: N802 - the version compress.keys adds to the cache key (environment's key)
        return self.entry.package and self.entry.package[0]

    def calibration_extras(self) -> dict:
        return {"pipeline": PIPELINE}

    def default_calibration_shape(self) -> tuple[int, int] | None:
        return self.entry.shape

    def weight_format(self) -> tuple[int, int | None]:
        return self.format.stored_bits, self.group_size or self.format.group

    def key_fields(self) -> dict:
        """The first format's shape where it could say the variant: a first scheme is keyed by bits and symmetric
        (`fp8` by its old method name), and its unset first options as null; anything else adds `scheme`."""
        out = super().key_fields()
        if self.rotate:  # how it rotates, so that a change of transform is a new checkpoint
            out["rotate"] = {"name": self.rotate, **ROTATIONS[self.rotate]}
        alias = next((a for a, pair in ALIASES.items() if pair == (self.method, self.scheme)), None)
        if self.scheme in self.entry.first_schemes:
            del out["scheme"]
            out["method"] = alias or self.method
            for option in _FIRST_OPTIONS:
                if option in self._defaulted:
                    out[option] = None
        return out

    @property
    def label(self) -> str:
        """The scheme's conventional name, as vLLM and llm-compressor docs call it, with its group and rotation."""
        name = self.scheme
        if self.format.groupable:  # W4A16-g64, W4A16-channel-asym
            group = f"-g{self.group_size}" if self.group_size else "-channel"
            name = name.replace("-asym", "") + group + ("" if self.format.symmetric else "-asym")
        rotation = f" ({self.rotate} rotation)" if self.rotate else ""
        return name + rotation + self._suffix()

    def facts(self, dtype_bits: int) -> dict:
        """What the record, the report and the model card say about the format (from the tables)."""
        s = self.format
        return {"scheme": self.scheme, "preset": s.preset, "weights": s.weights, "activations": s.activations,
                "bits_per_weight": round(s.bits_per_weight(self.group_size, dtype_bits), 4),
                "group": self.group_size or s.group, "rotate": self.rotate, "method": self.entry.what,
                "vllm_reference": s.vllm}

    def build(self, job) -> dict:
        return build(job, self)


def build(job, v: VariantBase) -> dict:
    """A compressed-tensors checkpoint of `v` (also a `none` variant whose only change is an fp8 KV cache)."""
    from compress.build import transformers_checkpoint

    extra = {"format": v.facts(job.dtype.itemsize * 8)} if isinstance(v, LLMCompressorVariant) else None
    try:
        return transformers_checkpoint(job, v, _compress_step, quantized=True, after_save=release_session,
                                       extra=extra)
    finally:  # also when the variant failed: its model must not live on into the next one
        release_session()


def _compress_step(job, v: VariantBase, model, tok, weights, cal):
    batch = None
    if cal is not None:
        batch, cal = job.calibration_windows(cal, tok)
    log.info("stage compress: %s %s with llm-compressor", v.name, v.label)
    compress_model(model, v, batch)  # layer by layer, which is what lets an offloaded model calibrate
    return model, cal


def _lib():
    """llm-compressor and compressed-tensors, imported on first use (seconds of import time that a recipe check,
    a plan or a report never pay): a namespace with `oneshot`, `ct` (compressed_tensors.quantization) and the
    modifier packages `gptq`, `quantization`, `transform`."""
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
    return SimpleNamespace(oneshot=llmcompressor.oneshot, ct=ct, gptq=gptq, quantization=quantization,
                           transform=transform)


def weight_scheme(variant: LLMCompressorVariant):
    """The compressed-tensors scheme for one variant: what vLLM will read from config.json."""
    return scheme_for(variant.scheme, variant.group_size)


def scheme_for(scheme: str, group_size: int | None, targets: list[str] | None = None):
    """A SCHEMES entry as a compressed-tensors QuantizationScheme: its preset, with integer weights at `group_size`
    (None: per output channel) and the entry's symmetry, applied to `targets` (every Linear by default; module
    names for one config group of a mixed checkpoint)."""
    ct = _lib().ct
    s = SCHEMES[scheme]
    targets = list(targets or ["Linear"])
    preset = ct.preset_name_to_scheme(s.preset, targets)
    if not s.groupable:
        return preset
    weights = ct.QuantizationArgs(num_bits=s.bits, type="int", symmetric=s.symmetric,
                                  strategy="group" if group_size else "channel", group_size=group_size)
    extra = {"input_activations": preset.input_activations} if preset.input_activations else {}
    return ct.QuantizationScheme(targets=targets, weights=weights, **extra)


def fake_quantize_weights(weights: list, scheme: str, group_size: int | None) -> list:
    """Each weight rounded to `scheme`'s grid and back (round to nearest with min-max scales: what the `rtn` method
    writes), in its own dtype. The sensitivity analysis quantizes one serving unit at a time with it; the weights of
    a unit are those vLLM fuses into one matrix (q, k, v; gate, up), which share NVFP4's per-tensor global scale as
    llm-compressor's fused observers make them. compressed-tensors does the arithmetic, so the grid is the one the
    checkpoint's format really has (fp4 and fp8 included)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = scheme_for(scheme, group_size).weights
    strategy = str(getattr(args.strategy, "value", args.strategy))
    global_scale = None
    if strategy == "tensor_group":  # NVFP4: fp8 group scales under one fp32 scale per fused matrix
        absmax = torch.stack([w.detach().abs().max() for w in weights]).max().reshape(1)
        global_scale = generate_gparam(-absmax, absmax)
    out = []
    for weight in weights:
        w = weight.detach()  # in its own dtype, as llm-compressor's observers see it (bf16 rounds the scales)
        rows, cols = w.shape
        if strategy in ("group", "tensor_group"):
            view = w.reshape(rows, cols // args.group_size, args.group_size)
            low, high = view.amin(-1), view.amax(-1)
        elif strategy == "channel":
            low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            raise ValueError(f"scheme {scheme!r}: weights quantized by {strategy!r} are not simulated here")
        scale, zero_point = calculate_qparams(low, high, args, global_scale=global_scale)
        scale = scale.to(weight.dtype) if scale.is_floating_point() and scale.element_size() > 1 else scale
        out.append(fake_quantize(w, scale, zero_point, args, global_scale=global_scale).to(weight.dtype))
    return out


def kv_cache_scheme(variant: VariantBase):
    """llm-compressor's `kv_cache_scheme` for an fp8 KV cache: static symmetric e4m3 scales observed on the
    calibration data, one per tensor (each layer's K and V) or one per KV head ("attn_head"). They are saved as
    `model.layers.N.self_attn.k_scale` / `v_scale`, where vLLM looks for them. Integer KV formats are not written
    into the checkpoint: vLLM refuses a non-fp8 `kv_cache_scheme`, and the checkpoint must stay servable."""
    if not variant.kv_in_checkpoint:
        return None
    strategy = {"tensor": "tensor", "head": "attn_head"}[variant.kv_cache.granularity]
    return _lib().ct.QuantizationArgs(num_bits=8, type="float", strategy=strategy, dynamic=False, symmetric=True)


def build_modifiers(variant: VariantBase, dtype=None) -> list:
    """The llm-compressor recipe for a variant, as modifier objects (also saved as recipe.yaml in the checkpoint):
    the rotation, if any, then its method's modifiers, the quantizing one with the scheme, the ignore list and the
    fp8 KV scheme. A variant of another backend whose only llm-compressor part is an fp8 KV cache gets that alone."""
    lib = _lib()
    q = {"ignore": list(variant.ignore)}
    if scheme := kv_cache_scheme(variant):
        q["kv_cache_scheme"] = scheme
    if not isinstance(variant, LLMCompressorVariant):
        if "kv_cache_scheme" not in q:
            raise ValueError(f"variant {variant.name!r} changes nothing llm-compressor writes")
        return [lib.quantization.QuantizationModifier(**q)]
    rotation = []
    if variant.rotate:  # Hadamard transforms fused into the weights (and the online ones applied by vLLM)
        rotation = [lib.transform.SpinQuantModifier(**ROTATIONS[variant.rotate])]
    q["config_groups"] = {"group_0": weight_scheme(variant)}
    return rotation + variant.entry.modifiers(lib, variant, q, dtype)


PIPELINE = "sequential"  # the llm-compressor calibration pipeline every calibrated method runs under: see below


def compress_model(model, variant: VariantBase, windows: list[list[int]] | None, pipeline: str = PIPELINE) -> None:
    """Quantize `model` in place. `windows` are the calibration token windows (None for data-free methods).

    Every calibrated method runs under llm-compressor's "sequential" pipeline: one decoder layer at a time, each
    calibrated on the outputs of the layers before it *after* they were quantized, so GPTQ corrects the error the
    earlier layers made (as in the GPTQ paper). The "basic" pipeline (one pass through the unquantized model, all
    layers calibrated on clean inputs) was faster but lost to plain rounding in perplexity, where "sequential" beat
    both (SmolLM2-135M, GPTQ W4A16 g64, 64 x 512 tokens of C4, WikiText-2 test:
    benchmarks/results/calibration_gptq_c4_wikitext_basic_vs_sequential.txt).
    AWQ needs "sequential" anyway: its grid search replays each layer's cached inputs. So does an offloaded model:
    one layer in memory at a time. `pipeline="basic"` remains for that benchmark.

    Windows go through one at a time (llm-compressor's `batch_size=1`). Batching them did not pay on a 2-core CPU
    when it was tried: GPTQ, and the decoder's forward pass alone, got slower as the batch grew (a one-off check,
    no results file kept; benchmarks/results/compress_speed.txt has the batch-1 cost against its floor).
    """
    _oneshot(model, build_modifiers(variant, model.dtype), windows, pipeline)


def compress_mixed(model, variant: VariantBase, assignment: dict[str, list[str]], group_size: int | None,
                   method: str, ignore: list[str], windows: list[list[int]] | None) -> None:
    """Quantize `model` in place with one format per module: `assignment` maps a SCHEMES name to the full names of
    the modules it takes (one config group each, targets by exact name, so config.json says it per module and vLLM
    picks a kernel per group); `ignore` stays unquantized. `method`'s modifiers (METHODS) at its default options
    calibrate every group on the same windows; `variant`'s fp8 KV cache, if any, is calibrated with them."""
    lib = _lib()
    groups = {f"group_{k}": scheme_for(name, group_size if SCHEMES[name].groupable else None, targets=modules)
              for k, (name, modules) in enumerate((n, m) for n, m in assignment.items() if m)}
    q = {"ignore": list(ignore), "config_groups": groups}
    if kv := kv_cache_scheme(variant):
        q["kv_cache_scheme"] = kv
    options = SimpleNamespace(**METHODS[method].options)
    _oneshot(model, METHODS[method].modifiers(lib, options, q, model.dtype), windows, PIPELINE)


def _oneshot(model, modifiers: list, windows: list[list[int]] | None, pipeline: str) -> None:
    oneshot = _lib().oneshot
    if windows is None:
        oneshot(model=model, recipe=modifiers, pipeline="datafree")
        return
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    with _no_pinning_without_accelerator(), _one_product_per_input():
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

    Two holders, both found with gc.get_referrers on SmolLM2's lab run, whose peak RSS per variant grew over the sweep
    (benchmarks/results/compress_memory_release.md):
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


@contextlib.contextmanager
def _one_product_per_input():
    """GPTQ's Hessian of a Linear is the sum of X Xᵀ over its calibration inputs X. q, k and v read the same input
    tensor, and so do gate and up, so llm-compressor 0.14 computes the same product three times (and twice) per
    window: 7 products per decoder layer where 4 differ. Here each distinct input tensor is multiplied once and its
    product added to every Hessian that reads it: the same additions of the same numbers, so the Hessians, and the
    checkpoint, are bit-identical (tests/compress/backends/test_llmcompressor.py compares them;
    benchmarks/gptq_shared_inputs.py times both ways on SmolLM2 and compares their weights).

    "The same input" is the same tensor object at the same version (no in-place change since), held here until the
    next call so that its identity cannot be reused by another tensor."""
    import torch
    from llmcompressor.modifiers.gptq import base

    original = base.accumulate_hessian
    last: dict = {}

    def accumulate(inp, module, hessian, num_samples):
        if not isinstance(module, torch.nn.Linear):
            return original(inp, module, hessian, num_samples)
        seen = last.get("input") is inp and last["version"] == inp._version and \
            last["product"].shape == hessian.shape and last["product"].device == hessian.device
        if not seen:  # the original arithmetic on a zero Hessian: exactly the product (0 + x == x)
            product, added = original(inp, module, torch.zeros_like(hessian), torch.zeros_like(num_samples))
            last.update(input=inp, version=inp._version, product=product, added=added)
        hessian += last["product"]
        num_samples += last["added"]
        return hessian, num_samples

    base.accumulate_hessian = accumulate
    try:
        yield
    finally:
        base.accumulate_hessian = original
        last.clear()


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

    return {name: m.in_features for name, m in meta_model(config).named_modules()
            if isinstance(m, torch.nn.Linear) and not _ignored(name, m, ignore)}


def meta_model(config):
    """The model of `config` with its weights on the meta device: its module tree and shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
