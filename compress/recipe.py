"""The recipe: one YAML file that says which model, which calibration data, which variants, where to write.

Every model here rejects unknown keys (`extra="forbid"`): a typo such as `group_szie` must fail loudly instead of
silently falling back to a default and producing a checkpoint the user did not ask for. Validation happens in two
steps, both before any weights are loaded:

1. `load_recipe` parses the YAML and checks types, ranges and per-method rules (pure, no I/O beyond the file).
2. `pipeline.check_inputs` checks the recipe against the world: the files it names exist and the group size
   divides the width of every layer it will quantize (read from the model's config, not its weights).

Either step raises `InputError` whose message names the file, the field path and what was expected; the CLI turns
it into exit code 2 with nothing written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

EMBEDDED_MODEL = "smollm2-135m"

# What each method can do. Weight-only methods keep activations in 16 bits (A16); the two W8A8 methods also
# quantize activations, dynamically per token, so they need 8-bit weights.
METHOD_BITS: dict[str, tuple[int, ...]] = {
    "baseline": (),
    "none": (),  # weights left as they are: a variant that changes only the KV cache
    "rtn": (4, 8),
    "gptq": (4, 8),
    "awq": (4,),
    "smoothquant-gptq": (8,),
    "fp8": (8,),
    "bnb-nf4": (4,),
    "bnb-int8": (8,),
    "gguf": (),  # the bits follow from gguf_type (GGUF_TYPE_BITS)
}
CALIBRATED_METHODS = ("gptq", "awq", "smoothquant-gptq")
GROUPED_METHODS = ("rtn", "gptq", "awq")  # methods whose weights may be quantized in groups along the input dim
BNB_METHODS = ("bnb-nf4", "bnb-int8")  # quantized by bitsandbytes as transformers loads the weights

# llama.cpp file types a GGUF variant can ask for, with the nominal bits of their main weights. F32/F16/BF16 come
# straight from llama.cpp's converter; the others from its quantizer (llama_model_quantize), which picks the type
# of each tensor itself: a "_M"/"_S" mixture gives some tensors more bits, and a tensor whose row length is not a
# multiple of the type's block (256 for the K-quants) falls back to a 32-block type. The report lists the types the
# file really holds.
GGUF_TYPE_BITS: dict[str, int] = {
    "F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8, "Q6_K": 6, "Q5_K_M": 5, "Q5_K_S": 5, "Q5_1": 5, "Q5_0": 5,
    "Q4_K_M": 4, "Q4_K_S": 4, "Q4_1": 4, "Q4_0": 4, "Q3_K_L": 3, "Q3_K_M": 3, "Q3_K_S": 3, "Q2_K": 2,
}
GGUF_UNQUANTIZED = ("F32", "F16", "BF16")


# what compress writes beside the checkpoint folders in an output folder: a variant may not be named like them
RESERVED_NAMES = frozenset({"eval", "results.json", "report.md", "report.html", "results.csv"})


class InputError(Exception):
    """Bad user input (recipe, file, model source). The CLI prints it and exits with code 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Offload(_Strict):
    """Compress a model bigger than memory: at most `max_cpu_memory_gb` of its weights stay in RAM, the rest waits on
    disk in `folder`, and calibration runs layer by layer (llm-compressor's sequential pipeline onloads one decoder
    layer at a time). Slower than in-memory (every layer is read from disk), so only for models that do not fit."""

    max_cpu_memory_gb: float = Field(gt=0)
    folder: str | None = None  # default: <output>/.offload (deleted after each variant)


class ModelSpec(_Strict):
    """Where the model comes from and how it is computed while compressing."""

    source: str = Field(EMBEDDED_MODEL, description="'smollm2-135m', a hub id, a local HF folder or a .gguf file")
    gguf_file: str | None = Field(None, description="GGUF file name inside `source` when source is a folder")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    offload: Offload | None = None  # null: the whole model in memory


