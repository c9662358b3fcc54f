"""The per-variant Record and the Results file: the one schema of results.json, written and read only through here.

A record is made in three steps, each adding its own fields: the backend that builds the checkpoint (name, method,
sizes, self-check, serve command, ...), the run (`kv_memory`: config arithmetic), and the evaluation (perplexity,
KL, tasks, recovery, throughput, roofline). Every field is declared here, and an unknown one is an error
(`extra="forbid"`), so a misspelt key fails where it is written instead of turning into a silent "—" in a report.
The measurement blocks the report reads (perplexity, KL, tasks, recovery, throughput, roofline, KV memory) are typed
the same way; the build's own facts (calibration, distill, GGUF, bitsandbytes, environment) are dicts that their
backend documents and the model card prints.

Versions: `RESULTS_FORMAT` is written at the top of results.json. A file without it is format 1 (records of the same
shape, written before the Record existed) and is read as such; a file from a newer compress is refused. The figures
themselves are cached per variant under keys that carry their own format numbers (checkpoint cache key, eval key).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from compress.options import InputError

RESULTS = "results.json"
RESULTS_FORMAT = 2  # 1: before the Record (same fields, no "format"); 2: written through Results


Num = int | float  # a figure as it was measured: an int stays an int in results.json


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Perplexity(_Block):
    """eval/perplexity.py: token perplexity over `windows` windows of `context` tokens."""

    value: Num
    tokens: int
    windows: int | None = None
    context: int | None = None
    stride: int | None = None
    file: str | None = None
    engine: str | None = None


class KL(_Block):
    """KL(P_baseline || P_variant) per token on the perplexity windows, its standard error, top-1 agreement."""

    mean: Num
    stderr: Num | None = None
    top1_agreement: Num | None = None
    tokens: int | None = None


class TaskScore(_Block):
    """eval/accuracy.py: one lm-eval task's primary metric (per-item scores stay in eval/<variant>.json)."""

    metric: str
    value: Num
    stderr: Num | None = None
    stderr_method: str | None = None  # analytic (a mean's) or lm-eval's bootstrap
    n: int | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    file: str | None = None
    items: list[Num] | None = None
    # the transformers pass's scorer (evaluation.task_scorer): "shared-context" (eval/shared_context.py) or "lm-eval"
    scorer: str | None = None
    # a score through vLLM (evaluation.vllm.tasks): how many items it scored as the transformers pass did
    same_items: int | None = None


class Recovery(_Block):
    """eval/recovery.py: score as % of the baseline's, with the paired-bootstrap 95% interval."""

    pct: Num
    ci95: list[Num | None] | None = None


class Contention(_Block):
    """eval/contention.summary: how many timed windows other processes (or the hypervisor) took CPU time in."""

    contended: bool
    windows: int | None = None
    windows_contended: int | None = None
    retries: int | None = None
    max_others_cpu_share: Num | None = None
    max_steal_share: Num | None = None
    used_max_others_cpu_share: Num | None = None
    judged: bool | None = None
    rule: str | None = None


class DecodeRow(_Block):
    """eval/throughput.timed_runs: one batch size's decode figures."""

    tok_per_sec: Num
    tok_per_sec_min: Num | None = None
    tok_per_sec_max: Num | None = None
    ttft_s: Num | None = None
    ttft_s_min: Num | None = None
    ttft_s_max: Num | None = None
    ms_per_token: Num | None = None
    tokens_decoded: int | None = None
    decode_steps: int | None = None
    contention: Contention | None = None


class Throughput(_Block):
    """eval/engines/*.decode_benchmark: the engine, its settings and the decode rows per batch size."""

    engine: str
    batches: dict[str, DecodeRow]
    engine_version: str | None = None
    threads: int | None = None
    weight_repacking: bool | None = None
    flash_attention: bool | None = None
    cpu_features: str | None = None
    device: str | None = None
    dtype: str | None = None
    weight_bytes_in_memory: int | None = None
    weight_bytes_stored: int | None = None
    repeats: int | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    kv_context_tokens: int | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None
    ru_maxrss_bytes: int | None = None
    rss_now_bytes: int | None = None
    folder: str | None = None
    file: str | None = None


