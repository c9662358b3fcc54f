"""The run, top to bottom: check -> build each variant (or reuse it) -> measure -> report.

    compress/checks.py      everything checkable before weights are loaded (exit 2, nothing written)
    compress/backends/*     one module per method family builds a variant's checkpoint (compress/build.py: the
                            steps they share: save, self-check, model card, manifest last, rename into place)
    eval/measure.py         perplexity, KL, tasks, recovery, throughput of every saved checkpoint
    compress/report/        the comparison table, plots and provenance

Caching: a variant whose checkpoint carries the same cache key (compress/keys.py) and whose files still match their
sha256 is reused, so a second run is a no-op and a killed run continues with the first variant it had not finished.
results.json is rewritten after every variant (compress/record.py is its schema).
"""

from __future__ import annotations

import logging
import shutil
import traceback
from pathlib import Path

from compress import checkpoint, ownership, resources
from compress.build import Job
from compress.checks import check_inputs, check_resources
from compress.keys import cache_key, variant_versions
from compress.load import load_config, resolve_device_dtype
from compress.options import InputError
from compress.record import RESULTS, Record, Results, parse_record
from compress.recipe import Recipe

log = logging.getLogger("compress")


def run(recipe: Recipe, recipe_path: Path, remeasure_speed: bool = False) -> int:
    """Build every variant, measure it, write results.json and the report. Returns the exit code: 0 all ok, 1 some
    variant (or the evaluation) failed. `remeasure_speed`: time every row again, reusing the cached accuracy."""
    from tqdm import tqdm

    from compress.environment import configure_cpu, environment, release_freed_memory

    configure_cpu()
    log.info("stage check-inputs: %s", recipe_path)
    source = check_inputs(recipe, recipe_path, prepare=True)
    device, dtype = resolve_device_dtype(recipe.model)
    env = environment(device, dtype)
    versions = {k: env[k] for k in ("compress", "torch", "transformers", "llmcompressor", "compressed_tensors")}
    output = Path(recipe.output)
    config = load_config(source)
    keys = {v.name: cache_key(recipe, v, source, device, dtype, variant_versions(v, versions, env))
            for v in recipe.variants}
    needs = check_resources(recipe, source, config, device, dtype, output, keys)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_stale_staging(output)

    # transformers runs no code shipped with a model unless trust_remote_code=True, which compress never passes
    source_info = {"kind": source.kind, "description": source.description, "path": source.path,
                   "note": source.note, "trust_remote_code": False}
    records: dict[str, dict] = {}
    windows: dict[tuple, list[list[int]]] = {}  # (samples, seq_len) -> token windows, tokenized once per run
    failed = 0
    results = Results(recipe=str(recipe_path), model=source_info, environment=env, variants=[])
    bar = tqdm(recipe.variants, desc="variants", unit="variant")
    for v in bar:
        bar.set_postfix_str(v.name)
        dest = output / v.name
        cached = _cached(dest, keys[v.name])
        if cached is not None:
            log.info("stage cached: %s (%s) unchanged, checkpoint %s verified", v.name, v.scheme, dest)
            records[v.name] = {**cached, "cached": True}
        else:
            job = Job(recipe, source, source_info, device, dtype, env, keys[v.name], dest, windows)
            try:
                records[v.name] = build(job, v)
            except (InputError, KeyboardInterrupt):
                raise
            except Exception as e:
                failed += 1
                error = resources.one_line(e, dest, needs.get(v.name))
                log.error("variant %s FAILED: %s", v.name, error)
                log.debug("variant %s traceback:\n%s", v.name, traceback.format_exc())
                records[v.name] = {"name": v.name, "method": v.method, "scheme": v.scheme, "status": "failed",
                                   "error": error, "checkpoint": None, "environment": env}
            release_freed_memory()  # each variant's peak starts from a clean heap, not the last one's high-water mark
        _write(results, records, output)
    add_kv_memory(recipe, records, config)
    if recipe.evaluation.enabled:
        failed += measure(recipe, output, records, device, dtype, source_info, results, remeasure_speed)
        _write(results, records, output)
    from compress.report import write_report

    paths = write_report(results.dump(), output)
    log.info("stage done: %d variants, %d failed; results in %s, report in %s", len(records), failed,
             output / RESULTS, paths["md"])
    return 1 if failed else 0