class Calibration(_Strict):
    """Text the calibrated methods (GPTQ, AWQ, SmoothQuant) observe. Never an evaluation split."""

    source: str = Field(description="a .jsonl/.json/.txt file, or a hub dataset id")
    text_field: str = "text"
    split: str = "train"  # hub datasets only
    samples: int = Field(64, gt=0)
    seq_len: int = Field(512, gt=0)
    seed: int = 0

    def shape_for(self, method: str) -> tuple[int, int]:
        """(samples, seq_len) a method calibrates on when neither its variant nor this section says otherwise.

        Chosen from benchmarks/calibration_sweep.py on SmolLM2-135M (C4, W4A16 g64, 2-core CPU, WikiText-2 test KL to
        the baseline): GPTQ 16 / 64 / 128 x 512 tokens gave KL 0.363 / 0.310 / 0.304 in 49 / 125 / 235 s, so 64 x 512
        is the knee. AWQ's grid search costs ~28 ms per calibration token here: 16 x 256 gave KL 0.195 in 117 s,
        64 x 256 gave 0.189 in 439 s, so AWQ defaults to 16 x 256 unless the recipe sets a shape."""
        if method == "awq":
            return (self.samples if "samples" in self.model_fields_set else 16,
                    self.seq_len if "seq_len" in self.model_fields_set else 256)
        return self.samples, self.seq_len


class KVCache(_Strict):
    """How the attention keys and values are stored at serving time (see compress/kvcache.py for the formats).

    - fp8 (e4m3), granularity `tensor` (default) or `head`: static scales calibrated by llm-compressor and saved in
      the checkpoint as `self_attn.k_scale` / `v_scale`, which vLLM reads with `--kv-cache-dtype fp8` (per-head
      scales need vLLM's FlashAttention-3 backend).
    - int8 / int4, granularity `token` (default: one scale and minimum per token and head, or per `group_size`
      channels of it) or `channel` (KIVI: keys per channel over groups of `group_size` tokens, default 32; values
      per token). Computed as each token enters the cache, so no calibration. vLLM has no integer KV cache: these
      are measured for engines that have one (llama.cpp `--cache-type-k q8_0|q4_0`, transformers' QuantizedCache).
    - bf16 / fp16: the 16-bit cache every engine uses by default; on a CPU run in fp32 it shows the rounding alone.
    """

    dtype: Literal["fp8", "int8", "int4", "bf16", "fp16"]
    granularity: Literal["tensor", "head", "token", "channel"] | None = None
    group_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _dtype_rules(self) -> "KVCache":
        if self.dtype in ("bf16", "fp16"):
            if self.granularity is not None or self.group_size is not None:
                raise _field_error("granularity", f"a {self.dtype} cache has no scales; remove granularity/group_size")
        elif self.dtype == "fp8":
            self.granularity = self.granularity or "tensor"
            if self.granularity not in ("tensor", "head"):
                raise _field_error("granularity", f"fp8 KV uses static scales, per 'tensor' or per 'head' (what vLLM "
                                                  f"reads), got {self.granularity!r}")
            if self.group_size is not None:
                raise _field_error("group_size", "fp8 KV scales are per tensor or per head; remove group_size")
        else:
            self.granularity = self.granularity or "token"
            if self.granularity not in ("token", "channel"):
                raise _field_error("granularity", f"{self.dtype} KV is quantized as each token enters the cache, per "
                                                  f"'token' or per 'channel' (KIVI keys), got {self.granularity!r}; "
                                                  f"static per-tensor/per-head scales are for fp8")
        return self

    @property
    def calibrated(self) -> bool:
        """fp8 scales are observed on calibration data; the other formats need none."""
        return self.dtype == "fp8"

    @property
    def label(self) -> str:
        if self.granularity is None:
            return f"KV-{self.dtype}"
        group = f"-g{self.group_size}" if self.group_size else ""
        return f"KV-{self.dtype}-{self.granularity}{group}"


