"""The options a recipe is made of, shared by every part of compress: where the model comes from, the calibration
text, a KV-cache format, a distilled student, the evaluation settings, and the part of a variant every method has.

Every model here rejects unknown keys (`extra="forbid"`): a typo such as `group_szie` must fail loudly instead of
silently falling back to a default and producing a checkpoint the user did not ask for. Each method's own options
live with the method, in compress/backends/; compress/recipe.py puts them together as one discriminated union on
`method` and reads the file.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_MODEL = "smollm2-135m"
REFERENCE = "baseline"  # the method of the reference row every table compares against (compress/backends/unchanged.py)

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

    def shape_for(self, default: tuple[int, int] | None = None) -> tuple[int, int]:
        """(samples, seq_len) a variant calibrates on when it does not say: what this section sets, else its method's
        `default` shape (VariantBase.default_calibration_shape), else this section's defaults.

        Chosen from benchmarks/calibration_sweep.py on SmolLM2-135M (C4, W4A16 g64, 2-core CPU, WikiText-2 test KL to
        the baseline): for GPTQ, 16 x 512 tokens was clearly worse than 64 x 512 and 128 x 512 barely better but much
        slower, so 64 x 512 is the knee (benchmarks/results/calibration_gptq_c4_shapes.txt and
        calibration_gptq_c4_wikitext_basic_vs_sequential.txt). AWQ's grid search costs several times GPTQ's per
        calibration token, and 64 x 256 bought little over 16 x 256 at several times the time
        (benchmarks/results/calibration_awq_sources.txt and calibration_awq_c4_shapes.txt), so AWQ's entry defaults
        to 16 x 256 unless the recipe sets a shape."""
        if default is None:
            return self.samples, self.seq_len
        return (self.samples if "samples" in self.model_fields_set else default[0],
                self.seq_len if "seq_len" in self.model_fields_set else default[1])


class KVCache(_Strict):
    """How the attention keys and values are stored at serving time (see eval/kvcache.py for the formats).

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
                raise field_error("granularity", f"a {self.dtype} cache has no scales; remove granularity/group_size")
        elif self.dtype == "fp8":
            self.granularity = self.granularity or "tensor"
            if self.granularity not in ("tensor", "head"):
                raise field_error("granularity", f"fp8 KV uses static scales, per 'tensor' or per 'head' (what vLLM "
                                                  f"reads), got {self.granularity!r}")
            if self.group_size is not None:
                raise field_error("group_size", "fp8 KV scales are per tensor or per head; remove group_size")
        else:
            self.granularity = self.granularity or "token"
            if self.granularity not in ("token", "channel"):
                raise field_error("granularity", f"{self.dtype} KV is quantized as each token enters the cache, per "
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
            raise field_error("layers", "give exactly one of layers (how many to keep) or drop (which to remove)")
        if self.drop is not None and len(set(self.drop)) != len(self.drop):
            raise field_error("drop", f"layer indices repeat: {self.drop}")
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
            raise field_error("micro_batch", f"must divide batch ({self.batch}), got {self.micro_batch}")
        return self

    @property
    def accumulation(self) -> int:
        return self.batch // self.micro_batch


class VariantBase(_Strict):
    """What every variant has, whatever its method: a name (its row in the table and its checkpoint folder), which
    modules stay unquantized, a calibration shape of its own, a KV-cache format, a distilled student.

    Each method family subclasses this in compress/backends/ with its `method` literal, its own keys and rules,
    `label` and `build`; compress/recipe.py unites them on `method`, so a key of another method is an unknown key.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    samples: int | None = Field(None, gt=0)  # overrides calibration.samples for this variant
    seq_len: int | None = Field(None, gt=0)  # overrides calibration.seq_len for this variant
    kv_cache: KVCache | None = None  # None: the model's own dtype (16-bit when served)
    distill: Distill | None = None  # train a smaller student first; the method then quantizes the student

    # The cache key hashes every field of a variant (key_fields), in the first recipe format's flat shape: these
    # fields always (None where a class has no such option), every field added since only when it is not None, so
    # the checkpoints built before a field existed keep their key. A field that cannot change the checkpoint is
    # declared in NOT_KEYED with the reason; tests/compress/test_keys.py proves every field of every class either
    # changes the key or is declared.
    FIRST_FIELDS: ClassVar[tuple[str, ...]] = ("name", "method", "bits", "group_size", "symmetric", "ignore",
                                               "smoothing_strength", "dampening_frac", "samples", "seq_len")
    NOT_KEYED: ClassVar[dict[str, str]] = {}
    # what to say after "method X does not take KEY": per key, or "*" for any key (see recipe._message)
    KEY_HINTS: ClassVar[dict[str, str]] = {}
    OFFLOADS: ClassVar[bool] = True  # built in memory or, with model.offload, layer by layer from disk

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} is a name compress uses in the output folder; choose another variant name "
                             f"(reserved: {sorted(RESERVED_NAMES)})")
        return name

    def _no_calibration_keys(self, hint: str = "") -> None:
        """samples/seq_len are only for a variant that reads calibration text."""
        if (self.samples or self.seq_len) and not self.calibrated:
            raise ValueError(f"method {self.method!r} uses no calibration data here; remove samples/seq_len{hint}")

    @classmethod
    def methods(cls) -> tuple[str, ...]:
        """The `method` values this class takes (its Literal; a class whose methods are a table says so)."""
        return cls.model_fields["method"].annotation.__args__

    @classmethod
    def methods_taking(cls, key: str) -> list[str]:
        """The methods of this class that take recipe key `key` (for "only ... do" messages)."""
        return list(cls.methods()) if key in cls.model_fields else []

    def key_fields(self) -> dict:
        """This variant as the cache key hashes it (see FIRST_FIELDS)."""
        def dump(value):
            return value.model_dump() if isinstance(value, BaseModel) else value

        out = {f: dump(getattr(self, f, None)) for f in self.FIRST_FIELDS}
        for f in type(self).model_fields:
            if f not in out and f not in self.NOT_KEYED and getattr(self, f) is not None:
                out[f] = dump(getattr(self, f))
        return out

    @property
    def requires_dtype(self) -> str | None:
        """The compute dtype this variant's format needs (None: any); compress.checks refuses the run otherwise."""
        return None

    @property
    def is_reference(self) -> bool:
        """The baseline row every table compares against (compress/backends/unchanged.py)."""
        return False

    def default_calibration_shape(self) -> tuple[int, int] | None:
        """(samples, seq_len) this variant's method calibrates on unless the recipe says (None: the section's)."""
        return None

    def calibration_extras(self) -> dict:
        """What the backend adds to the calibration record and cache key (how it calibrates)."""
        return {}

    def checkpoint_bytes(self, config, dtype_bytes: int) -> float:
        """Upper bound of the weight bytes this variant writes, from the config alone (compress/resources.py adds
        its margin and checks the disk): the weights at the variant's format, the rest at the compute dtype."""
        from compress.planner import parameters, weight_bytes_estimate

        bits, group = self.weight_format()
        if bits >= 16:
            return parameters(config) * dtype_bytes
        return weight_bytes_estimate(config, bits, group, ignore_lm_head="lm_head" in self.ignore,
                                     embed_bytes=dtype_bytes)

    def config_errors(self, config, dtype_bits: int) -> list[tuple[str, str]]:
        """(field, message) for what the model's config rules out in this variant (compress.checks, before any
        work); the group sizes of the llm-compressor schemes are checked there for every variant."""
        return []

    def analysis_bytes(self, config, dtype_bytes: int) -> int:
        """Bytes this variant holds beside its loaded model before it quantizes (method auto's sensitivity pass), for
        the run's memory check (compress/resources.py); 0 for a variant that holds nothing extra then."""
        return 0

    def weight_format(self) -> tuple[int, int | None]:
        """(bits, group_size) of the stored weights, for size and memory estimates; 16-bit when unquantized."""
        return getattr(self, "bits", None) or 16, getattr(self, "group_size", None)

    @property
    def needs_tasks(self) -> bool:
        """Whether its build depends on measured task scores (method auto's min_recovery), so the recipe must have
        evaluation.tasks."""
        return False

    @property
    def calibrated(self) -> bool:
        """Needs calibration text: the method's own reason, or fp8 KV scales."""
        return bool(self.kv_cache and self.kv_cache.calibrated)

    @property
    def uses_llmcompressor(self) -> bool:
        """Built by llm-compressor (a compressed-tensors checkpoint): a quantized method, or fp8 KV scales."""
        return self.kv_in_checkpoint

    @property
    def kv_in_checkpoint(self) -> bool:
        """The KV format is part of the checkpoint (scales + kv_cache_scheme that vLLM reads); otherwise it is
        applied at evaluation time only, as an engine with that cache format would."""
        return bool(self.kv_cache and self.kv_cache.dtype == "fp8")

    @property
    def label(self) -> str:
        """The scheme's display name (record, report, model card, logs): each class says its own."""
        raise NotImplementedError

    def _suffix(self) -> str:
        """The scheme's tail: the KV format and the student, if any."""
        kv = f" + {self.kv_cache.label}" if self.kv_cache else ""
        if self.distill:
            d = self.distill
            layers = f"{d.student.layers}L" if d.student.layers else f"drop{len(d.student.drop)}"
            kv += f" (student {layers}, {'KD ' + str(d.steps) + ' steps' if d.steps else 'pruned, untrained'})"
        return kv


class PerplexitySettings(_Strict):
    """Token perplexity and KL to the baseline on one text file, in windows of `context` tokens."""

    file: str = "wikitext2_raw_wiki.test.raw"  # relative to evaluation.data_dir
    context: int = Field(512, gt=1)
    stride: int = Field(512, gt=0)
    max_windows: int | None = Field(40, gt=0)  # None: the whole file (~300k tokens: slow on a CPU)

    @model_validator(mode="after")
    def _stride_within_context(self) -> "PerplexitySettings":
        if self.stride > self.context:
            raise field_error("stride", f"expected at most context ({self.context}), got {self.stride}")
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
    # speed ratios (x baseline) come from interleaved rounds, baseline and variant alternated in one process
    # (eval/interleaved.py); 8 rounds make the 95% interval of the median ratio [min, max] (99.2% coverage)
    rounds: int = Field(8, gt=0)
    # fewer rounds when they already say it: the rounds stop once the quiet ones give a 95% interval (6 rounds:
    # [min, max], 96.9%) no wider than this share of its median; null: always `rounds`
    ratio_width: float | None = Field(0.05, gt=0)
    # a timed run (or round) during which other processes used, or the hypervisor stole, more than
    # `contention_threshold` of our cores' CPU time is timed again, at most `retries` more times; then it is flagged
    retries: int = Field(8, ge=0)
    contention_threshold: float = Field(0.10, gt=0, le=1)


class VLLMSettings(_Strict):
    """Serve every variant in vLLM (its own environment, its OpenAI server in a subprocess: eval/engines/vllm.py)
    and measure it there (eval/served.py): the kernel vLLM picked, greedy agreement with transformers, perplexity
    from vLLM's prompt logprobs, a serving sweep over `concurrency` in the style of `vllm bench serve`, and the
    batch-1 decode ratio to the vLLM baseline (interleaved, as every ratio)."""

    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1)
    # the batch-1 ratio to the run's baseline in transformers (the main table's reference), interleaved: rounds
    # (6 make the 95% interval [min, max], 96.9% coverage) of `ratio_new_tokens` greedy tokens each, after the
    # benchmark prompt; short, so that slow rows (FP8, emulated on a CPU) stay affordable
    ratio_rounds: int = Field(6, gt=0)
    ratio_new_tokens: int = Field(16, gt=1)
    prompt_tokens: int = Field(128, gt=0)  # random token ids per request (no prefix-cache hits), as vllm bench's
    output_tokens: int = Field(64, gt=1)  # exactly this many (EOS ignored)
    # measured requests per level: max(requests_min, requests_per_concurrency x concurrency), after
    # min(concurrency, 2) short warm-up requests (4 tokens) that are never counted
    requests_per_concurrency: int = Field(2, gt=0)
    requests_min: int = Field(4, gt=0)
    level_max_s: float = Field(180, gt=0)  # no new request after this many seconds of a level (FP8 on a CPU)
    retries: int = Field(1, ge=0)  # a contended level is run again at most this many times, then flagged
    # the SLO goodput counts against: a request is good when its TTFT and its TPOT are both within the limits
    slo_ttft_ms: float = Field(1000, gt=0)
    slo_tpot_ms: float = Field(100, gt=0)  # 10 tok/s per user, about reading speed
    # a row vLLM decodes slower than this (two 4-token probes, prompt included, the second timed) is reported with
    # its measured speed and kernel, and not measured further. None: half the SLO's per-user pace (`probe_floor`): a
    # row below it meets the SLO at no concurrency, and its sweep and ratio would only say so at length (FP8 is
    # emulated on a CPU: benchmarks/results/lab_smollm2_*.md). 0: measure every row whatever its speed
    min_tok_per_sec: float | None = Field(None, ge=0)
    # a first probe (it also pays the engine's set-up) not finished in this long is "too slow", unmeasured; the
    # second, timed one is stopped as soon as its rate can only be below the floor (4 tokens / floor seconds)
    probe_timeout_s: float = Field(60, gt=0)
    agreement_tokens: int = Field(32, gt=0)  # greedy tokens compared with transformers per self-check prompt
    perplexity: bool = True  # vLLM's perplexity on the windows of evaluation.perplexity, beside transformers' on them
    # at most this many of those windows (transformers' figure beside it is recomputed on the same ones): vLLM's CPU
    # prefill with prompt logprobs reads ~100 tokens/s here, and emulated FP8 is far slower
    perplexity_windows: int | None = Field(10, gt=0)
    # also run evaluation.tasks through the server (lm-eval local-completions): true for every variant, or the
    # names of the variants to run them for (each costs a full lm-eval pass; a name added to the list measures that
    # row again, not the others)
    tasks: bool | list[str] = False
    # requests in flight of lm-eval's client in those passes; vLLM batches what is in flight: 8 requests of 8
    # prompts took about half the time of 4 of 1 on the lab's baseline, same documents (benchmarks/
    # lm_eval_served_speed.py; benchmarks/results/lm_eval_served_speed_spr.txt). A batched bf16 forward differs from
    # a lone one in the last bits, so a few items near a tie can flip with this and the next: both are in the key
    tasks_concurrency: int = Field(8, gt=0)
    tasks_batch_size: int = Field(8, gt=0)  # prompts per request of lm-eval's client in those passes
    # faster vLLM paths on this hardware that change the math (eval/engines/vllm.RUNTIME_PATHS, e.g. w4a8: W4A16
    # checkpoints run with uint8 activations on AMX CPUs), each for every variant it applies to or for the variants
    # named ({w4a8: [gptq-w4a16]}): a second served row of the same checkpoint, measured in full; every other row
    # is served as its checkpoint declares
    runtime_variants: dict[str, bool | list[str]] = Field(default_factory=dict)
    # --enforce-eager: loads several times faster than torch.compile's warm-up on a 2-core CPU, decodes somewhat
    # slower (benchmarks/results/vllm_cpu_settings_spr_compiled.txt); the report says so
    eager: bool = True
    kv_cache_space_gb: int = Field(2, gt=0)  # VLLM_CPU_KVCACHE_SPACE (CPU builds only; vLLM reads an integer)
    # where vLLM's CPU build runs its OpenMP threads: "all" = every core compress may use, none reserved for the
    # engine loop (VLLM_CPU_OMP_THREADS_BIND=<those cores>, VLLM_CPU_NUM_OF_RESERVED_CPU=0); "auto" = vLLM's own
    # (it reserves one core per worker for its engine loop: 1 of 2 here); or vLLM's own syntax ("0-3"). "all" is
    # the default because it decoded faster on the 2-core machines this project runs on, at concurrency 1 and 16
    # (benchmarks/vllm_cpu_settings.py; figures in benchmarks/results/vllm_cpu_settings_spr_c1.txt and _c16.txt)
    cpu_threads_bind: str = "all"
    ready_timeout_s: float = Field(900, gt=0)  # a server not healthy by then is a failed row


    @field_validator("runtime_variants", mode="before")
    @classmethod
    def _known_runtime_paths(cls, value):
        from eval.engines.vllm import RUNTIME_PATHS

        if isinstance(value, list):  # [w4a8]: for every variant it applies to
            if len(set(value)) != len(value):
                raise ValueError(f"repeated names in {value}")
            value = {name: True for name in value}
        if isinstance(value, dict) and (unknown := [n for n in value if n not in RUNTIME_PATHS]):
            raise ValueError(f"unknown {unknown}; expected some of {sorted(RUNTIME_PATHS)}")
        return value

    def probe_floor(self) -> float:
        """The probe's tok/s below which a row is "too slow": min_tok_per_sec, else half of 1 / slo_tpot."""
        return self.min_tok_per_sec if self.min_tok_per_sec is not None else 500 / self.slo_tpot_ms

    def runtime_for(self, name: str) -> list[str]:
        """The runtime paths variant `name` gets a row for."""
        return [rt for rt, rows in self.runtime_variants.items() if rows is True or (rows and name in rows)]