class SpeedRatio(_Block):
    """eval/interleaved.interleave: the row's decode speed over the baseline's, from interleaved rounds, with the
    distribution-free interval of the median ratio; `skipped` says why there is none."""

    ratio: Num | None = None
    ratio_lo: Num | None = None
    ratio_hi: Num | None = None
    coverage: Num | None = None
    level: Num | None = None
    verdict: str | None = None
    rounds: int | None = None
    rounds_run: int | None = None
    rounds_max: int | None = None
    stopped_early: str | None = None  # why fewer than rounds_max rounds were run (eval/interleaved.tight)
    baseline_tok_per_sec: Num | None = None
    tok_per_sec: Num | None = None
    contention: Contention | None = None
    method: str | None = None
    baseline_engine: dict | None = None
    engine: dict | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    batch: int | None = None
    per_round: list[dict] | None = None
    skipped: str | None = None


class ServedLevel(_Block):
    """eval/serving.summarize_level: one concurrency level of the vLLM serving sweep."""

    concurrency: int
    requests: int
    wall_s: Num
    ttft_s_p50: Num
    ttft_s_p99: Num
    tpot_s_p50: Num
    tpot_s_p99: Num
    e2e_s_p50: Num | None = None
    e2e_s_p99: Num | None = None
    output_tok_per_sec: Num
    requests_per_sec: Num
    goodput_requests_per_sec: Num
    slo_met_share: Num
    slo: dict | None = None
    requests_planned: int | None = None
    capped: bool | None = None
    server_itl_s_mean: Num | None = None  # vLLM's own inter-token latency over the level (/metrics)
    attempts: int | None = None
    contention: Contention | None = None


class Served(_Block):
    """eval/served.py: the variant served by vLLM and measured there; `status` ok, failed (vLLM's `reason`),
    "too slow" (served, but its probe was below evaluation.vllm's floor or timed out: its speed and kernel only) or
    skipped (why this row is not for vLLM)."""

    status: str
    reason: str | None = None
    engine: dict | None = None  # vLLM, torch, build, the CPU ISA, install time
    serve_command: str | None = None  # the model card's line, served as written
    harness_flags: list[str] | None = None  # what the harness added (beside address and model name)
    env_vars: dict | None = None  # every environment switch compress set for the server
    # a runtime path that changes the math (eval/engines/vllm.RUNTIME_PATHS), None: the checkpoint's own scheme
    runtime: str | None = None
    # what vLLM computed per group of linear layers (activation precision, GEMM) and whether it is the checkpoint's
    # own scheme, from vLLM's resolved layer attributes (eval/engines/vllm.compute_path)
    compute_path: dict | None = None
    cpu: dict | None = None  # the CPU model and the features that decide vLLM's CPU paths (AMX, AVX512-BF16, VNNI)
    binding: str | None = None  # vLLM's OpenMP thread binding, from its log
    load_s: Num | None = None
    kernels: list[str] | None = None
    probe_tok_per_sec: Num | None = None
    probe_timeout_s: Num | None = None  # "too slow" because the first probe did not finish in this long
    probe_tok_per_sec_below: Num | None = None  # "too slow": the timed probe was cut once its rate fell below this
    agreement: dict | None = None  # greedy agreement with transformers at the served dtype (eval/agreement.py)
    agreement_vs_float32: dict | None = None  # the same against transformers fp32 (kept beside)
    noise_floor: dict | None = None  # transformers at the served dtype against fp32: what rounding alone does
    checks: list[str] | None = None  # agreement checks that failed, each with its numbers
    perplexity: dict | None = None
    sweep: list[ServedLevel] | None = None
    decode: dict | None = None
    speed_ratio: SpeedRatio | None = None
    tasks: dict[str, TaskScore] | None = None
    tasks_seconds: Num | None = None
    tasks_client: dict | None = None  # lm-eval's client in that pass: requests in flight, prompts per request
    tasks_error: str | None = None
    log: str | None = None
    measure_seconds: Num | None = None