class Student(_Strict):
    """Which decoder layers the student keeps: give `layers` (keep that many, dropping the least important ones by
    block influence measured on the training text) or `drop` (exactly these teacher layer indices)."""

    layers: int | None = Field(None, gt=0)
    drop: list[int] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> "Student":
        if (self.layers is None) == (self.drop is None):
            raise _field_error("layers", "give exactly one of layers (how many to keep) or drop (which to remove)")
        if self.drop is not None and len(set(self.drop)) != len(self.drop):
            raise _field_error("drop", f"layer indices repeat: {self.drop}")
        return self


class Distill(_Strict):
    """A smaller student: depth-pruned from the teacher, then trained to match the teacher's next-token
    distributions (logit distillation) on `data`. Plain PyTorch (distill/). `steps: 0` is the pruned student
    without training, the row that shows what training bought."""

    student: Student
    data: str = "../shared/data/calibration/c4_validation_2k.jsonl"  # training text; never an evaluation split
    text_field: str = "text"
    steps: int = Field(300, ge=0)  # optimizer steps
    batch: int = Field(8, gt=0)  # sequences per optimizer step
    micro_batch: int = Field(4, gt=0)  # sequences per forward/backward; batch / micro_batch = accumulation steps
    seq_len: int = Field(256, gt=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int | None = Field(None, ge=0)  # default: 10% of steps
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr x min_lr_ratio
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0)  # 1: the distributions that perplexity and KL evaluate
    ce_weight: float = Field(0.0, ge=0, le=1)  # loss = (1 - w) KL x T^2 + w CE(text)
    importance_samples: int = Field(16, gt=0)  # windows of `data` the block influence is measured on
    checkpoint_every: int = Field(50, gt=0)  # steps between resumable training checkpoints
    seed: int = 0

    @model_validator(mode="after")
    def _batch_divides(self) -> "Distill":
        if self.batch % self.micro_batch:
            raise _field_error("micro_batch", f"must divide batch ({self.batch}), got {self.micro_batch}")
        return self

    @property
    def accumulation(self) -> int:
        return self.batch // self.micro_batch