class ClusterSettings(_Strict):
    """Run the variants on a Ray cluster (compress/cluster.py): each variant's build, then its measurement, is one
    Ray task with these resource requests, so a GPU variant waits for a free GPU. `compress run --cluster ADDRESS`
    sets (or overrides) `address`. The results are those of a serial run: same cache keys, same checkpoints."""

    # "local": a Ray instance on this machine (to try it out); "auto": the cluster in RAY_ADDRESS (or the one
    # started here with `ray start`); "ray://HOST:PORT" (Ray client) or "HOST:PORT" (the head's GCS, on a node)
    address: str = "local"
    # torch threads per task; None: the driver's own (all the cores compress may use where `compress run` runs).
    # On a CPU, GPTQ-family weights depend on the thread count (measured: the lab's gptq-w4a16 and w8a8-int8 built
    # with 1 thread differ from the serial run's 2 threads; RTN, AWQ and FP8 do not), so the default reproduces a
    # serial run on the driver's machine bit for bit
    threads: int | None = Field(None, gt=0)
    cpus_per_variant: float | None = Field(None, gt=0)  # Ray's num_cpus per task; None: `threads`
    gpus_per_variant: float | None = Field(None, ge=0)  # None: 1 when the run's device is cuda, else 0
    memory_gb: float | None = Field(None, gt=0)  # host memory each task reserves; None: no memory request
    # retries of a task whose worker died (killed, node lost); a variant that fails for its own reason is a failed
    # row at once, never retried
    max_retries: int = Field(2, ge=0)
    local_cpus: int | None = Field(None, gt=0)  # "local" only: CPUs of the local instance (None: all)

    @field_validator("address")
    @classmethod
    def _address(cls, a: str) -> str:
        a = a.strip()
        if a in ("local", "auto") or _host_port(a.removeprefix("ray://")):
            return a
        raise ValueError(f"expected 'local', 'auto', 'ray://HOST:PORT' or 'HOST:PORT', got {a!r}")