def _cached(dest: Path, key: str) -> dict | None:
    """The record of a complete checkpoint built with this cache key whose files still match their sha256, or None
    (then it is built again; a record this version cannot read counts as none)."""
    from pydantic import ValidationError

    manifest = checkpoint.verify(dest, key)
    if manifest is None or manifest.get("record", {}).get("status") != "ok":
        return None
    try:
        return parse_record(manifest["record"]).dump()
    except ValidationError as e:
        log.warning("stage cached: %s has a record this version does not read (%s); building it again", dest,
                    e.errors()[0]["loc"])
        return None


def _write(results: Results, records: dict[str, dict], output: Path) -> None:
    """results.json through its schema: every record is validated as it is written."""
    results.variants = [Record.model_validate(r) for r in records.values()]
    ownership.write_owned(output, RESULTS, results.text())


def build(job: Job, v) -> dict:
    """One variant's checkpoint by its backend (`v.build`), with the offload folder it may need: a staging folder of
    this variant (in offload.folder or the output), never the folder itself."""
    offload = job.recipe.model.offload
    if offload and v.OFFLOADS:
        parent = Path(offload.folder).expanduser() if offload.folder else job.output
        checkpoint.remove_stale_staging(parent)
        job.offload_dir = checkpoint.new_staging_dir(parent, f"offload-{v.name}")
    try:
        return v.build(job)
    finally:
        if job.offload_dir is not None:
            shutil.rmtree(job.offload_dir, ignore_errors=True)


def measure(recipe: Recipe, output: Path, records: dict[str, dict], device: str, dtype, source_info: dict,
            results: Results, remeasure_speed: bool = False) -> int:
    """Evaluate every ok variant (eval/measure.py), then refresh the model cards with the figures. Returns the
    number of failures (0 or 1: an evaluation that failed is one line in results.json)."""
    from compress.card import model_card
    from eval.measure import evaluate_run

    failed = 0
    try:
        for key, value in evaluate_run(recipe, output, records, device, dtype, remeasure_speed).items():
            setattr(results, key, value)  # the run's evaluation settings and bandwidth
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as e:
        failed = 1
        error = resources.one_line(e, output / "eval")
        log.error("evaluation FAILED: %s", error)
        log.debug("evaluation traceback:\n%s", traceback.format_exc())
        results.evaluation_error = error
    for record in records.values():  # the model cards gain the figures just measured
        folder = Path(record["checkpoint"] or "")
        if record["status"] == "ok" and {"perplexity", "tasks", "throughput", "vllm"} & set(record):
            record["size_bytes"] = checkpoint.refresh_card(folder, model_card(record, source_info, folder))
    return failed


def add_kv_memory(recipe: Recipe, records: dict[str, dict], config) -> None:
    """Each ok variant's KV-cache figures at the planner's serving shape (config arithmetic, no weights loaded):
    bytes per token, bytes at context x batch, sequences that fit per GPU beside its weights vs a 16-bit cache."""
    from compress.options import KVCache
    from compress.planner import kv_memory, weight_bytes_estimate

    p = recipe.evaluation.planner
    for v in recipe.variants:
        record = records.get(v.name)
        if not record or record["status"] != "ok":
            continue
        weights = weight_bytes_estimate(config, *v.weight_format())
        record["kv_memory"] = kv_memory(config, KVCache(**record["kv_cache"]) if record.get("kv_cache") else None,
                                        weights, context=p.context, batch=p.batch, headroom=p.headroom)
