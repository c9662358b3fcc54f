"""Measure every saved checkpoint: perplexity and KL to the baseline, lm-eval tasks, decode throughput, roofline.

What is measured is what ships: each variant is reloaded from its checkpoint folder by the engine that serves its
format (eval/engines/: transformers for Hugging Face folders, llama.cpp for GGUF files), as a user would. The
baseline is evaluated first; its pass saves its log-probabilities on the perplexity windows (the KL reference,
eval/perplexity.ReferenceFile), so every other row sees identical token windows with one model in memory, in this
process or in a cluster task on another machine (compress/cluster.py runs `evaluate_variant` per variant).

Results are cached per variant in `<output>/eval/<variant>.json` under two keys: the evaluation key (the
checkpoint's cache key, the evaluation settings, the data files' digests, the lm-eval version) for what does not
depend on the moment (perplexity, KL, tasks), and the speed key (the checkpoint's and the baseline's cache keys,
the throughput settings) for the speed figures, which `compress run --remeasure-speed` measures again alone, e.g.
once the machine is quiet. A rerun re-measures only what changed, and a killed evaluation continues with the next
unmeasured variant.

Speed: each row's absolute tok/s comes from its own process (so its peak memory is its own), every timed run
checked for contention (eval/contention.py); its ratio to the baseline comes from interleaved rounds of the two in
one process (eval/interleaved.py), with an interval, never from two medians timed minutes apart. Per-item task scores stay in those
files; results.json gets the summary figures, and recovery (paired bootstrap) is computed from the items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

from typing import TYPE_CHECKING

from compress import ownership, stop
from compress.backends.unchanged import REFERENCE
from compress.checkpoint import sha256_file
from compress.options import Evaluation, InputError
from compress.record import STAGES
from eval.accuracy import TASKS_DIR, available_tasks
from eval.engines import Row, for_row
from eval.perplexity import ppl_file_digest
from eval.pace import Pace

if TYPE_CHECKING:
    from compress.recipe import Recipe

log = logging.getLogger("compress")

EVAL_FORMAT = 2  # bump when what an eval/<variant>.json holds changes, so older measurements are redone
SPEED_FORMAT = 1  # the same for its speed figures alone
# what an eval/<variant>.json holds from the speed measurement, replaced as a whole when it is measured again
SPEED_FIELDS = ("speed_key", "bandwidth", "throughput", "roofline", "speed_ratio", "speed_seconds")
# what it holds from the vLLM engine (eval/served.py), under a key of its own
SERVED_FIELDS = ("vllm_key", "vllm", "vllm_runtime_keys", "vllm_runtime")


class RowFailed(RuntimeError):
    """A row whose measurement failed, raised where one row is all there is (a cluster task); its message is the
    row's error as results.json says it."""


def check_inputs(ev: Evaluation) -> None:
    """Fail before any model is loaded on unknown tasks or missing data files (no lm-eval import needed)."""
    known = available_tasks()
    unknown = [t for t in ev.tasks if t not in known]
    if unknown:
        raise InputError(f"evaluation.tasks: unknown {unknown}; expected names from {known}")
    if not (ev.tasks or ev.perplexity):
        return
    data_dir = Path(ev.data_dir).expanduser()
    if not data_dir.is_dir():
        raise InputError(f"evaluation.data_dir: folder not found: {data_dir} (expected the folder with the "
                         f"evaluation files, e.g. ../shared/data; or set evaluation.tasks: [] and perplexity: null)")
    if ev.perplexity and not (data_dir / ev.perplexity.file).is_file():
        raise InputError(f"evaluation.perplexity.file: {data_dir / ev.perplexity.file} not found")


def evaluation_files(ev: Evaluation) -> set[Path]:
    """Resolved paths of every file this evaluation scores on (perplexity text, task data)."""
    from eval.accuracy import task_config

    data_dir = Path(ev.data_dir).expanduser()
    files = {(data_dir / ev.perplexity.file).resolve()} if ev.perplexity else set()
    for t in ev.tasks:
        files |= {Path(f).resolve() for f in task_config(t, data_dir)["dataset_kwargs"]["data_files"].values()}
    return files