def _host_port(a: str) -> bool:
    host, _, port = a.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536 and "/" not in host


class WatchdogSettings(_Strict):
    """When a stage counts as stalled (compress/stop.py): idle (no step finished, no CPU used by compress and its
    children) for longer than `factor` x its longest step so far, at least `min_s`; `first_step_s` before its first
    step. A stalled stage fails its variant with one sentence saying where it waited, and the run goes on. Not part of
    any cache key: it decides when to give up, not what is measured."""

    factor: float = Field(20, gt=1)
    min_s: float = Field(120, gt=0)
    first_step_s: float = Field(600, gt=0)
    idle_cpu_share: float = Field(0.05, gt=0, lt=1)  # of one core: below it, a poll interval counts as idle
    poll_s: float = Field(1.0, gt=0)


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
    # how the transformers pass scores a task's choices: "shared-context" runs each question's context once for all
    # its choices (eval/shared_context.py: fewer tokens, the same arithmetic), "lm-eval" runs lm-eval's own loop
    # (one sequence per choice); in the figures' key, and named in the report
    task_scorer: Literal["shared-context", "lm-eval"] = "shared-context"
    # the float dtype transformers runs the tasks and times the speed in (perplexity and KL stay in the model's
    # dtype; the checkpoints are the same): "auto" is the model's dtype when it is 16-bit, else bf16 where the device
    # computes bf16 natively (a GPU; a CPU with AVX512-BF16 or AMX), else the model's dtype
    # (eval/measure.measure_dtype, where the evidence is cited); in the figures' keys, each row records it
    # (measured_dtype)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    perplexity: PerplexitySettings | None = Field(default_factory=PerplexitySettings)  # null: skip
    throughput: ThroughputSettings | None = Field(default_factory=ThroughputSettings)  # null: skip
    vllm: VLLMSettings | None = None  # null: no vLLM engine (it needs its own environment, built on first use)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)

    @property
    def enabled(self) -> bool:
        return bool(self.tasks or self.perplexity or self.throughput)


def field_error(field: str, msg: str) -> ValueError:
    """A validator's error that recipe.load_recipe reports at `<path>.<field>`."""
    return ValueError(f"{field}: {msg}")
