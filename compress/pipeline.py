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
from compress.recipe import BNB_METHODS, InputError, Recipe, Variant

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
    check_backends(recipe, recipe_path)
    check_output(recipe, recipe_path)
    return source


REPORT_FILES = ("report.md", "report.html", "results.csv")


def check_output(recipe: Recipe, recipe_path: Path) -> None:
    """Every path the run will write is absent or provably compress's (compress/ownership.py); otherwise exit 2
    before any work, naming each path in the way."""
    from compress import ownership

    output = Path(recipe.output).expanduser()
    if output.exists() and not output.is_dir():
        raise InputError(f"{recipe_path}: output: {output} is a file; expected a folder (or a path to create)")
    if not output.is_dir():
        return
    errors = []
    for v in recipe.variants:
        try:
            ownership.check_checkpoint_dest(output / v.name)
        except ownership.ForeignPathError as e:
            errors.append(f"{recipe_path}: variants: {v.name}: {e}")
    for sub in ("eval", ".students"):
        if (output / sub).exists() and not (output / sub).is_dir():
            errors.append(f"{recipe_path}: output: {output / sub} is a file where compress keeps its {sub}/ folder; "
                          f"{ownership.HOW_TO_PROCEED}")
    rels = [RESULTS, *REPORT_FILES] + ([f"eval/{v.name}.json" for v in recipe.variants]
                                       if (output / "eval").is_dir() else [])
    errors += [f"{recipe_path}: output: {m}" for m in ownership.check_files(output, rels)]
    if errors:
        raise ownership.ForeignPathError("\n".join(errors))


# optional backends: (import name, what needs it, the pip extra that installs it)
BACKENDS = {"bnb": ("bitsandbytes", "bitsandbytes"), "gguf": ("llama_cpp", "llama-cpp-python")}


def check_backends(recipe: Recipe, recipe_path: Path) -> None:
    """A variant whose backend is not installed fails up front, naming the extra to install, before any work."""
    import importlib.util

    errors = []
    for i, v in enumerate(recipe.variants):
        kind = "bnb" if v.method in BNB_METHODS else v.method
        if kind not in BACKENDS:
            continue
        module, package = BACKENDS[kind]
        if importlib.util.find_spec(module) is None:
            errors.append(f"{recipe_path}: {recipe.field_path(i, 'method')}: {v.method!r} needs {package}, which is "
                          f"not installed; install the optional extra: pip install -e '.[edge]'")
    if errors:
        raise InputError("\n".join(errors))


def _not_evaluated_on(path: Path, field: str, eval_files: set[Path]) -> None:
    """Training or calibrating on the text a variant is then scored on makes its scores meaningless."""
    if path.expanduser().resolve() in eval_files:
        raise InputError(f"{field}: {path} is an evaluation file of this recipe (perplexity or task data); "
                         f"calibrate and distill on other text, e.g. ../shared/data/calibration/c4_validation_2k.jsonl")


def check_group_sizes(recipe: Recipe, recipe_path: Path, config) -> None:
    from compress.quantize import quantized_input_widths

    errors = []
    layers = getattr(config, "num_hidden_layers", None)
    for i, v in enumerate(recipe.variants):
        drop = v.distill.student.drop if v.distill else None
        if drop and layers and max(drop) >= layers:
            errors.append(f"{recipe_path}: {recipe.field_path(i, 'distill.student.drop')}: {drop} names layers "
                          f"beyond the teacher's 0..{layers - 1}")
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
    samples, seq_len = cal.shape_for(v.method)
    out = {"source": cal.source, "text_field": cal.text_field, "split": cal.split, "seed": cal.seed,
           "samples": v.samples or samples, "seq_len": v.seq_len or seq_len}
    if v.uses_llmcompressor:  # part of the cache key: GPTQ under "basic" and "sequential" gives different weights
        from compress.quantize import PIPELINE

        out["pipeline"] = PIPELINE
    return out


LATER_FIELDS = ("kv_cache", "distill", "compute_dtype", "double_quant", "gguf_type", "imatrix")


