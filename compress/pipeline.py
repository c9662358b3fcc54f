"""The run: check inputs, then build each variant's checkpoint, skipping those already built with the same inputs.

Stages per variant: load a fresh model -> quantize (llm-compressor) -> reference logits -> save to a staging folder
-> reload from disk and compare logits (self-check) -> model card + manifest -> rename into place -> results.json.

Caching: a variant's cache key hashes everything that decides its weights (model fingerprint, variant settings,
calibration source digest and window shape, compute device/dtype, library versions). A complete checkpoint whose
manifest carries the same key and whose files still match their sha256 is reused, so a second run is a no-op and a
killed run continues with the first variant it had not finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import traceback
from pathlib import Path

import yaml

from compress import calibration as calib
from compress import checkpoint, evaluate
from compress.card import model_card, serve_command
from compress.load import Source, load_config, load_model, resolve_device_dtype, resolve_source
from compress.recipe import InputError, Recipe, Variant

log = logging.getLogger("compress")

RESULTS = "results.json"


class SelfCheckError(RuntimeError):
    pass


def check_inputs(recipe: Recipe, recipe_path: Path, *, prepare: bool) -> Source:
    """Everything that can be checked without loading weights. Raises InputError."""
    source = resolve_source(recipe.model, prepare=prepare)
    evaluate.check_inputs(recipe.evaluation)
    eval_files = evaluate.evaluation_files(recipe.evaluation)
    if recipe.calibration is not None:
        calib.check_source(recipe.calibration)
        _not_evaluated_on(Path(recipe.calibration.source), "calibration.source", eval_files)
    for i, v in enumerate(recipe.variants):
        if v.distill:
            field = recipe.field_path(i, "distill.data")
            from compress.recipe import Calibration

            try:
                calib.check_source(Calibration(source=v.distill.data, text_field=v.distill.text_field))
            except InputError as e:
                raise InputError(f"{recipe_path}: {field}: {str(e).split(': ', 1)[1]}") from None
            _not_evaluated_on(Path(v.distill.data), f"{recipe_path}: {field}", eval_files)
    resolve_device_dtype(recipe.model)
    check_group_sizes(recipe, recipe_path, load_config(source))
    return source


def _not_evaluated_on(path: Path, field: str, eval_files: set[Path]) -> None:
    """Training or calibrating on the text a variant is then scored on makes its scores meaningless."""
    if path.expanduser().resolve() in eval_files:
        raise InputError(f"{field}: {path} is an evaluation file of this recipe (perplexity or task data); "
                         f"calibrate and distill on other text, e.g. ../shared/data/calibration/c4_validation_2k.jsonl")


def check_group_sizes(recipe: Recipe, recipe_path: Path, config) -> None:
    from compress.quantize import quantized_input_widths

    errors = []
    for i, v in enumerate(recipe.variants):
        if not v.group_size:
            continue
        widths = quantized_input_widths(config, v.ignore)
        bad = {name: w for name, w in widths.items() if w % v.group_size}
        if bad:
            name, w = next(iter(bad.items()))
            ok = [g for g in (32, 64, 128, 256) if all(x % g == 0 for x in widths.values())]
            errors.append(f"{recipe_path}: {recipe.field_path(i, 'group_size')}: {v.group_size} does not divide the input width "
                          f"of {len(bad)} layers (e.g. {name}: {w}); expected a divisor of every quantized width "
                          f"{sorted(set(widths.values()))}, such as {ok or 'none of 32/64/128/256: use per-channel'}")
    if errors:
        raise InputError("\n".join(errors))


def _calibration_settings(recipe: Recipe, v: Variant) -> dict | None:
    if not v.calibrated:
        return None
    cal = recipe.calibration
    return {"source": cal.source, "text_field": cal.text_field, "split": cal.split, "seed": cal.seed,
            "samples": v.samples or cal.samples, "seq_len": v.seq_len or cal.seq_len}


def cache_key(recipe: Recipe, v: Variant, source: Source, device: str, dtype, versions: dict) -> str:
    cal = _calibration_settings(recipe, v)
    if cal is not None:
        cal = {**cal, "digest": calib.file_digest(recipe.calibration)}
    # fields added later hash only when set, so checkpoints built before they existed stay valid
    variant = v.model_dump(exclude={k for k in ("kv_cache", "distill") if getattr(v, k) is None})
    blob = {"model": source.fingerprint, "variant": variant, "calibration": cal, "device": device,
            "dtype": str(dtype), "versions": versions,
            "selfcheck": recipe.evaluation.model_dump(include={"selfcheck_prompts", "selfcheck_max_abs_diff"})}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def student_key(v: Variant, source: Source, device: str, dtype, env: dict) -> str:
    """Identity of a distilled student: teacher, distill settings, training data, compute and library versions.
    Variants that differ only in what happens after distillation (quantization, KV) share the student."""
    from compress.recipe import Calibration

    data = calib.file_digest(Calibration(source=v.distill.data))
    blob = {"teacher": source.fingerprint, "distill": v.distill.model_dump(), "data": data, "device": device,
            "dtype": str(dtype), "versions": {k: env[k] for k in ("torch", "transformers")}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def plan(recipe: Recipe, recipe_path: Path, measure_distill: bool = False) -> dict:
    """What a run would do, and whether each variant fits on common GPUs, without loading weights (--dry-run).

    With `measure_distill` (`compress run --dry-run`), distillation variants also get an estimated training time
    from a measured step, which loads the teacher."""
    from compress.planner import format_plan, plan_rows

    source = check_inputs(recipe, recipe_path, prepare=False)
    device, dtype = resolve_device_dtype(recipe.model)
    p = recipe.evaluation.planner
    from compress.kvcache import bytes_per_token

    config = load_config(source)
    memory = plan_rows(config, [(v.name, v.bits or 16, v.group_size) for v in recipe.variants],
                       context=p.context, batch=p.batch, headroom=p.headroom,
                       kv_bytes_per_token={v.name: bytes_per_token(config, v.kv_cache) for v in recipe.variants})
    rows = []
    for v in recipe.variants:
        cal = _calibration_settings(recipe, v)
        rows.append({"name": v.name, "method": v.method, "scheme": v.scheme, "ignore": v.ignore,
                     "calibration": f"{cal['samples']} x {cal['seq_len']} tokens of {cal['source']}" if cal else None,
                     "checkpoint": str(Path(recipe.output) / v.name)})
    out = {"model": source.description, "note": source.note, "device": device,
           "dtype": str(dtype).removeprefix("torch."), "output": recipe.output, "variants": rows,
           "memory_plan": memory, "memory_plan_table": format_plan(memory)}
    if measure_distill and any(v.distill and v.distill.steps for v in recipe.variants):
        out["distill_estimates"] = estimate_distillation(recipe, recipe_path, device, dtype)
    return out


def estimate_distillation(recipe: Recipe, recipe_path: Path, device: str, dtype) -> dict:
    """Time one distillation step per distinct distill setting (the only part of a dry run that loads weights:
    a step's cost depends on this machine, so it is measured, not guessed)."""
    from distill.student import estimate

    source = resolve_source(recipe.model, prepare=True)
    teacher, _ = load_model(source, device, dtype)
    out: dict = {}
    for v in recipe.variants:
        if v.distill and v.distill.steps:
            key = json.dumps(v.distill.model_dump(), sort_keys=True)
            if key not in out:
                log.info("stage dry-run: timing distillation steps for %s", v.name)
                out[key] = {"variants": [], **estimate(teacher, v.distill, device)}
            out[key]["variants"].append(v.name)
    return {"+".join(e["variants"]): {k: val for k, val in e.items() if k != "variants"} for e in out.values()}


def run(recipe: Recipe, recipe_path: Path) -> int:
    """Build every variant. Returns the exit code: 0 all ok, 1 some variant failed."""
    from tqdm import tqdm

    from compress.environment import configure_cpu, environment

    configure_cpu()
    log.info("stage check-inputs: %s", recipe_path)
    source = check_inputs(recipe, recipe_path, prepare=True)
    device, dtype = resolve_device_dtype(recipe.model)
    env = environment(device, dtype)
    versions = {k: env[k] for k in ("compress", "torch", "transformers", "llmcompressor", "compressed_tensors")}
    output = Path(recipe.output)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_stale_staging(output)

    source_info = {"kind": source.kind, "description": source.description, "path": source.path,
                   "note": source.note}
    records: dict[str, dict] = {}
    windows: dict[tuple, list[list[int]]] = {}  # (samples, seq_len) -> token windows, tokenized once per run
    failed = 0
    bar = tqdm(recipe.variants, desc="variants", unit="variant")
    for v in bar:
        bar.set_postfix_str(v.name)
        dest = output / v.name
        key = cache_key(recipe, v, source, device, dtype, versions)
        manifest = checkpoint.verify(dest, key)
        if manifest is not None and manifest.get("record", {}).get("status") == "ok":
            log.info("stage cached: %s (%s) unchanged, checkpoint %s verified", v.name, v.scheme, dest)
            records[v.name] = {**manifest["record"], "cached": True}
        else:
            try:
                records[v.name] = build_variant(recipe, v, source, source_info, device, dtype, env, key, dest,
                                                windows)
            except (InputError, KeyboardInterrupt):
                raise
            except Exception as e:
                failed += 1
                log.error("variant %s FAILED: %s\n%s", v.name, e, traceback.format_exc())
                records[v.name] = {"name": v.name, "method": v.method, "scheme": v.scheme, "status": "failed",
                                   "error": f"{type(e).__name__}: {e}", "checkpoint": None, "environment": env}
        results = {"recipe": str(recipe_path), "model": source_info, "environment": env,
                   "variants": list(records.values())}
        checkpoint.write_json_atomic(output / RESULTS, results)
    add_kv_memory(recipe, records, load_config(source))
    if recipe.evaluation.enabled:
        try:
            results.update(evaluate.evaluate_run(recipe, output, records, device, dtype))
        except (InputError, KeyboardInterrupt):
            raise
        except Exception as e:
            failed += 1
            log.error("evaluation FAILED: %s\n%s", e, traceback.format_exc())
            results["evaluation_error"] = f"{type(e).__name__}: {e}"
        for record in records.values():  # the model cards gain the figures just measured
            folder = Path(record["checkpoint"] or "")
            if record["status"] == "ok" and {"perplexity", "tasks", "throughput"} & set(record):
                record["size_bytes"] = checkpoint.refresh_card(folder, model_card(record, source_info, folder))
        checkpoint.write_json_atomic(output / RESULTS, results)
    from compress.report import write_report

    paths = write_report(results, output)
    log.info("stage done: %d variants, %d failed; results in %s, report in %s", len(records), failed,
             output / RESULTS, paths["md"])
    return 1 if failed else 0


def add_kv_memory(recipe: Recipe, records: dict[str, dict], config) -> None:
    """Each ok variant's KV-cache figures at the planner's serving shape (config arithmetic, no weights loaded):
    bytes per token, bytes at context x batch, sequences that fit per GPU beside its weights vs a 16-bit cache."""
    from compress import kvcache
    from compress.planner import weight_bytes_estimate
    from compress.recipe import KVCache

    p = recipe.evaluation.planner
    for v in recipe.variants:
        record = records.get(v.name)
        if not record or record["status"] != "ok":
            continue
        weights = weight_bytes_estimate(config, v.bits or 16, v.group_size)
        record["kv_memory"] = kvcache.memory(config, KVCache(**record["kv_cache"]) if record.get("kv_cache") else None,
                                             weights, context=p.context, batch=p.batch, headroom=p.headroom)


def build_variant(recipe: Recipe, v: Variant, source: Source, source_info: dict, device: str, dtype, env: dict,
                  key: str, dest: Path, windows: dict) -> dict:
    import torch

    from compress.environment import peak_memory_bytes, reset_peak_memory

    output = dest.parent
    reset_peak_memory(device)
    log.info("stage load: %s for variant %s", source.description, v.name)
    offload = recipe.model.offload
    offload_dir = Path(offload.folder) if offload and offload.folder else output / ".offload"
    if offload:
        from transformers import AutoTokenizer

        from compress.quantize import load_offloaded

        log.info("stage load: offloading beyond %.3g GB of weights to %s", offload.max_cpu_memory_gb, offload_dir)
        model = load_offloaded(source.path, dtype, offload.max_cpu_memory_gb * 1e9, offload_dir)
        tok = AutoTokenizer.from_pretrained(source.path)
    else:
        model, tok = load_model(source, device, dtype)
    cal = _calibration_settings(recipe, v)
    t0 = time.perf_counter()
    distilled = None
    if v.distill:
        from distill.student import build_student, summary

        folder = output / ".students" / student_key(v, source, device, dtype, env)
        model, info = build_student(model, tok, v.distill, folder, device, dtype)
        distilled = summary(info)
    uses_llmcompressor = v.method not in ("baseline", "none") or v.kv_in_checkpoint
    if uses_llmcompressor:
        batch = None
        if cal is not None:
            shape = (cal["samples"], cal["seq_len"])
            if shape not in windows:
                log.info("stage calibration-data: packing %d x %d tokens from %s", *shape, cal["source"])
                windows[shape] = calib.pack_token_windows(calib.load_texts(recipe.calibration), tok, *shape,
                                                          seed=cal["seed"])
            batch = windows[shape]
            cal = {**cal, "tokens": shape[0] * shape[1], "windows_digest": calib.windows_digest(batch)}
        from compress.quantize import compress_model

        log.info("stage compress: %s %s with llm-compressor", v.name, v.scheme)
        compress_model(model, v, batch, sequential=offload is not None)
    compress_seconds = time.perf_counter() - t0
    peak_bytes, peak_kind = peak_memory_bytes(device)  # model load + compression (+ calibration data)

    prompts = recipe.evaluation.selfcheck_prompts
    reference = checkpoint.reference_logits(model, tok, prompts)
    staging = checkpoint.new_staging_dir(output, v.name)
    try:
        log.info("stage save: %s -> %s", v.name, dest)
        checkpoint.save_model(model, tok, staging, quantized=uses_llmcompressor)
        del model
        log.info("stage self-check: reloading %s from disk", v.name)
        reload = None
        if offload:  # reload within the same memory budget
            from compress.quantize import load_offloaded

            def reload(folder):
                return load_offloaded(folder, dtype, offload.max_cpu_memory_gb * 1e9, offload_dir / "selfcheck")
        diff = checkpoint.selfcheck(staging, prompts, reference, device, dtype, load=reload)
        tolerance = recipe.evaluation.selfcheck_max_abs_diff
        if not diff <= tolerance:  # also catches NaN
            raise SelfCheckError(f"reloaded checkpoint disagrees with the in-memory model: max abs logit diff "
                                 f"{diff:.4g} > {tolerance:g}")
        saved_dtype = str(dtype).removeprefix("torch.")
        (staging / "compress-recipe.yaml").write_text(yaml.safe_dump({
            "model": recipe.model.model_dump(), "calibration": cal, "variant": v.model_dump()}, sort_keys=False))
        record = {
            "name": v.name, "method": v.method, "scheme": v.scheme, "bits": v.bits, "group_size": v.group_size,
            "symmetric": v.symmetric, "ignore": v.ignore, "status": "ok", "checkpoint": str(dest),
            "saved_dtype": saved_dtype, "weights_bytes": checkpoint.weights_size_bytes(staging),
            "compress_seconds": round(compress_seconds, 2), "compress_peak_memory_bytes": peak_bytes,
            "compress_peak_memory_kind": peak_kind, "selfcheck_max_abs_diff": diff,
            "offload": offload.model_dump() if offload else None,
            "selfcheck_prompts": len(prompts), "calibration": cal, "cache_key": key,
            "kv_cache": v.kv_cache.model_dump() if v.kv_cache else None, "kv_in_checkpoint": v.kv_in_checkpoint,
            "distill": distilled,
            "serve": serve_command(dest, saved_dtype, kv_fp8=v.kv_in_checkpoint), "environment": env,
        }
        (staging / "README.md").write_text(model_card(record, source_info, dest))
        checkpoint.finalize(staging, dest, key, record)  # sets record["size_bytes"]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if offload and not offload.folder:
            shutil.rmtree(offload_dir, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info("stage variant-done: %s %s, %.1f MB weights, %.1f s compress, self-check %.3g", v.name, v.scheme,
             record["weights_bytes"] / 1e6, compress_seconds, diff)
    return record
