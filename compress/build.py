"""Building one variant's checkpoint: what every backend shares.

A backend (compress/backends/) says how its weights are made; the steps around that are the same for all and live
here, so that a checkpoint is never marked complete before it is:

    load (the model, or its distilled student) -> the backend's compress step -> reference logits
    -> save to a staging folder -> reload from disk and compare logits (self-check)
    -> compress-recipe.yaml, model card, manifest (last) -> rename into place

`Job` is what the run hands a backend: the recipe, the model source, the device, the cache key and destination, and
the calibration windows packed once per run. A distilled student is made by `python -m distill` (compress/worker.py
says why a command) and shared by every variant with the same distill settings.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compress import calibration as calib
from compress import checkpoint, resources, stop
from compress.card import model_card
from compress.keys import calibration_settings, student_key
from compress.load import Source, load_model
from compress.options import InputError, VariantBase
from compress.record import parse_record

log = logging.getLogger("compress")


class SelfCheckError(RuntimeError):
    pass


@dataclass
class Job:
    """One variant to build, and the run's shared state a backend may use."""

    recipe: Any  # compress.recipe.Recipe (typed loosely: the recipe module sits above the backends)
    source: Source
    source_info: dict
    device: str
    dtype: object
    env: dict
    key: str
    dest: Path
    windows: dict = field(default_factory=dict)  # (samples, seq_len) -> token windows, packed once per run
    offload_dir: Path | None = None  # this variant's own folder inside the offload folder, when offloading

    @property
    def output(self) -> Path:
        return self.dest.parent

    def calibration(self, v: VariantBase) -> dict | None:
        return calibration_settings(self.recipe, v)

    def calibration_windows(self, cal: dict, tok) -> tuple[list[list[int]], dict]:
        """The run's calibration token windows of this shape (packed once per run), and `cal` with what they were:
        token count and digest, recorded beside the checkpoint."""
        shape = (cal["samples"], cal["seq_len"])
        if shape not in self.windows:
            log.info("stage calibration-data: packing %d x %d tokens from %s", *shape, cal["source"])
            self.windows[shape] = calib.pack_token_windows(calib.load_texts(self.recipe.calibration), tok, *shape,
                                                           seed=cal["seed"])
        batch = self.windows[shape]
        return batch, {**cal, "tokens": len(batch) * len(batch[0]), "windows_digest": calib.windows_digest(batch)}

    def weights(self, v: VariantBase) -> tuple[Path | None, dict | None]:
        """(the folder of the full-precision weights this variant compresses, the distillation summary or None):
        None for the source itself, or the student distilled from it, made once and shared (`python -m distill`)."""
        if not v.distill:
            return None, None
        from compress.worker import run_worker

        folder = self.output / ".students" / student_key(v, self.source, self.device, self.dtype, self.env)
        summary = run_worker("distill", {"teacher": self.recipe.model.model_dump(), "settings": v.distill.model_dump(),
                                         "folder": str(folder), "device": self.device,
                                         "dtype": str(self.dtype).removeprefix("torch.")},
                             f"distillation of {v.name}'s student", show_log=True)
        return folder / "student", summary

    def local_source(self) -> Path:
        """The source's HF folder on disk (llama.cpp's converter reads files, not hub ids): a hub model is fetched
        into the Hugging Face cache once, at the revision its fingerprint names."""
        if self.source.kind != "hub":
            return Path(self.source.path)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.source.path, revision=self.source.fingerprint.rsplit("@", 1)[-1]))

    def load(self, weights: Path | None):
        """(model, tokenizer): the source as the recipe loads it (`weights` None), or a student folder; always the
        source's tokenizer."""
        if weights is None:
            log.info("stage load: %s", self.source.description)
            return load_model(self.source, self.device, self.dtype)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("stage load: the distilled student %s", weights)
        tok = AutoTokenizer.from_pretrained(self.source.path)
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=self.dtype, device_map=self.device).eval()
        return model, tok

    def load_offloaded(self, path, folder: Path):
        """`path`'s weights with at most the recipe's `model.offload.max_cpu_memory_gb` in RAM, the rest in
        `folder` (compress.load.load_offloaded)."""
        from compress.load import load_offloaded

        return load_offloaded(path, self.dtype, self.recipe.model.offload.max_cpu_memory_gb * 1e9, folder)