def variant_versions(v: Variant, versions: dict, env: dict) -> dict:
    """The library versions that decide a variant's weights: the common ones, plus its backend's."""
    if v.method in BNB_METHODS:
        return {**versions, "bitsandbytes": env.get("bitsandbytes")}
    if v.method == "gguf":
        return {**versions, "llama_cpp_python": env.get("llama_cpp_python")}
    return versions


def cache_key(recipe: Recipe, v: Variant, source: Source, device: str, dtype, versions: dict) -> str:
    cal = _calibration_settings(recipe, v)
    if cal is not None:
        cal = {**cal, "digest": calib.file_digest(recipe.calibration)}
    # fields added later hash only when set, so checkpoints built before they existed stay valid
    variant = v.model_dump(exclude={k for k in LATER_FIELDS if getattr(v, k) is None})
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

    from compress import ownership, resources
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
    bar = tqdm(recipe.variants, desc="variants", unit="variant")
    for v in bar:
        bar.set_postfix_str(v.name)
        dest = output / v.name
        key = keys[v.name]
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
                error = resources.one_line(e, dest, needs.get(v.name))
                log.error("variant %s FAILED: %s", v.name, error)
                log.debug("variant %s traceback:\n%s", v.name, traceback.format_exc())
                records[v.name] = {"name": v.name, "method": v.method, "scheme": v.scheme, "status": "failed",
                                   "error": error, "checkpoint": None, "environment": env}
            release_freed_memory()  # each variant's peak starts from a clean heap, not the last one's high-water mark
        results = {"recipe": str(recipe_path), "model": source_info, "environment": env,
                   "variants": list(records.values())}
        ownership.write_owned(output, RESULTS, json.dumps(results, indent=2) + "\n")
    add_kv_memory(recipe, records, config)
    if recipe.evaluation.enabled:
        try:
            results.update(evaluate.evaluate_run(recipe, output, records, device, dtype))
        except (InputError, KeyboardInterrupt):
            raise
        except Exception as e:
            failed += 1
            error = resources.one_line(e, output / "eval")
            log.error("evaluation FAILED: %s", error)
            log.debug("evaluation traceback:\n%s", traceback.format_exc())
            results["evaluation_error"] = error
        for record in records.values():  # the model cards gain the figures just measured
            folder = Path(record["checkpoint"] or "")
            if record["status"] == "ok" and {"perplexity", "tasks", "throughput"} & set(record):
                record["size_bytes"] = checkpoint.refresh_card(folder, model_card(record, source_info, folder))
        ownership.write_owned(output, RESULTS, json.dumps(results, indent=2) + "\n")
    from compress.report import write_report

    paths = write_report(results, output)
    log.info("stage done: %d variants, %d failed; results in %s, report in %s", len(records), failed,
             output / RESULTS, paths["md"])
    return 1 if failed else 0


def check_resources(recipe: Recipe, source: Source, config, device: str, dtype, output: Path,
                    keys: dict[str, str]) -> dict:
    """Refuse (exit 2, with the numbers) a run whose variants still to build cannot fit on the disks they write to,
    or whose peak memory exceeds what is available. Returns each variant's estimated bytes written."""
    import torch

    from compress import resources

    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    tokenizer_bytes = sum(p.stat().st_size for p in Path(source.path).glob("*")
                          if p.is_file() and p.name in TOKENIZER_FILES) if Path(source.path).is_dir() else 0
    needs = {v.name: resources.variant_write_bytes(v, config, dtype_bytes, tokenizer_bytes) for v in recipe.variants}
    to_build = [v for v in recipe.variants if _manifest_key(output / v.name) != keys[v.name]]
    items = {output: [(v.name, needs[v.name]) for v in to_build]}
    students = {json.dumps(v.distill.model_dump(), sort_keys=True) for v in to_build if v.distill}
    if students:
        items[output].append((f"{len(students)} distilled student(s)",
                              len(students) * resources.student_write_bytes(config, dtype_bytes)))
    offload = recipe.model.offload
    if offload and to_build:
        folder = Path(offload.folder) if offload.folder else output
        items.setdefault(folder, []).append(("offloaded weights", int(resources.params(config) * dtype_bytes)))
    resources.check_disk(items)
    if to_build and device == "cpu":
        peak = resources.check_memory(config, dtype_bytes, str(dtype).removeprefix("torch."),
                                      offload.max_cpu_memory_gb if offload else None)
        log.info("stage resources: %d variant(s) to build write about %.3g GB to %s; expected peak memory %.3g GB",
                 len(to_build), sum(needs[v.name] for v in to_build) / 1e9, output, peak / 1e9)
    # on a GPU the weights live in GPU memory, which `compress plan` sizes; host RAM holds little of them
    return needs