class Roofline(_Block):
    """eval/throughput.roofline at batch 1 (and the bound per batch size): read bandwidth / bytes read per step."""

    bytes_per_token: Num
    bytes_per_step: Num | None = None
    weight_bytes: Num | None = None
    kv_bytes: Num | None = None
    bandwidth_bytes_per_sec: Num | None = None
    bound_tok_per_sec: Num | None = None
    utilisation: Num | None = None
    batch: int | None = None
    weight_bytes_stored: int | None = None
    per_batch: dict[str, dict[str, Num]] | None = None


class KVMemory(_Block):
    """compress/planner.kv_memory: the KV format's bytes and the sequences that fit per planner GPU."""

    format: str
    bytes_per_token: Num
    bytes_per_token_16bit: Num | None = None
    ratio_vs_16bit: Num | None = None
    context: int | None = None
    batch: int | None = None
    bytes_at_context_batch: int | None = None
    headroom: Num | None = None
    weight_bytes: int | None = None
    gpus: dict[str, dict[str, int]] | None = None


# the stages of a row, in the order a run spends them: the keys of Record.stage_seconds
STAGES = ("compress", "load", "perplexity", "tasks", "throughput", "speed_ratio", "vllm")


class Record(BaseModel):
    """One variant: one row of the comparison and one checkpoint folder (or a failed row with its error)."""

    model_config = ConfigDict(extra="forbid")

    # what and how (backend)
    name: str
    method: str
    scheme: str
    status: str  # "ok" or "failed"
    error: str | None = None
    checkpoint: str | None = None
    cached: bool | None = None  # reused from an earlier run (manifest cache key and sha256 matched)
    run: str | None = None  # the run directory, set when several runs are merged into one report
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    ignore: list[str] | None = None
    saved_dtype: str | None = None
    weights_bytes: int | None = None
    size_bytes: int | None = None
    compress_seconds: Num | None = None
    compress_peak_memory_bytes: int | None = None
    compress_peak_memory_kind: str | None = None
    selfcheck_max_abs_diff: Num | None = None
    selfcheck_prompts: int | None = None
    selfcheck: dict | None = None  # GGUF: the two engines' agreement on the file
    offload: dict | None = None
    calibration: dict | None = None
    cache_key: str | None = None
    kv_cache: dict | None = None
    kv_in_checkpoint: bool | None = None
    distill: dict | None = None
    bnb: dict | None = None
    gguf: dict | None = None
    format: dict | None = None  # llm-compressor rows: the scheme's facts from its table (LLMCompressorVariant.facts)
    # method auto (compress/backends/auto.py): the target, the format chosen per unit, the predicted damage and size,
    # the sensitivity table and the frontier it was chosen from
    auto: dict | None = None
    serve: str | None = None
    environment: dict | None = None
    # where it ran on a Ray cluster (compress/cluster.py): the address, and per stage ("build", "measure") the node
    # id and IP, hostname, pid, GPUs Ray gave the task, its seconds; absent on a serial run
    cluster: dict | None = None
    # the run: KV-cache memory at the planner's serving shape
    kv_memory: KVMemory | None = None
    # the evaluation (eval/measure.py)
    kv_eval: dict | None = None
    perplexity: Perplexity | None = None
    kl: KL | None = None
    tasks: dict[str, TaskScore] | None = None
    tasks_engine: str | None = None
    # the float dtypes transformers computed this row's figures in, and why (evaluation.dtype resolved by
    # eval/measure.measure_dtype): {"perplexity": "float32" (with KL), "tasks": "bfloat16" (with the speed), "why"}
    measured_dtype: dict | None = None
    throughput: Throughput | None = None
    speed_ratio: SpeedRatio | None = None
    roofline: Roofline | None = None
    vllm: Served | None = None
    # the same checkpoint served on a runtime path that changes the math (evaluation.vllm.runtime_variants), each
    # measured as its own row
    vllm_runtime: dict[str, Served] | None = None
    recovery: dict[str, Recovery] | None = None
    evaluate_peak_memory_bytes: int | None = None
    evaluate_peak_memory_kind: str | None = None
    # wall seconds per stage, each taken when its figure was made (eval/measure.stage_seconds)
    stage_seconds: dict[str, Num] | None = None

    def dump(self) -> dict:
        """The record as results.json stores it: the fields that were set, in declaration order."""
        return self.model_dump(exclude_unset=True)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def measured(self) -> bool:
        """Has figures a model card quotes."""
        return self.ok and bool(self.perplexity or self.tasks or self.throughput)