def base_record(job: Job, v: VariantBase, **fields) -> dict:
    """The fields every backend's record starts with (compress/record.py declares them all)."""
    return {"name": v.name, "method": v.method, "scheme": v.label, **fields, "status": "ok",
            "checkpoint": str(job.dest)}


def finish(job: Job, v: VariantBase, staging: Path, record: dict, cal: dict | None) -> dict:
    """Write the variant's compress recipe and model card into `staging`, then the manifest (last) and rename it into
    place (checkpoint.finalize sets record["size_bytes"]). Returns the record."""
    (staging / "compress-recipe.yaml").write_text(yaml.safe_dump({
        "model": job.recipe.model.model_dump(), "calibration": cal, "variant": v.model_dump()}, sort_keys=False))
    (staging / "README.md").write_text(model_card(record, job.source_info, job.dest))
    checkpoint.finalize(staging, job.dest, job.key, record)
    return record


def transformers_checkpoint(job: Job, v: VariantBase, compress_step, *, quantized: bool, load_weights: bool = True,
                            save_before_forward: bool = False, after_save=None, serve_flags: dict | None = None,
                            extra: dict | None = None) -> dict:
    """The shared path of every backend that writes a Hugging Face checkpoint folder.

    `compress_step(job, v, model, tok, weights_folder, cal) -> (model, cal)` makes the variant's weights from the
    loaded model (`load_weights=False`: from the folder, e.g. bitsandbytes quantizing as it loads). The compress time
    is that step plus the student's distillation, not the loading. `quantized`: save as compressed-tensors.
    `save_before_forward`: save before the reference logits are taken (bitsandbytes: see its backend).
    `after_save()`: release what the backend's library keeps of the model."""
    import torch

    from compress.card import serve_command
    from compress.environment import peak_memory_bytes, reset_peak_memory

    reset_peak_memory(job.device)
    cal = job.calibration(v)
    t0 = time.perf_counter()
    weights, distilled = job.weights(v)
    distill_seconds = time.perf_counter() - t0
    model, tok = _load(job, weights, load_weights)
    t1 = time.perf_counter()
    model, cal = compress_step(job, v, model, tok, weights, cal)
    compress_seconds = distill_seconds + time.perf_counter() - t1
    peak_bytes, peak_kind = peak_memory_bytes(job.device)  # model load + compression (+ calibration data)
    prompts = job.recipe.evaluation.selfcheck_prompts
    offload = job.recipe.model.offload
    staging = checkpoint.new_staging_dir(job.output, v.name)
    try:
        log.info("stage save: %s -> %s", v.name, job.dest)
        if save_before_forward:
            checkpoint.save_model(model, tok, staging, quantized=quantized)
            reference = checkpoint.reference_logits(model, tok, prompts)
        else:
            reference = checkpoint.reference_logits(model, tok, prompts)
            checkpoint.save_model(model, tok, staging, quantized=quantized)
        if after_save:
            after_save()
        del model
        log.info("stage self-check: reloading %s from disk", v.name)
        # offloaded: reload within the same memory budget
        reload = (lambda folder: job.load_offloaded(folder, job.offload_dir / "selfcheck")) if offload else None
        diff = checkpoint.selfcheck(staging, prompts, reference, job.device, job.dtype, load=reload)
        tolerance = job.recipe.evaluation.selfcheck_max_abs_diff
        if not diff <= tolerance:  # also catches NaN
            raise SelfCheckError(f"reloaded checkpoint disagrees with the in-memory model: max abs logit diff "
                                 f"{diff:.4g} > {tolerance:g}")
        saved_dtype = str(job.dtype).removeprefix("torch.")
        record = base_record(job, v, bits=getattr(v, "bits", None), group_size=getattr(v, "group_size", None),
                             symmetric=getattr(v, "symmetric", None), ignore=v.ignore)
        record.update({
            "saved_dtype": saved_dtype, "weights_bytes": checkpoint.weights_size_bytes(staging),
            "compress_seconds": round(compress_seconds, 2), "compress_peak_memory_bytes": peak_bytes,
            "compress_peak_memory_kind": peak_kind, "selfcheck_max_abs_diff": diff,
            "offload": offload.model_dump() if offload else None,
            "selfcheck_prompts": len(prompts), "calibration": cal, "cache_key": job.key,
            "kv_cache": v.kv_cache.model_dump() if v.kv_cache else None, "kv_in_checkpoint": v.kv_in_checkpoint,
            "distill": distilled,
            "serve": serve_command(job.dest, saved_dtype, kv_fp8=v.kv_in_checkpoint, **(serve_flags or {})),
            "environment": job.env, **(extra or {})})
        finish(job, v, staging, record, cal)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info("stage variant-done: %s %s, %.1f MB weights, %.1f s compress, self-check %.3g", v.name, v.label,
             record["weights_bytes"] / 1e6, compress_seconds, diff)
    return record