def _manifest_key(folder: Path) -> str | None:
    """The cache key a checkpoint folder's manifest names (no hashing: the cheap test of "already built")."""
    try:
        return json.loads((folder / checkpoint.MANIFEST).read_text()).get("cache_key")
    except (OSError, ValueError, AttributeError):
        return None


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
    if v.method == "gguf":
        return build_gguf_variant(recipe, v, source, source_info, device, dtype, env, key, dest, windows)
    offload = recipe.model.offload
    offload_dir = None
    try:
        if offload:  # a staging folder of this variant (in offload.folder or the output), never the folder itself
            parent = Path(offload.folder).expanduser() if offload.folder else dest.parent
            checkpoint.remove_stale_staging(parent)
            offload_dir = checkpoint.new_staging_dir(parent, f"offload-{v.name}")
        return _build_variant(recipe, v, source, source_info, device, dtype, env, key, dest, windows, offload_dir)
    finally:
        if offload_dir is not None:
            shutil.rmtree(offload_dir, ignore_errors=True)
        if v.uses_llmcompressor:  # also when the variant failed: its model must not live on into the next one
            from compress.quantize import release_session

            release_session()


def _build_variant(recipe: Recipe, v: Variant, source: Source, source_info: dict, device: str, dtype, env: dict,
                   key: str, dest: Path, windows: dict, offload_dir: Path | None) -> dict:
    import torch

    from compress.environment import peak_memory_bytes, reset_peak_memory

    output = dest.parent
    reset_peak_memory(device)
    offload = recipe.model.offload
    if v.method in BNB_METHODS and not v.distill:  # bitsandbytes quantizes while transformers loads the folder
        from transformers import AutoTokenizer

        model, tok = None, AutoTokenizer.from_pretrained(source.path)
    elif offload:
        from transformers import AutoTokenizer

        from compress.quantize import load_offloaded

        log.info("stage load: offloading beyond %.3g GB of weights to %s", offload.max_cpu_memory_gb, offload_dir)
        model = load_offloaded(source.path, dtype, offload.max_cpu_memory_gb * 1e9, offload_dir)
        tok = AutoTokenizer.from_pretrained(source.path)
    else:
        log.info("stage load: %s for variant %s", source.description, v.name)
        model, tok = load_model(source, device, dtype)
    cal = _calibration_settings(recipe, v)
    t0 = time.perf_counter()
    model, distilled, weights_folder = _student_or_model(v, model, tok, source, output, device, dtype, env)
    if v.method in BNB_METHODS:
        from compress import bnb

        del model  # the student, if any, is on disk: bitsandbytes quantizes it as transformers loads it
        log.info("stage compress: %s %s with bitsandbytes %s", v.name, v.scheme, bnb.version())
        model = bnb.load_quantized(weights_folder, v, device, dtype)
    uses_llmcompressor = v.uses_llmcompressor
    if uses_llmcompressor:
        batch = None
        if cal is not None:
            batch = _calibration_windows(recipe, cal, tok, windows)
            cal = {**cal, "tokens": len(batch) * len(batch[0]), "windows_digest": calib.windows_digest(batch)}
        from compress.quantize import compress_model

        log.info("stage compress: %s %s with llm-compressor", v.name, v.scheme)
        compress_model(model, v, batch)  # layer by layer, which is what lets an offloaded model calibrate
    compress_seconds = time.perf_counter() - t0
    peak_bytes, peak_kind = peak_memory_bytes(device)  # model load + compression (+ calibration data)

    prompts = recipe.evaluation.selfcheck_prompts
    staging = checkpoint.new_staging_dir(output, v.name)
    try:
        log.info("stage save: %s -> %s", v.name, dest)
        if v.method in BNB_METHODS:  # saved before its first forward: see compress/bnb.py (CPU repacking)
            checkpoint.save_model(model, tok, staging, quantized=False)
            reference = checkpoint.reference_logits(model, tok, prompts)
        else:
            reference = checkpoint.reference_logits(model, tok, prompts)
            checkpoint.save_model(model, tok, staging, quantized=uses_llmcompressor)
            if uses_llmcompressor:
                from compress.quantize import release_session

                release_session()
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
            "serve": serve_command(dest, saved_dtype, kv_fp8=v.kv_in_checkpoint,
                                   bitsandbytes=v.method in BNB_METHODS), "environment": env,
        }
        if v.method in BNB_METHODS:
            record["bnb"] = _bnb_facts(v, dtype, env)
        (staging / "README.md").write_text(model_card(record, source_info, dest))
        checkpoint.finalize(staging, dest, key, record)  # sets record["size_bytes"]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info("stage variant-done: %s %s, %.1f MB weights, %.1f s compress, self-check %.3g", v.name, v.scheme,
             record["weights_bytes"] / 1e6, compress_seconds, diff)
    return record


