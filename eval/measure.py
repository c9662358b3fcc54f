"""Measure every saved checkpoint: perplexity and KL to the baseline, lm-eval tasks, decode throughput, roofline.

What is measured is what ships: each variant is reloaded from its checkpoint folder by the engine that serves its
format (eval/engines/: transformers for Hugging Face folders, llama.cpp for GGUF files), as a user would. The
baseline is evaluated first and kept loaded as the KL reference, so both models see identical token windows.

Results are cached per variant in `<output>/eval/<variant>.json` under an evaluation key (the checkpoint's cache
key, the evaluation settings, the data files' digests, the lm-eval version), so a rerun re-measures only what
changed, and a killed evaluation continues with the next unmeasured variant. Per-item task scores stay in those
files; results.json gets the summary figures, and recovery (paired bootstrap) is computed from the items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from pathlib import Path

from typing import TYPE_CHECKING

from compress import ownership
from compress.checkpoint import sha256_file
from compress.options import Evaluation, InputError
from eval.accuracy import TASKS_DIR, available_tasks

if TYPE_CHECKING:
    from compress.recipe import Recipe

log = logging.getLogger("compress")

EVAL_FORMAT = 2  # bump when what an eval/<variant>.json holds changes, so older measurements are redone


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


def eval_key(ev: Evaluation, cache_key: str, device: str, gguf: bool = False) -> str:
    import lm_eval

    data_dir = Path(ev.data_dir).expanduser()
    settings = ev.model_dump(exclude={"selfcheck_prompts", "selfcheck_max_abs_diff"})
    if gguf:  # llama.cpp's attention kernel changes both the logits and the speed of GGUF rows
        from compress.llamacpp import FLASH_ATTENTION  # a constant: importing it does not load llama_cpp

        settings["llamacpp_flash_attention"] = FLASH_ATTENTION
    if settings["throughput"]:
        if not gguf:  # llama.cpp's threads change only the figures of GGUF rows
            settings["throughput"].pop("llamacpp_threads")
        # what the roofline divides by: figures cached under another bandwidth probe are measured again, so one
        # report never mixes two definitions of the bound
        from eval.throughput import BANDWIDTH_PROBE

        settings["throughput"]["bandwidth_probe"] = BANDWIDTH_PROBE
    blob = {"format": EVAL_FORMAT, "checkpoint": cache_key, "settings": settings, "device": device,
            "lm_eval": lm_eval.__version__,
            "task_files": {p.name: sha256_file(p)[:16] for p in sorted(TASKS_DIR.iterdir()) if p.is_file()},
            "ppl_file": sha256_file(data_dir / ev.perplexity.file)[:16] if ev.perplexity else None}
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


def evaluate_run(recipe: Recipe, output: Path, records: dict[str, dict], device: str, dtype) -> dict:
    """Measure each ok variant (baseline first), updating `records` in place. Returns run-level figures."""
    from tqdm import tqdm

    from compress.environment import release_freed_memory, reset_peak_memory

    ev = recipe.evaluation
    eval_dir = output / "eval"
    eval_dir.mkdir(exist_ok=True)
    names = sorted((n for n, r in records.items() if r["status"] == "ok"),
                   key=lambda n: records[n]["method"] != "baseline")
    base_name = next((n for n in names if records[n]["method"] == "baseline"), None)
    shared = {"reference": None, "ppl_ids": None}  # the baseline model (KL reference) and the perplexity tokens
    measured: dict[str, dict] = {}
    for name in tqdm(names, desc="evaluate", unit="variant"):
        record = records[name]
        key = eval_key(ev, record["cache_key"], device, gguf=bool(record.get("gguf")))
        path = eval_dir / f"{name}.json"
        cached = _read_cached(path)
        if cached and cached.get("eval_key") == key:
            log.info("stage evaluate: %s unchanged, reusing %s", name, path)
            measured[name] = cached
            continue
        log.info("stage evaluate: %s from %s", name, record["checkpoint"])
        release_freed_memory()
        reset_peak_memory(device)  # this variant's peak (the baseline stays loaded as the KL reference)
        measured[name] = measure_variant(recipe, record, key, device, dtype, records.get(base_name), shared)
        ownership.write_owned(output, f"eval/{name}.json", json.dumps(measured[name], indent=2) + "\n")
    _summarize(measured, records, base_name)
    return _run_info(ev, measured)


def measure_variant(recipe: Recipe, record: dict, key: str, device: str, dtype, base: dict | None,
                    shared: dict) -> dict:
    """One variant's figures, from its checkpoint. GGUF rows: perplexity, KL and decode run in llama.cpp on the file
    itself; lm-eval needs a transformers model, so the tasks read the same file dequantized (same weights, fp32
    arithmetic). `shared` carries the baseline model (kept loaded as every later variant's KL reference: no second
    load) and the tokenized perplexity text across variants."""
    from transformers import AutoTokenizer

    from compress.environment import peak_memory_bytes
    from eval.engines import transformers as hf

    ev = recipe.evaluation
    name, folder, gguf = record["name"], Path(record["checkpoint"]), record.get("gguf")
    is_base = base is not None and name == base["name"]
    model = None if gguf else hf.load_checkpoint(folder, dtype, device)
    tok = AutoTokenizer.from_pretrained(folder)
    result: dict = {"eval_key": key}
    if record.get("kv_cache"):
        from eval.kvcache import apply_kv_cache

        result["kv_eval"] = apply_kv_cache(model, record)
    if ev.perplexity:
        if not is_base and shared["reference"] is None and base is not None:
            shared["reference"] = hf.load_checkpoint(Path(base["checkpoint"]), dtype, device)
        result.update(_perplexity(ev, name, folder, gguf, model, tok, is_base, shared))
    if ev.tasks:
        from eval.accuracy import run_tasks

        if model is None:
            model = hf.load_checkpoint(folder, dtype, device, gguf_file=gguf["file"])
        result["tasks"] = run_tasks(model, tok, ev.tasks, Path(ev.data_dir).expanduser(), num_fewshot=ev.num_fewshot,
                                    limit=ev.limit, batch_size=ev.batch_size, device=device)
        result["tasks_engine"] = ("transformers, GGUF dequantized on load" if gguf else "transformers")
    if ev.throughput and record.get("kv_cache"):
        log.info("stage throughput: %s skipped: transformers only simulates its KV format, so its decode speed "
                 "would not be that of an engine storing the cache that way", name)
    elif ev.throughput:
        result.update(_throughput(ev.throughput, name, folder, gguf, device, dtype))
    if is_base:
        shared["reference"] = model  # the KL reference for every later variant
    del model
    result["evaluate_peak_memory_bytes"], result["evaluate_peak_memory_kind"] = peak_memory_bytes(device)
    return result


def _perplexity(ev: Evaluation, name: str, folder: Path, gguf: dict | None, model, tok, is_base: bool,
                shared: dict) -> dict:
    """Perplexity on the recipe's text file and, against the baseline (shared["reference"]), KL and top-1
    agreement (the baseline's own: 0 and 100%)."""
    from eval import perplexity
    from eval.engines import llamacpp as cpp

    data_dir = Path(ev.data_dir).expanduser()
    if shared["ppl_ids"] is None:
        text = (data_dir / ev.perplexity.file).read_text()
        shared["ppl_ids"] = tok(text, return_tensors="pt").input_ids[0]
    scorer = cpp.load(folder / gguf["file"], ev.perplexity.context) if gguf else model
    try:
        p = perplexity.evaluate_tokens(scorer, shared["ppl_ids"], context=ev.perplexity.context,
                                       stride=ev.perplexity.stride, max_windows=ev.perplexity.max_windows,
                                       reference=None if is_base else shared["reference"])
    finally:
        if gguf:
            scorer.close()
    kl = p.pop("kl", None) if not is_base else {"mean": 0.0, "stderr": 0.0, "top1_agreement": 1.0,
                                                          "tokens": p["tokens"]}
    engine = "llama.cpp" if gguf else "transformers"
    log.info("stage perplexity: %s ppl %.3f, KL %.4g over %d tokens (%s)", name, p["value"],
             kl["mean"] if kl else float("nan"), p["tokens"], engine)
    return {"perplexity": {**p, "file": str(data_dir / ev.perplexity.file), "engine": engine}, "kl": kl}


def _throughput(t, name: str, folder: Path, gguf: dict | None, device: str, dtype) -> dict:
    """Decode benchmark in the row's engine, in its own process, between two bandwidth probes; the roofline of each
    batch size against their mean (a shared host's bandwidth drifts)."""
    from eval import throughput

    log.info("stage bandwidth: measuring %s memory read bandwidth (large read-only stream)", device)
    bandwidth = throughput.measure_bandwidth(device=device)
    if gguf:
        from eval.engines.llamacpp import decode_benchmark_in_subprocess

        log.info("stage throughput: %s with llama.cpp (%s threads), %d prompt + %d new tokens, batch 1, "
                 "%d repeats (own process)", name, t.llamacpp_threads or "all", t.prompt_tokens, t.new_tokens,
                 t.repeats)
        bench = decode_benchmark_in_subprocess(
            folder / gguf["file"], prompt_tokens=t.prompt_tokens, new_tokens=t.new_tokens, repeats=t.repeats,
            threads=t.llamacpp_threads, bandwidth_bytes_per_sec=bandwidth["bytes_per_sec"])
    else:
        from eval.engines.transformers import benchmark_checkpoint_in_subprocess

        log.info("stage throughput: %s, %d prompt + %d new tokens, batches %s, %d repeats (own process)",
                 name, t.prompt_tokens, t.new_tokens, t.batch_sizes, t.repeats)
        bench = benchmark_checkpoint_in_subprocess(
            folder, prompt_tokens=t.prompt_tokens, new_tokens=t.new_tokens, batch_sizes=t.batch_sizes,
            repeats=t.repeats, device=device, dtype=str(dtype).removeprefix("torch."),
            bandwidth_bytes_per_sec=bandwidth["bytes_per_sec"])
    bandwidth = throughput.bracketed(bandwidth, throughput.measure_bandwidth(device=device))
    rooflines = {b: throughput.rebound(rf, bandwidth["bytes_per_sec"]) for b, rf in bench.pop("roofline").items()}
    roofline = rooflines.get("1") or next(iter(rooflines.values()))
    roofline["per_batch"] = {b: {k: r[k] for k in ("bound_tok_per_sec", "utilisation")} for b, r in rooflines.items()}
    return {"bandwidth": bandwidth, "throughput": bench, "roofline": roofline}


def _summarize(measured: dict[str, dict], records: dict[str, dict], base_name: str | None) -> None:
    """Copy each variant's figures into its record (per-item task scores stay in eval/<variant>.json), and add its
    recovery against the baseline, computed from the items (paired bootstrap)."""
    from eval.recovery import recovery

    for name, result in measured.items():
        summary = {k: v for k, v in result.items() if k not in ("eval_key", "bandwidth")}
        if "tasks" in summary:
            summary["tasks"] = {t: {k: v for k, v in s.items() if k != "items"} for t, s in result["tasks"].items()}
        records[name].update(summary)
        if base_name and name != base_name and "tasks" in result and "tasks" in measured.get(base_name, {}):
            base_items = {t: s["items"] for t, s in measured[base_name]["tasks"].items()}
            records[name]["recovery"] = recovery(base_items, {t: s["items"] for t, s in result["tasks"].items()})


def _run_info(ev: Evaluation, measured: dict[str, dict]) -> dict:
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