def _load(job: Job, weights: Path | None, load_weights: bool):
    """(model or None, tokenizer) for the compress step: the model whole, or offloaded beyond the recipe's memory
    budget, or only the tokenizer when the backend loads the weights itself."""
    from transformers import AutoTokenizer

    offload = job.recipe.model.offload
    if not load_weights:
        return None, AutoTokenizer.from_pretrained(job.source.path)
    if offload:
        log.info("stage load: offloading beyond %.3g GB of weights to %s", offload.max_cpu_memory_gb, job.offload_dir)
        return (job.load_offloaded(str(weights or job.source.path), job.offload_dir),
                AutoTokenizer.from_pretrained(job.source.path))
    return job.load(weights)


@dataclass
class RunState:
    """What every variant's build and measurement share: decided once, by the process that runs the recipe (and
    handed as is to a cluster's tasks, so that they compute nothing the serial run would compute otherwise)."""

    recipe: Any  # compress.recipe.Recipe (typed loosely, as Job's)
    recipe_path: Path
    source: Source
    source_info: dict
    device: str
    dtype: object
    env: dict
    versions: dict  # the library versions in the cache keys: a cluster node must have the same
    output: Path
    keys: dict[str, str]  # variant -> cache key
    needs: dict[str, int]  # variant -> estimated bytes written (for a failed build's message)
    remeasure_speed: bool = False
    cwd: str = field(default_factory=os.getcwd)  # relative recipe paths resolve against it, on every node
    only_baseline: bool = False
    verify_from: dict[str, str] = field(default_factory=dict)  # strict auto variant -> the key its search began at


def failed_record(v, error: str, env: dict) -> dict:
    """The row of a variant that has no checkpoint: its build failed (or, on a cluster, its task was lost)."""
    return {"name": v.name, "method": v.method, "scheme": v.label, "status": "failed", "error": error,
            "checkpoint": None, "environment": env}


def build_variant(state: RunState, v, env: dict, windows: dict) -> dict:
    """One variant's record: its complete checkpoint reused (same cache key, files matching their sha256), or built
    by its backend; a variant that fails for its own reason is a failed record, not an exception. `env`: the
    environment of the process that builds it (recorded in the record)."""
    from compress.environment import release_freed_memory

    dest = state.output / v.name
    cached = cached_record(dest, state.keys[v.name])
    if cached is not None:
        log.info("stage cached: %s (%s) unchanged, checkpoint %s verified", v.name, v.label, dest)
        return {**cached, "cached": True}
    job = Job(state.recipe, state.source, state.source_info, state.device, state.dtype, env, state.keys[v.name], dest,
              windows)
    try:
        with stop.stage(f"building {v.name}"):
            return build(job, v)
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as e:
        error = resources.one_line(e, dest, state.needs.get(v.name))
        log.error("variant %s FAILED: %s", v.name, error)
        log.debug("variant %s traceback:\n%s", v.name, traceback.format_exc())
        return failed_record(v, error, env)
    finally:
        release_freed_memory()  # each variant's peak starts from a clean heap, not the last one's high-water mark


def cached_record(dest: Path, key: str) -> dict | None:
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