def eval_key(ev: Evaluation, record: dict, device: str, tasks_dtype) -> str:
    """The key of a variant's perplexity, KL and task figures: what they depend on (its checkpoint, the evaluation
    settings and what its engine adds to them, the dtype the tasks are computed in, the data, lm-eval), and nothing
    about speed."""
    import lm_eval

    settings = for_row(record).key_settings(
        ev.model_dump(exclude={"selfcheck_prompts", "selfcheck_max_abs_diff", "throughput", "vllm", "dtype"}))
    blob = {"format": EVAL_FORMAT, "checkpoint": record["cache_key"], "settings": settings, "device": device,
            **_measured_in(tasks_dtype),
            "lm_eval": lm_eval.__version__,
            "task_files": {p.name: sha256_file(p)[:16] for p in sorted(TASKS_DIR.iterdir()) if p.is_file()},
            "ppl_file": ppl_file_digest(ev)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def _measured_in(tasks_dtype) -> dict:
    """The tasks' and speed's dtype (measure_dtype) as part of a key: none for fp32, so figures measured in fp32
    before evaluation.dtype existed keep their keys (and caches). Perplexity and KL are computed in the model's
    dtype, which the checkpoint's key holds."""
    name = str(tasks_dtype).removeprefix("torch.")
    return {} if name == "float32" else {"tasks_dtype": name}


def speed_key(ev: Evaluation, record: dict, base: dict | None, device: str, tasks_dtype) -> str | None:
    """The key of a variant's speed figures: its checkpoint, the baseline it is interleaved with, the throughput
    settings as its engine reads them, the bandwidth probe; None when throughput is off."""
    if ev.throughput is None:
        return None
    from eval.interleaved import METHOD
    from eval.throughput import BANDWIDTH_PROBE

    settings = for_row(record).key_settings(ev.throughput.model_dump())
    blob = {"format": SPEED_FORMAT, "checkpoint": record["cache_key"], "device": device, "settings": settings,
            "baseline": base["cache_key"] if base and base["name"] != record["name"] else None,
            "bandwidth_probe": BANDWIDTH_PROBE, "ratio_method": METHOD, **_measured_in(tasks_dtype)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def _read_cached(path: Path) -> dict | None:
    """A variant's cached measurements, or None when there are none or the file does not parse (a corrupted cache
    is measured again, never trusted and never a crash)."""
    try:
        cached = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("stage evaluate: %s does not load (%s); measuring again", path, type(e).__name__)
        return None
    return cached if isinstance(cached, dict) else None


def evaluation_order(records: dict[str, dict]) -> tuple[list[str], str | None]:
    """The ok variants, baseline first (every other row's KL reference and speed reference), and its name."""
    names = sorted((n for n, r in records.items() if r["status"] == "ok"),
                   key=lambda n: records[n]["method"] != REFERENCE)
    return names, next((n for n in names if records[n]["method"] == REFERENCE), None)


# the /proc/cpuinfo flags of a CPU that computes bf16 matrix products natively (AMX tiles; Zen 4's AVX512-BF16)
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def measure_dtype(ev: Evaluation, device: str, model_dtype) -> tuple:
    """The float dtype transformers runs the tasks and times the speed in (evaluation.dtype), and why, as the report
    says it. Perplexity and KL stay in the model's own dtype.

    "auto" keeps a 16-bit model's own dtype and runs an fp32 model's tasks in bf16 where the device computes bf16
    natively: a GPU, or a CPU with AMX or AVX512-BF16 (both CPUs this project runs on). There bf16 is faster than
    fp32 rather than emulated, and it is what a served checkpoint computes in. The checkpoints do not change (an
    fp32 baseline stays fp32 on disk); only the arithmetic of the measurement does, so the figures' keys carry it.
    Why tasks but not KL: on the whole lab in both precisions, every task score stayed well within its stderr while
    the 8-bit rows' KL moved by several of its (much narrower) stderrs, bf16's own rounding added to the variant's
    (benchmarks/results/lab_bf16_vs_fp32_epyc.md, benchmarks/compare_precision.py; what it saves there too). Elsewhere
    "auto" keeps the model's dtype: emulated bf16 is several times slower than fp32."""
    import torch

    from compress.environment import cpu_features

    own = str(model_dtype).removeprefix("torch.")
    if ev.dtype != "auto":
        return getattr(torch, ev.dtype), f"evaluation.dtype {ev.dtype}"
    if model_dtype in (torch.bfloat16, torch.float16):
        return model_dtype, f"auto: the model's own dtype ({own})"
    if device == "cuda":
        return torch.bfloat16, "auto: a GPU computes bf16 natively"
    native = [f for f in NATIVE_BF16_FLAGS if f in cpu_features()["flags"]] if device == "cpu" else []
    if native:
        return torch.bfloat16, f"auto: this CPU computes bf16 natively ({', '.join(native)}); checkpoints as saved ({own})"
    return model_dtype, f"auto: the model's dtype ({own}); this {device} has no native bf16"


def evaluate_run(recipe: Recipe, output: Path, records: dict[str, dict], device: str, dtype,
                 remeasure_speed: bool = False, on_row=None, more_rows: bool = False) -> dict:
    """Measure each ok variant (baseline first), updating `records` in place. Returns run-level figures.
    `remeasure_speed`: time every row again even where its cached speed figures are current. `on_row(measured,
    base_name, stage)` is called after every row is measured (the run rewrites results.json and the report).
    `more_rows`: rows may follow (compress/verify.py), so the baseline's KL reference stays for them."""
    names, base_name = evaluation_order(records)
    measured: dict[str, dict] = {}
    measure_rows(recipe, output, records, names, base_name, measured, device, dtype, remeasure_speed,
                 keep_reference=len(names) > 1 or more_rows, on_row=on_row)
    if not more_rows:
        remove_reference(recipe, output, records.get(base_name), device, dtype)
    finish(measured, records, base_name)
    return run_info(recipe.evaluation, measured)


def measure_rows(recipe: Recipe, output: Path, records: dict[str, dict], names: list[str], base_name: str | None,
                 measured: dict[str, dict], device: str, dtype, remeasure_speed: bool = False, *,
                 keep_reference: bool = True, on_row=None) -> None:
    """Evaluate, then serve: each of `names` measured in its own engine (`evaluate_variant`), then, when the recipe
    asks for vLLM, each served (eval/served.serve_all); figures into `measured` (which may hold the baseline's
    already, as on a cluster node). The serial run passes every row; a cluster task (compress/cluster.py) one.

    A variant whose measurement fails (an error, or a stage that stalled: compress/stop.py) becomes a failed row
    in `records` with the reason, and the next one is measured; what it had measured stays cached in
    eval/<variant>.json, so the same command run again measures only what is missing."""
    from tqdm import tqdm

    from compress.resources import one_line

    base = records.get(base_name) if base_name else None
    shared = {"ppl_ids": None}  # the perplexity text's tokens, tokenized once per run
    pace = Pace("evaluate", len(names))
    for name in tqdm(names, desc="evaluate", unit="variant", disable=len(names) < 2):
        try:
            with stop.stage(f"measuring {name}"):
                measured[name] = evaluate_variant(recipe, output, records[name], base, measured.get(base_name),
                                                  device, dtype, remeasure_speed, shared,
                                                  keep_reference=keep_reference)
        except (InputError, KeyboardInterrupt):
            raise
        except Exception as e:
            error = one_line(e, output / "eval")
            log.error("variant %s: its measurement FAILED: %s", name, error)
            records[name].update(status="failed", error=f"measurement failed: {error}")
        pace.row_done(name)
        if on_row is not None and name in measured:  # a failed row has no figures to publish
            on_row(measured, base_name, f"measured {name}")
    if recipe.evaluation.vllm is not None:
        from eval.served import serve_all

        serve_all(recipe, output, records, measured, [n for n in names if n in measured], base_name, device, dtype,
                  remeasure_speed, on_row=on_row)


def evaluate_variant(recipe: Recipe, output: Path, record: dict, base: dict | None, base_measured: dict | None,
                     device: str, dtype, remeasure_speed: bool = False, shared: dict | None = None,
                     keep_reference: bool = True) -> dict:
    """One ok variant's figures (what eval/<variant>.json holds), measured or reused: perplexity, KL and tasks under
    the evaluation key, speed under the speed key. `base_measured`: the baseline's own figures (its speed is every
    ratio's reference), None for the baseline itself. `keep_reference`: the baseline's pass saves its
    log-probabilities for the other rows' KL (ReferenceFile). Used the same way by the serial loop and by a cluster
    task (compress/cluster.py). `dtype` is the run's: perplexity and KL are computed in it, the tasks and the speed
    in `measure_dtype`'s (the vLLM stage keeps the run's: its agreement compares with both)."""
    from compress.environment import release_freed_memory, reset_peak_memory

    ev = recipe.evaluation
    shared = {"ppl_ids": None} if shared is None else shared
    name = record["name"]
    (output / "eval").mkdir(exist_ok=True)
    tasks_dtype, why = measure_dtype(ev, device, dtype)
    in_model = for_row(record).engine.scores_in_model  # else another engine computes perplexity and KL (llama.cpp)
    measured_in = {"perplexity": str(dtype).removeprefix("torch.") if in_model else None,
                   "tasks": str(tasks_dtype).removeprefix("torch."), "why": why}
    key = eval_key(ev, record, device, tasks_dtype)
    skey = speed_key(ev, record, base, device, tasks_dtype)
    path = output / "eval" / f"{name}.json"
    cached = _read_cached(path)
    quality, served = None, {}
    if cached and cached.get("eval_key") == key:
        # fp32 figures cached before evaluation.dtype existed have its key but not this field
        cached.setdefault("measured_dtype", measured_in)
        quality = {k: v for k, v in cached.items() if k not in SPEED_FIELDS + SERVED_FIELDS}
        served = {k: cached[k] for k in SERVED_FIELDS if k in cached}  # checked against its own key (eval/served.py)
        if skey is None or (cached.get("speed_key") == skey and not remeasure_speed):
            log.info("stage evaluate: %s unchanged, reusing %s", name, path)
            return cached
    if quality is None:
        log.info("stage evaluate: %s from %s", name, record["checkpoint"])
        release_freed_memory()
        reset_peak_memory(device)
        quality = measure_variant(recipe, output, record, key, device, dtype, tasks_dtype, base, shared,
                                  keep_reference)
        quality["measured_dtype"] = measured_in
        # kept before speed is timed: a run killed while timing keeps the tasks it measured
        ownership.write_owned(output, f"eval/{name}.json", json.dumps(quality, indent=2) + "\n")
    else:
        log.info("stage evaluate: %s: perplexity and tasks unchanged (cached), timing its speed", name)
    result = {**quality, **served}
    if skey is not None:
        with stop.stage(f"timing {name}'s decode speed"):
            speed = measure_speed(ev, record, base, base_measured, device, tasks_dtype)
        result = {**quality, **speed, "speed_key": skey, **served}
        ownership.write_owned(output, f"eval/{name}.json", json.dumps(result, indent=2) + "\n")
    return result


def reference_rel(ev: Evaluation, base: dict, device: str, tasks_dtype) -> str:
    """Where the baseline's log-probabilities for KL are kept (eval/perplexity.ReferenceFile), named by the
    baseline's evaluation key: another checkpoint, text or window setting is another file."""
    return f"eval/{base['name']}.logprobs-{eval_key(ev, base, device, tasks_dtype)}.f32"


def remove_reference(recipe: Recipe, output: Path, base: dict | None, device: str, dtype) -> None:
    """Every row is measured: delete the baseline's log-probabilities (GBs; a later run that adds a variant makes
    them again in one baseline pass). A run killed before this point keeps them for the rerun."""
    if base is not None and recipe.evaluation.perplexity:
        rel = reference_rel(recipe.evaluation, base, device, measure_dtype(recipe.evaluation, device, dtype)[0])
        if ownership.remove_owned(output, rel):
            log.info("stage evaluate: removed %s (the KL reference; every row is measured)", output / rel)


def measure_variant(recipe: Recipe, output: Path, record: dict, key: str, device: str, dtype, tasks_dtype,
                    base: dict | None, shared: dict, keep_reference: bool = True) -> dict:
    """One variant's figures, from its checkpoint, in its engine (eval/engines.for_row: GGUF rows' perplexity and KL
    in llama.cpp on the file itself; lm-eval needs a transformers model, so their tasks read the same file
    dequantized: same weights). Perplexity and KL in `dtype`, the tasks in `tasks_dtype` (measure_dtype: the model
    is loaded again in it when the two differ). One model in memory at a time: the baseline's pass saves its
    log-probabilities to a file (`reference_rel`) that every other row's KL reads; `shared` carries the tokenized
    perplexity text."""
    from transformers import AutoTokenizer

    from compress.environment import peak_memory_bytes

    ev = recipe.evaluation
    name, engine = record["name"], for_row(record)
    is_base = base is not None and name == base["name"]
    tok = AutoTokenizer.from_pretrained(engine.folder)
    reference = None
    if ev.perplexity and base is not None and not is_base:
        # before this row's model loads
        reference = _reference(recipe, output, base, device, dtype, tasks_dtype, tok, shared)
    seconds: dict[str, float] = {}
    model = None
    if engine.engine.scores_in_model:
        with timed(seconds, "load"):
            model = engine.load_model(dtype, device)
    result: dict = {"eval_key": key, "quality_seconds": seconds}
    run_name, tasks_name = str(dtype).removeprefix("torch."), str(tasks_dtype).removeprefix("torch.")
    served = _served_reference(ev, record, engine, run_name, tok, shared, device)
    if record.get("kv_cache"):
        from eval.kvcache import apply_kv_cache

        result["kv_eval"] = apply_kv_cache(model, record)
    ppl_prefix = None
    if ev.perplexity:
        prefix = served.windows if served is not None and served.wants(run_name) else None
        with stop.stage(f"measuring {name}'s perplexity"), timed(seconds, "perplexity"):
            if is_base and keep_reference:
                with ownership.owned_stream(output, reference_rel(ev, base, device, tasks_dtype)) as write:
                    result.update(_perplexity(ev, name, engine, model, tok, shared, is_base=True,
                                              keep=_float32_to(write), prefix_windows=prefix))
            else:
                result.update(_perplexity(ev, name, engine, model, tok, shared, is_base=is_base,
                                          reference=reference, prefix_windows=prefix))
        ppl_prefix = result["perplexity"].pop("prefix", None) or result["perplexity"]
    if served is not None and model is not None and served.wants(run_name):
        with stop.stage(f"taking {name}'s transformers reference for vLLM ({run_name})"):
            served.take(model, run_name, ppl_prefix)
    if ev.tasks:
        from eval.accuracy import run_tasks

        if model is None or tasks_dtype != dtype:
            del model
            with timed(seconds, "load"):
                model = engine.load_model(tasks_dtype, device)
            if record.get("kv_cache"):
                from eval.kvcache import apply_kv_cache

                apply_kv_cache(model, record)
        with stop.stage(f"measuring {name}'s tasks (lm-eval)"), timed(seconds, "tasks"):
            result["tasks"] = run_tasks(model, tok, ev.tasks, Path(ev.data_dir).expanduser(),
                                        num_fewshot=ev.num_fewshot, limit=ev.limit, batch_size=ev.batch_size,
                                        device=device, scorer=ev.task_scorer)
        result["tasks_engine"] = engine.engine.tasks
        if served is not None and served.wants(tasks_name):
            with stop.stage(f"taking {name}'s transformers reference for vLLM ({tasks_name})"):
                served.take(model, tasks_name)
    if served is not None and served.stored():
        result["vllm_reference"] = served.stored()
    del model
    result["evaluate_peak_memory_bytes"], result["evaluate_peak_memory_kind"] = peak_memory_bytes(device)
    return result


def _served_reference(ev: Evaluation, record: dict, engine: Row, run_dtype: str, tok, shared: dict, device: str):
    """What this row's vLLM agreement needs from transformers, to be taken with the models this pass loads
    (eval/agreement.MainPass); None when the row is not served, or its model here is not the checkpoint as vLLM
    loads it (another engine's scores, a simulated KV format)."""
    from eval import agreement
    from eval.served_setup import not_served, ppl_windows, reference_dtypes, reference_inputs

    if ev.vllm is None or not engine.engine.scores_in_model or record.get("kv_cache") or not_served(record):
        return None
    with_ppl = bool(ev.perplexity and ev.vllm.perplexity)
    return agreement.MainPass(inputs=reference_inputs(ev), dtypes=reference_dtypes(record, run_dtype),
                              prompts=[tok(p).input_ids for p in ev.selfcheck_prompts], n=ev.vllm.agreement_tokens,
                              device=device, ppl_ids=_ppl_ids(ev, tok, shared) if with_ppl else None,
                              ppl=ev.perplexity, windows=ppl_windows(ev) if with_ppl else None)


def _ppl_ids(ev: Evaluation, tok, shared: dict):
    if shared["ppl_ids"] is None:
        text = (Path(ev.data_dir).expanduser() / ev.perplexity.file).read_text()
        shared["ppl_ids"] = tok(text, return_tensors="pt").input_ids[0]
    return shared["ppl_ids"]


def _float32_to(write):
    """The `keep` callback of eval/perplexity.evaluate_tokens that appends each window's log-probabilities to the
    baseline's file (`write`: an ownership.owned_stream), as the raw float32 rows ReferenceFile reads back."""
    return lambda logp: write(logp.contiguous().numpy().tobytes())


def _reference(recipe: Recipe, output: Path, base: dict, device: str, dtype, tasks_dtype, tok, shared: dict):
    """The baseline's log-probabilities on the perplexity windows (eval/perplexity.ReferenceFile), opened for
    reading; made first (one baseline pass, the baseline alone in memory) when no complete file is there, e.g. when
    the baseline's own figures were reused from a run before this file existed, or it was removed."""
    from eval import perplexity
    from eval.engines import transformers as hf

    ev = recipe.evaluation
    p = ev.perplexity
    rows = perplexity.scored_rows(len(_ppl_ids(ev, tok, shared)), p.context, p.stride, p.max_windows)
    rel = reference_rel(ev, base, device, tasks_dtype)
    ref = perplexity.ReferenceFile(output / rel)
    if not ref.complete(rows):
        log.info("stage perplexity: writing the baseline's log-probabilities for KL (%s)", output / rel)
        model = hf.load_checkpoint(Path(base["checkpoint"]), dtype, device)
        with ownership.owned_stream(output, rel) as write:
            perplexity.evaluate_tokens(model, shared["ppl_ids"], context=p.context, stride=p.stride,
                                       max_windows=p.max_windows,
                                       keep=_float32_to(write))
        del model
    return ref.open(rows)


def _perplexity(ev: Evaluation, name: str, engine: Row, model, tok, shared: dict, *, is_base: bool,
                reference=None, keep=None, prefix_windows: int | None = None) -> dict:
    """Perplexity on the recipe's text file in the row's engine and, against the baseline's log-probabilities
    (`reference`), KL and top-1 agreement (the baseline's own: 0 and 100%)."""
    from eval import perplexity

    data_dir = Path(ev.data_dir).expanduser()
    ids = _ppl_ids(ev, tok, shared)
    try:
        with engine.scorer(ev.perplexity.context, model) as scorer:
            p = perplexity.evaluate_tokens(scorer, ids, context=ev.perplexity.context, stride=ev.perplexity.stride,
                                           max_windows=ev.perplexity.max_windows, reference=reference, keep=keep,
                                           prefix_windows=prefix_windows)
    finally:
        if reference is not None:
            reference.close()
    kl = p.pop("kl", None) if not is_base else {"mean": 0.0, "stderr": 0.0, "top1_agreement": 1.0,
                                                          "tokens": p["tokens"]}
    log.info("stage perplexity: %s ppl %.3f, KL %.4g over %d tokens (%s)", name, p["value"],
             kl["mean"] if kl else float("nan"), p["tokens"], engine.engine.name)
    return {"perplexity": {**p, "file": str(data_dir / ev.perplexity.file), "engine": engine.engine.name}, "kl": kl}


def measure_speed(ev: Evaluation, record: dict, base: dict | None, base_measured: dict | None, device: str,
                  dtype) -> dict:
    """A row's speed figures: absolute decode tok/s in its engine (`_throughput`) and, for every row but the
    baseline, its ratio to the baseline from interleaved rounds (`_ratio`). KV-cache rows get none: transformers
    only simulates their KV format, so their decode speed would not be that of an engine storing the cache so."""
    name = record["name"]
    if record.get("kv_cache"):
        log.info("stage throughput: %s skipped: transformers only simulates its KV format, so its decode speed "
                 "would not be that of an engine storing the cache that way", name)
        return {}
    seconds: dict[str, float] = {}
    with timed(seconds, "throughput"):
        out = _throughput(ev.throughput, name, for_row(record), device, dtype)
    if base is not None and name != base["name"] and (base_measured or {}).get("throughput"):
        with timed(seconds, "speed_ratio"):
            out["speed_ratio"] = _ratio(ev.throughput, record, base, base_measured, out, device, dtype)
    return {**out, "speed_seconds": seconds}


def _ratio(t, record: dict, base: dict, base_measured: dict, speed: dict, device: str, dtype) -> dict:
    """The row's speed ratio to the baseline, from `t.rounds` interleaved batch-1 rounds of both in one process
    (eval/interleaved.py). Both must fit in memory at once; when they do not, the ratio is not measured (and the
    report says why) rather than taken from two medians timed apart."""
    from compress.resources import available_memory_bytes
    from eval.interleaved import speed_ratio_in_subprocess

    name = record["name"]
    need = base_measured["throughput"]["weight_bytes_in_memory"] + speed["throughput"]["weight_bytes_in_memory"]
    if str(device).startswith("cuda"):
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        free = available_memory_bytes()
    if free is not None and need * 1.25 + (512 << 20) > free:
        log.warning("stage speed-ratio: %s not measured: it and the baseline (%.1f GB together) do not fit in the "
                    "%.1f GB free", name, need / 1e9, free / 1e9)
        return {"skipped": f"the variant and the baseline need {need / 1e9:.1f} GB together, {free / 1e9:.1f} GB "
                           f"free: the interleaved ratio needs both loaded at once"}
    log.info("stage speed-ratio: %s vs %s, at most %d interleaved rounds (batch 1, own process)", name,
             base["name"], t.rounds)
    out = speed_ratio_in_subprocess(for_row(base).decoder_spec(t, device, dtype),
                                    for_row(record).decoder_spec(t, device, dtype),
                                    prompt_tokens=t.prompt_tokens, new_tokens=t.new_tokens, rounds=t.rounds,
                                    retries=t.retries, threshold=t.contention_threshold, width=t.ratio_width)
    log.info("stage speed-ratio: %s %.3fx the baseline [%.3f, %.3f] (%s) from %d rounds%s", name, out["ratio"],
             out["ratio_lo"], out["ratio_hi"], out["verdict"], out["rounds"],
             ", CONTENDED" if out["contention"]["contended"] else "")
    return out


def _throughput(t, name: str, engine: Row, device: str, dtype) -> dict:
    """Decode benchmark in the row's engine, in its own process, between two bandwidth probes; the roofline of each
    batch size against their mean (a shared host's bandwidth drifts). Contended timed runs are timed again
    (`t.retries`), and a row that never got a quiet machine is flagged."""
    from eval import throughput

    log.info("stage bandwidth: measuring %s memory read bandwidth (large read-only stream)", device)
    bandwidth = throughput.measure_bandwidth(device=device)
    shape = {"prompt_tokens": t.prompt_tokens, "new_tokens": t.new_tokens, "repeats": t.repeats,
             "retries": t.retries, "threshold": t.contention_threshold,
             "bandwidth_bytes_per_sec": bandwidth["bytes_per_sec"]}
    bench = engine.benchmark(name, t, device, dtype, **shape)
    contended = [b for b, r in bench["batches"].items() if r["contention"]["contended"]]
    if contended:
        log.warning("stage throughput: %s batch %s timed under contention (other processes on these cores after "
                    "%d retries): flagged", name, ", ".join(contended), t.retries)
    bandwidth = throughput.bracketed(bandwidth, throughput.measure_bandwidth(device=device))
    rooflines = {b: throughput.rebound(rf, bandwidth["bytes_per_sec"]) for b, rf in bench.pop("roofline").items()}
    roofline = rooflines.get("1") or next(iter(rooflines.values()))
    roofline["per_batch"] = {b: {k: r[k] for k in ("bound_tok_per_sec", "utilisation")} for b, r in rooflines.items()}
    return {"bandwidth": bandwidth, "throughput": bench, "roofline": roofline}


def finish(measured: dict[str, dict], records: dict[str, dict], base_name: str | None) -> None:
    """Copy each variant's figures into its record (per-item task scores stay in eval/<variant>.json), and add its
    recovery against the baseline, computed from the items (paired bootstrap)."""
    from eval.recovery import recovery

    for name, result in measured.items():
        summary = _without_rounds({k: v for k, v in result.items()  # the rounds stay in eval/<variant>.json
                                   if k not in ("eval_key", "speed_key", "vllm_key", "vllm_runtime_keys", "bandwidth",
                                                "quality_seconds", "speed_seconds", "vllm_reference")})
        if summary.get("vllm"):
            summary["vllm"] = _without_rounds(summary["vllm"])
        if summary.get("vllm_runtime"):
            summary["vllm_runtime"] = {rt: _without_rounds(v) for rt, v in summary["vllm_runtime"].items()}
        if "tasks" in (summary.get("vllm") or {}):
            summary["vllm"] = {**summary["vllm"], "tasks": {t: _served_summary(sc, (result.get("tasks") or {}).get(t))
                                                            for t, sc in summary["vllm"]["tasks"].items()}}
        if "tasks" in summary:
            summary["tasks"] = {t: {k: v for k, v in s.items() if k != "items"} for t, s in result["tasks"].items()}
        records[name].update(summary)
        records[name]["stage_seconds"] = stage_seconds(records[name], result)
        if base_name and name != base_name and "tasks" in result and "tasks" in measured.get(base_name, {}):
            base_items = {t: s["items"] for t, s in measured[base_name]["tasks"].items()}
            records[name]["recovery"] = recovery(base_items, {t: s["items"] for t, s in result["tasks"].items()})


@contextmanager
def timed(seconds: dict, stage: str):
    """Add the wall seconds of the block to `seconds[stage]` when it finishes (a stage that raised has no time)."""
    t0 = time.perf_counter()
    yield
    seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - t0, 1)


def stage_seconds(record: dict, result: dict) -> dict[str, float]:
    """Wall seconds per stage of one row, each taken when its figure was made (a figure reused from the cache keeps
    the time it cost then): compress (the build), load, perplexity (with KL), tasks (lm-eval), throughput, the
    interleaved speed ratio, and vLLM (every served row of the checkpoint: server start, requests, its transformers
    reference)."""
    out = {"compress": record.get("compress_seconds"), **result.get("quality_seconds", {}),
           **result.get("speed_seconds", {})}
    served = [result.get("vllm"), *(result.get("vllm_runtime") or {}).values()]
    if any(v and v.get("measure_seconds") is not None for v in served):
        out["vllm"] = round(sum(v.get("measure_seconds") or 0.0 for v in served if v), 1)
    return {k: out[k] for k in STAGES if out.get(k) is not None}


def _without_rounds(figures: dict) -> dict:
    """`figures` (a row's, or its vLLM row's) without the speed ratio's per-round list."""
    sr = figures.get("speed_ratio")
    if not sr or "per_round" not in sr:
        return figures
    return {**figures, "speed_ratio": {k: v for k, v in sr.items() if k != "per_round"}}


def _served_summary(served: dict, local: dict | None) -> dict:
    """A task's score through vLLM without its items, plus how many items it scored as the transformers pass on the
    same checkpoint did (`same_items`: a paired view that the two stderrs alone do not give)."""
    out = {k: v for k, v in served.items() if k != "items"}
    a, b = served.get("items"), (local or {}).get("items")
    if a is not None and b is not None and len(a) == len(b):
        out["same_items"] = sum(x == y for x, y in zip(a, b))
    return out


def run_info(ev: Evaluation, measured: dict[str, dict]) -> dict:
    """The run's evaluation settings, and its bandwidth: the figures every row's bound was computed with (one per
    throughput row), their median and range."""
    run_info: dict = {"evaluation": ev.model_dump(exclude={"selfcheck_prompts"})}
    bandwidths = [r["bandwidth"] for r in measured.values() if "bandwidth" in r]
    if bandwidths:
        figures = [b["bytes_per_sec"] for b in bandwidths]
        run_info["bandwidth"] = {**bandwidths[0], "bytes_per_sec": statistics.median(figures),
                                 "rows_bytes_per_sec_min": min(figures), "rows_bytes_per_sec_max": max(figures),
                                 "rows": len(figures)}
    return run_info