def _student_or_model(v: Variant, model, tok, source: Source, output: Path, device: str, dtype, env: dict):
    """(the model this variant compresses, the distillation summary or None, the folder of its full-precision
    weights): the loaded model itself, or the student distilled from it (trained once, shared by variants)."""
    if not v.distill:
        return model, None, Path(source.path)
    from distill.student import build_student, summary

    folder = output / ".students" / student_key(v, source, device, dtype, env)
    student, info = build_student(model, tok, v.distill, folder, device, dtype)
    return student, summary(info), folder / "student"


def _calibration_windows(recipe: Recipe, cal: dict, tok, windows: dict) -> list[list[int]]:
    """The run's calibration token windows of this shape, packed once per run."""
    shape = (cal["samples"], cal["seq_len"])
    if shape not in windows:
        log.info("stage calibration-data: packing %d x %d tokens from %s", *shape, cal["source"])
        windows[shape] = calib.pack_token_windows(calib.load_texts(recipe.calibration), tok, *shape, seed=cal["seed"])
    return windows[shape]


def _bnb_facts(v: Variant, dtype, env: dict) -> dict:
    compute = v.compute_dtype or str(dtype).removeprefix("torch.")
    if v.method == "bnb-nf4":
        return {"format": "NF4", "block_size": 64, "double_quant": bool(v.double_quant), "compute_dtype": compute,
                "skip_modules": v.ignore, "bitsandbytes": env.get("bitsandbytes")}
    return {"format": "LLM.int8", "outlier_threshold": 6.0, "skip_modules": v.ignore,
            "bitsandbytes": env.get("bitsandbytes")}