class Results(BaseModel):
    """results.json: the run's provenance and its records, in the recipe's order."""

    model_config = ConfigDict(extra="forbid")

    format: int = RESULTS_FORMAT
    recipe: str | None = None
    model: dict | None = None
    environment: dict | None = None
    evaluation: dict | None = None
    bandwidth: dict | None = None
    evaluation_error: str | None = None
    cluster: dict | None = None  # the Ray cluster the variants ran on: address, dashboard, nodes, settings
    # where the run was when this file was written: state "running" (stage, rows measured of rows), "stopped"
    # (reason: SIGTERM, an error), "complete"; absent in files written before compress recorded it
    progress: dict | None = None
    variants: list[Record]

    def dump(self) -> dict:
        out = self.model_dump(exclude_unset=True, exclude={"variants"})
        out["format"] = self.format
        return {**out, "variants": [r.dump() for r in self.variants]}

    def text(self) -> str:
        return json.dumps(self.dump(), indent=2) + "\n"


def parse_record(data: dict) -> Record:
    """A record from a manifest or a results.json (format 1 and 2 share the record's fields)."""
    return Record.model_validate(data)


def read_results(path: Path) -> Results:
    """A run's results.json, migrated to the current format. Raises InputError naming the file when it is missing,
    not JSON, of a newer format, or has a field this version does not know."""
    if not path.is_file():
        raise InputError(f"{path}: not found; is {path.parent} a run directory (the recipe's `output`)?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
        raise InputError(f"{path}: expected an object with a `variants` list")
    version = data.get("format", 1)
    if not isinstance(version, int) or version > RESULTS_FORMAT:
        raise InputError(f"{path}: results format {version!r} is newer than this compress reads ({RESULTS_FORMAT}); "
                         f"upgrade compress or rebuild the run")
    data = {**data, "format": RESULTS_FORMAT}  # format 1 -> 2: the same fields, now declared
    try:
        return Results.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InputError(f"{path}: {where}: {err['msg']}") from None


def known_path(*keys: Any) -> bool:
    """Whether `record[k1][k2]...` names a field the schema declares: the report's lookups ask, so that a misspelt
    key fails the report's tests instead of printing "—". A dict of blocks (tasks, batches, recovery) takes any key
    (a task name, a batch size) before the block's own fields; an untyped dict takes any key below it."""
    import typing

    model: Any = Record
    for key in keys:
        if model is None:
            return True  # below an untyped dict
        if isinstance(model, type) and issubclass(model, BaseModel):
            if key not in model.model_fields:
                return False
            model = _inner(model.model_fields[key].annotation)
        elif typing.get_origin(model) is dict:
            model = _inner(typing.get_args(model)[1])
        else:
            return False  # a number or a string has no keys
    return True


def _inner(annotation: Any) -> Any:
    """The type under `X | None`; None for an untyped dict or anything without fields."""
    import types
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)] \
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else [annotation]
    inner = args[0] if len(args) == 1 else None
    if inner is dict:
        return None
    return inner