class Variant(_Strict):
    """One row of the comparison table and one checkpoint directory."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    method: Literal["baseline", "none", "rtn", "gptq", "awq", "smoothquant-gptq", "fp8", "bnb-nf4", "bnb-int8",
                    "gguf"]
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    smoothing_strength: float | None = Field(None, gt=0, lt=1)
    dampening_frac: float | None = Field(None, gt=0, lt=1)
    samples: int | None = Field(None, gt=0)  # overrides calibration.samples for this variant
    seq_len: int | None = Field(None, gt=0)  # overrides calibration.seq_len for this variant
    kv_cache: KVCache | None = None  # None: the model's own dtype (16-bit when served)
    distill: Distill | None = None  # train a smaller student first; the method then quantizes the student
    # bitsandbytes NF4: the dtype its matmuls run in (default: the model's compute dtype, fp32 on CPU) and double
    # quantization (the per-block absmax scales quantized again to 8 bits; saves ~0.4 bits per weight)
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    double_quant: bool | None = None
    # GGUF: the llama.cpp file type, and whether to quantize with an importance matrix observed on the calibration
    # data (llama-imatrix's statistic: the mean squared activation of each input column of each weight)
    gguf_type: str | None = None
    imatrix: bool | None = None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} is a name compress uses in the output folder; choose another variant name "
                             f"(reserved: {sorted(RESERVED_NAMES)})")
        return name

    @model_validator(mode="after")
    def _method_rules(self) -> "Variant":
        self._backend_rules()
        if self.method in BNB_METHODS + ("gguf",):
            return self
        allowed = METHOD_BITS[self.method]
        if self.method in ("baseline", "none"):
            extra = [k for k in ("bits", "group_size", "symmetric", "smoothing_strength", "dampening_frac")
                     if getattr(self, k) is not None]
            if self.method == "baseline":
                extra += [k for k in ("kv_cache", "distill") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"method {self.method!r} takes no weight quantization settings, remove {extra}"
                                 + (" (for the baseline's weights with a quantized KV cache or a distilled student "
                                    "use method 'none')" if {"kv_cache", "distill"} & set(extra) else ""))
            if self.method == "none" and self.kv_cache is None and self.distill is None:
                raise _field_error("kv_cache", "method 'none' leaves the weights alone, so it needs a kv_cache or "
                                               "distill setting (otherwise it is the baseline)")
            if (self.samples or self.seq_len) and not self.calibrated:
                raise ValueError(f"variant {self.name!r} uses no calibration data; remove samples/seq_len")
            return self
        if self.bits is None:
            self.bits = allowed[0]
        elif self.bits not in allowed:
            raise _field_error("bits", f"method {self.method!r} supports bits in {list(allowed)}, got {self.bits}")
        if self.group_size is not None:
            if self.method not in GROUPED_METHODS:
                raise _field_error("group_size", f"method {self.method!r} quantizes weights per channel; "
                                                 f"remove group_size (got {self.group_size})")
            if self.group_size <= 0 or self.group_size & (self.group_size - 1):
                raise _field_error("group_size", f"expected a power of two such as 32, 64 or 128, "
                                                 f"got {self.group_size}")
        if self.symmetric is None:
            self.symmetric = self.method != "awq"  # AWQ's scales pair with zero points (llm-compressor W4A16_ASYM)
        elif not self.symmetric and self.method in ("smoothquant-gptq", "fp8"):
            raise _field_error("symmetric", f"method {self.method!r} needs symmetric weights (vLLM's W8A8 kernels)")
        if self.smoothing_strength is not None and self.method != "smoothquant-gptq":
            raise _field_error("smoothing_strength", "only method 'smoothquant-gptq' takes smoothing_strength")
        if self.dampening_frac is not None and self.method not in ("gptq", "smoothquant-gptq"):
            raise _field_error("dampening_frac", "only the GPTQ methods take dampening_frac")
        if (self.samples or self.seq_len) and not self.calibrated:
            raise ValueError(f"method {self.method!r} uses no calibration data; remove samples/seq_len")
        return self

    def _backend_rules(self) -> None:
        """bitsandbytes and GGUF variants: their own keys, and none of the llm-compressor ones.

        Their formats are fixed by the backend (NF4 blocks of 64, LLM.int8 per row, llama.cpp's block types), so
        bits, group_size, symmetric and the GPTQ/SmoothQuant knobs would be ignored; say so instead."""
        mine = {"bnb-nf4": ("compute_dtype", "double_quant"), "bnb-int8": (), "gguf": ("gguf_type", "imatrix")}
        for key in ("compute_dtype", "double_quant", "gguf_type", "imatrix"):
            if getattr(self, key) is not None and key not in mine.get(self.method, ()):
                owner = next(m for m, keys in mine.items() if key in keys)
                raise _field_error(key, f"only method {owner!r} takes {key}")
        if self.method not in mine:
            return
        foreign = [k for k in ("bits", "group_size", "symmetric", "smoothing_strength", "dampening_frac")
                   if getattr(self, k) is not None]
        if foreign:
            raise ValueError(f"method {self.method!r} fixes its own format; remove {foreign}"
                             + (" (choose the llama.cpp type with gguf_type)" if self.method == "gguf" else ""))
        if self.kv_cache is not None:
            raise _field_error("kv_cache", f"method {self.method!r} keeps its engine's own KV cache; quantized KV "
                                           f"caches go with methods none/rtn/gptq/awq/smoothquant-gptq/fp8")
        if self.method == "gguf":
            if self.gguf_type is None:
                raise _field_error("gguf_type", f"method 'gguf' needs a llama.cpp file type, one of "
                                                f"{list(GGUF_TYPE_BITS)}")
            if self.gguf_type.upper() not in GGUF_TYPE_BITS:
                raise _field_error("gguf_type", f"expected one of {list(GGUF_TYPE_BITS)}, got {self.gguf_type!r}")
            self.gguf_type = self.gguf_type.upper()
            if self.imatrix and self.gguf_type in GGUF_UNQUANTIZED:
                raise _field_error("imatrix", f"{self.gguf_type} is not quantized; an importance matrix changes "
                                              f"nothing")
            if "ignore" in self.model_fields_set:
                raise _field_error("ignore", "llama.cpp chooses each tensor's type itself (the file type's "
                                             "mixture); remove ignore")
            self.bits = GGUF_TYPE_BITS[self.gguf_type]
        else:
            self.bits = METHOD_BITS[self.method][0]
            if self.method == "bnb-nf4" and self.double_quant is None:
                self.double_quant = True
        if (self.samples or self.seq_len) and not self.calibrated:
            raise ValueError(f"method {self.method!r} uses no calibration data here; remove samples/seq_len"
                             + (" (or set imatrix: true)" if self.method == "gguf" else ""))

    @property
    def calibrated(self) -> bool:
        """Needs calibration text: a calibrated weight method, fp8 KV scales, or a GGUF importance matrix."""
        return (self.method in CALIBRATED_METHODS or bool(self.kv_cache and self.kv_cache.calibrated)
                or bool(self.method == "gguf" and self.imatrix))

    @property
    def uses_llmcompressor(self) -> bool:
        """Built by llm-compressor (a compressed-tensors checkpoint), rather than by bitsandbytes or llama.cpp, or
        saved unchanged."""
        return self.method not in ("baseline", "none", "gguf") + BNB_METHODS or self.kv_in_checkpoint

    @property
    def kv_in_checkpoint(self) -> bool:
        """The KV format is part of the checkpoint (scales + kv_cache_scheme that vLLM reads); otherwise it is
        applied at evaluation time only, as an engine with that cache format would."""
        return bool(self.kv_cache and self.kv_cache.dtype == "fp8")

    @property
    def scheme(self) -> str:
        """The scheme's conventional name, as vLLM and llm-compressor docs call it, plus the KV format and the
        student, if any."""
        kv = f" + {self.kv_cache.label}" if self.kv_cache else ""
        if self.distill:
            d = self.distill
            layers = f"{d.student.layers}L" if d.student.layers else f"drop{len(d.student.drop)}"
            kv += f" (student {layers}, {'KD ' + str(d.steps) + ' steps' if d.steps else 'pruned, untrained'})"
        if self.method in ("baseline", "none"):
            return "unquantized" + kv
        if self.method == "bnb-nf4":
            return f"NF4{'-dq' if self.double_quant else ''} (bitsandbytes)" + kv
        if self.method == "bnb-int8":
            return "LLM.int8 (bitsandbytes)" + kv
        if self.method == "gguf":
            return f"GGUF {self.gguf_type}{' imatrix' if self.imatrix else ''}" + kv
        if self.method == "fp8":
            return "FP8-dynamic" + kv
        if self.method == "smoothquant-gptq":
            return "W8A8-INT8" + kv
        group = f"-g{self.group_size}" if self.group_size else "-channel"
        return f"W{self.bits}A16{group}{'' if self.symmetric else '-asym'}" + kv


class PerplexitySettings(_Strict):
    """Token perplexity and KL to the baseline on one text file, in windows of `context` tokens."""

    file: str = "wikitext2_raw_wiki.test.raw"  # relative to evaluation.data_dir
    context: int = Field(512, gt=1)
    stride: int = Field(512, gt=0)
    max_windows: int | None = Field(40, gt=0)  # None: the whole file (~300k tokens: slow on a CPU)

    @model_validator(mode="after")
    def _stride_within_context(self) -> "PerplexitySettings":
        if self.stride > self.context:
            raise _field_error("stride", f"expected at most context ({self.context}), got {self.stride}")
        return self


class ThroughputSettings(_Strict):
    """Decode benchmark: a prompt of `prompt_tokens`, then exactly `new_tokens` greedy tokens, per batch size."""

    prompt_tokens: int = Field(128, gt=0)
    new_tokens: int = Field(64, gt=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 4], min_length=1)  # llama.cpp rows: batch 1 only
    repeats: int = Field(3, gt=0)
    # threads of the llama.cpp engine (GGUF rows); None: every core this process may use. On a 2-core machine
    # where another process holds a core, llama.cpp's spin-waiting threads collapse and 1 thread is faster: this
    # is a setting because the best value is a property of the machine, measured by benchmarks/edge_speed.py.
    llamacpp_threads: int | None = Field(None, gt=0)


class PlannerSettings(_Strict):
    """The serving shape the memory planner sizes the KV cache for (`compress plan`, `--dry-run`)."""

    context: int = Field(4096, gt=0)
    batch: int = Field(1, gt=0)
    headroom: float = Field(0.10, ge=0, lt=1)  # fraction of GPU memory kept free (activations, CUDA context)


class Evaluation(_Strict):
    """How each saved checkpoint is checked and measured: self-check, perplexity/KL, lm-eval tasks, throughput."""

    selfcheck_prompts: list[str] = Field(
        default_factory=lambda: [
            "The capital of France is",
            "def fibonacci(n):",
            "In 1969, the first humans landed on",
        ],
        min_length=1,
    )
    selfcheck_max_abs_diff: float = Field(1e-3, ge=0)  # reloaded vs in-memory logits
    data_dir: str = "../shared/data"  # where the task and perplexity files are
    tasks: list[str] = Field(default_factory=list)  # names of eval/tasks/*.yaml, e.g. [hellaswag, arc_easy]
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(200, gt=0)  # documents per task (the first N); None: the whole split
    batch_size: int = Field(16, gt=0)
    perplexity: PerplexitySettings | None = Field(default_factory=PerplexitySettings)  # null: skip
    throughput: ThroughputSettings | None = Field(default_factory=ThroughputSettings)  # null: skip
    planner: PlannerSettings = Field(default_factory=PlannerSettings)

    @property
    def enabled(self) -> bool:
        return bool(self.tasks or self.perplexity or self.throughput)


class Recipe(_Strict):
    model: ModelSpec = Field(default_factory=ModelSpec)
    calibration: Calibration | None = None
    variants: list[Variant] = Field(min_length=1)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    output: str

    _baseline_added: bool = PrivateAttr(False)

    @field_validator("variants")
    @classmethod
    def _unique_names_one_baseline(cls, variants: list[Variant]) -> list[Variant]:
        names = [v.name for v in variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique, repeated: {dupes}")
        if sum(v.method == "baseline" for v in variants) > 1:
            raise ValueError("at most one variant may have method 'baseline'")
        return variants

    @model_validator(mode="after")
    def _calibration_when_needed(self) -> "Recipe":
        needing = [v.name for v in self.variants if v.calibrated]
        if needing and self.calibration is None:
            raise ValueError(f"variants {needing} are calibrated methods; add a `calibration:` section")
        if not any(v.method == "baseline" for v in self.variants):  # every table has its reference row
            self.variants.insert(0, Variant(name="baseline", method="baseline"))
            self._baseline_added = True
        return self

    def field_path(self, variant_index: int, field: str) -> str:
        """`variants[i].field` as the user's file numbers it (the automatic baseline row is not in the file)."""
        return f"variants[{variant_index - self._baseline_added}].{field}"


def _field_error(field: str, msg: str) -> ValueError:
    return ValueError(f"{field}: {msg}")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file, or raise InputError naming the file and each bad field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with keys model, calibration, variants, evaluation, output")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = _loc(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see recipes/ for the accepted keys)"
            got = f" (got {err['input']!r})" if err["type"] not in ("extra_forbidden", "missing") else ""
            if err["type"] == "value_error" and ":" in msg and msg.split(":")[0].isidentifier():
                field, msg = msg.split(":", 1)
                where, msg, got = f"{where}.{field}", msg.strip(), ""
            lines.append(f"{path}: {where}: {msg}{got}")
        raise InputError("\n".join(lines)) from None