def build_gguf_variant(recipe: Recipe, v: Variant, source: Source, source_info: dict, device: str, dtype, env: dict,
                       key: str, dest: Path, windows: dict) -> dict:
    """A GGUF file of the variant's full-precision weights (the model, or its distilled student), made by llama.cpp's
    converter and quantizer, self-checked, with a model card and manifest, renamed into place when complete.

    Self-check: llama.cpp and transformers (which dequantizes GGUF on load) read the finished file and must agree
    on the self-check prompts (mean KL of their next-token distributions <= GGUF_ENGINE_MAX_KL): the file is
    readable by both, and the figures measured through either engine describe the same weights. Beside it, the
    file's divergence from the full-precision source is recorded (the quantization error, not a pass/fail check).
    """
    import torch

    from compress import gguf_file, llamacpp
    from compress.environment import available_cores, peak_memory_bytes, reset_peak_memory

    output = dest.parent
    reset_peak_memory(device)
    cal = _calibration_settings(recipe, v)
    model = tok = None
    distilled = None
    weights_folder = local_folder(source)
    if v.distill or v.imatrix:  # the student must be built; the importance matrix is observed on the HF model
        log.info("stage load: %s for variant %s", source.description, v.name)
        model, tok = load_model(source, device, dtype)
    t0 = time.perf_counter()
    if v.distill:
        model, distilled, weights_folder = _student_or_model(v, model, tok, source, output, device, dtype, env)
    imatrix_fn = None
    if v.imatrix:
        batch = _calibration_windows(recipe, cal, tok, windows)
        cal = {**cal, "tokens": len(batch) * len(batch[0]), "windows_digest": calib.windows_digest(batch)}
        imatrix_fn = _imatrix_for(model, batch)
    staging = checkpoint.new_staging_dir(output, v.name)
    try:
        gguf_name = f"model-{v.gguf_type}.gguf"
        log.info("stage compress: %s %s with llama.cpp (llama-cpp-python %s)", v.name, v.scheme, llamacpp.version())
        exported = llamacpp.export(weights_folder, staging / gguf_name, v.gguf_type, imatrix_fn=imatrix_fn,
                                   threads=available_cores(),
                                   tokenizer_from=Path(source.gguf) if source.gguf else None)
        compress_seconds = time.perf_counter() - t0
        peak_bytes, peak_kind = peak_memory_bytes(device)
        summary = gguf_file.summarize(staging / gguf_name)
        _copy_tokenizer(weights_folder, staging)
        log.info("stage self-check: %s read back by llama.cpp and by transformers", gguf_name)
        check = gguf_selfcheck(staging, gguf_name, weights_folder, recipe.evaluation.selfcheck_prompts,
                               model, dtype)
        if not check["engines_kl_mean"] <= GGUF_ENGINE_MAX_KL:  # also catches NaN
            raise SelfCheckError(f"llama.cpp and transformers disagree on {gguf_name}: mean KL "
                                 f"{check['engines_kl_mean']:.4g} > {GGUF_ENGINE_MAX_KL:g} nats on the self-check "
                                 f"prompts (top-1 agreement {check['engines_top1_agreement']:.2f})")
        model = imatrix_fn = None  # free the full-precision model before the card is written
        (staging / "compress-recipe.yaml").write_text(yaml.safe_dump({
            "model": recipe.model.model_dump(), "calibration": cal, "variant": v.model_dump()}, sort_keys=False))
        record = {
            "name": v.name, "method": v.method, "scheme": v.scheme, "bits": v.bits, "group_size": None,
            "symmetric": None, "ignore": [], "status": "ok", "checkpoint": str(dest),
            "saved_dtype": f"GGUF {v.gguf_type}", "weights_bytes": summary["tensor_bytes"],
            "compress_seconds": round(compress_seconds, 2), "compress_peak_memory_bytes": peak_bytes,
            "compress_peak_memory_kind": peak_kind, "selfcheck_max_abs_diff": check["engines_max_abs_diff"],
            "selfcheck_prompts": len(recipe.evaluation.selfcheck_prompts), "selfcheck": check,
            "calibration": cal, "cache_key": key, "kv_cache": None, "kv_in_checkpoint": False,
            "distill": distilled,
            "gguf": {"file": gguf_name, "type_requested": v.gguf_type, "imatrix": bool(v.imatrix),
                     "tokenizer": (f"from the source GGUF file {Path(source.gguf).name}" if source.gguf
                                   else "written by the converter from the HF tokenizer"),
                     "imatrix_tensors": exported["imatrix_tensors"], "intermediate": exported["intermediate"],
                     "converter": f"convert_hf_to_gguf.py of llama-cpp-python {llamacpp.version()}",
                     "quantizer": (f"llama_model_quantize of llama-cpp-python {llamacpp.version()}"
                                   if exported["intermediate"] else None),
                     **{k: summary[k] for k in ("file_bytes", "tensor_bytes", "params", "bits_per_weight", "types",
                                                "architecture", "n_layers", "n_kv_heads", "head_dim")}},
            "serve": gguf_serve_command(dest / gguf_name), "environment": env,
        }
        (staging / "README.md").write_text(model_card(record, source_info, dest))
        checkpoint.finalize(staging, dest, key, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info("stage variant-done: %s %s, %.1f MB tensors (%s), %.1f s compress, llama.cpp vs transformers KL %.3g",
             v.name, v.scheme, summary["tensor_bytes"] / 1e6, gguf_file.types_text(summary), compress_seconds,
             check["engines_kl_mean"])
    return record


def _imatrix_for(model, windows: list[list[int]]):
    """The importance-matrix callback of llamacpp.export: given the F16 GGUF file, observe `model` on the
    calibration `windows` and key the statistic by that file's tensor names."""
    def imatrix_fn(f16_path: Path) -> dict:
        from compress import gguf_file
        from compress.imatrix import gguf_tensor_names, importance_matrix

        summary = gguf_file.summarize(f16_path)
        names = gguf_tensor_names(model, summary["architecture"], set(summary["tensor_types"]))
        log.info("stage imatrix: mean x^2 of %d weight inputs over %d x %d calibration tokens", len(names),
                 len(windows), len(windows[0]))
        return importance_matrix(model, windows, names)

    return imatrix_fn


# llama.cpp multiplies quantized weights with activations it rounds to 8 bits (Q8_0/Q8_K blocks) and keeps the KV
# cache in F16; transformers multiplies the same dequantized weights in fp32. Measured between the two engines on
# SmolLM2's three default self-check prompts (23 positions): F16 4e-6, Q8_0 0.004, Q4_K_M 0.015, Q4_0 0.08 nats
# (this 135M model amplifies small perturbations: Q4_0 itself is 0.9 nats from its source on the same positions).
# A file the engines read differently (tensor layout, RoPE, norms, vocabulary) disagrees by whole nats.
GGUF_ENGINE_MAX_KL = 0.25


def local_folder(source: Source) -> Path:
    """The source's HF folder on disk (llama.cpp's converter reads files, not hub ids): a hub model is fetched into
    the Hugging Face cache once, at the revision its fingerprint names."""
    if source.kind != "hub":
        return Path(source.path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source.path, revision=source.fingerprint.rsplit("@", 1)[-1]))


def gguf_selfcheck(folder: Path, gguf_name: str, weights_folder: Path, prompts: list[str], model, dtype) -> dict:
    """Logits on the self-check prompts from llama.cpp and from transformers for the same GGUF file, and from the
    full-precision source; returns the engines' agreement and the file's divergence from its source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress import llamacpp

    tok = AutoTokenizer.from_pretrained(folder)
    ids = [tok(p)["input_ids"] for p in prompts]
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32).eval()
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(weights_folder, dtype=dtype).eval()
    engine = llamacpp.GGUFModel(folder / gguf_name, context=max(len(i) for i in ids) + 1)
    try:
        tokenizer_agrees = all(engine.llm.tokenize(p.encode(), add_bos=False, special=False)
                               == tok(p, add_special_tokens=False)["input_ids"] for p in prompts)
        with torch.no_grad():
            cpp = [engine.window_logits(i).float() for i in ids]
            hf = [loaded(torch.tensor([i])).logits[0].float() for i in ids]
            src = [model(torch.tensor([i], device=model.device)).logits[0].float().cpu() for i in ids]
    finally:
        engine.close()
        del loaded
    engines, vs_source = _divergence(hf, cpp), _divergence(src, cpp)
    return {"engines_kl_mean": engines["kl_mean"], "engines_top1_agreement": engines["top1_agreement"],
            "engines_max_abs_diff": engines["max_abs_diff"], "source_kl_mean": vs_source["kl_mean"],
            "source_top1_agreement": vs_source["top1_agreement"], "positions": engines["positions"],
            "tokenizer_agrees": tokenizer_agrees}


def _divergence(reference: list, other: list) -> dict:
    """Mean KL(P_reference || P_other) over every position of every prompt, top-1 agreement, max |logit diff|."""
    import torch

    ref = torch.cat(reference).double().log_softmax(-1)
    oth = torch.cat(other).double().log_softmax(-1)
    kl = (ref.exp() * (ref - oth)).sum(-1)
    return {"kl_mean": float(kl.mean()), "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).double().mean()),
            "max_abs_diff": float((torch.cat(reference) - torch.cat(other)).abs().max()), "positions": len(kl)}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")


def _copy_tokenizer(weights_folder: Path, staging: Path) -> None:
    """The HF tokenizer beside the GGUF file: the GGUF carries its own, but lm-eval and the perplexity windows
    tokenize with the HF one, exactly as for every other row (and `vllm serve FILE --tokenizer FOLDER` wants it)."""
    for name in TOKENIZER_FILES:
        if (weights_folder / name).is_file():
            shutil.copy2(weights_folder / name, staging / name)


def gguf_serve_command(path: Path) -> str:
    return f"llama-server -m {path.resolve()}"
