"""Measure every saved checkpoint: perplexity and KL to the baseline, lm-eval tasks, decode throughput, roofline.

What is measured is what ships: each variant is reloaded from its checkpoint folder with plain transformers, as a
user would. The baseline is evaluated first and kept loaded as the KL reference, so both models see identical
token windows.

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

from compress.accuracy import TASKS_DIR, available_tasks
from compress import ownership
from compress.checkpoint import sha256_file
from compress.recipe import Evaluation, InputError, Recipe

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
    from compress.accuracy import task_config

    data_dir = Path(ev.data_dir).expanduser()
    files = {(data_dir / ev.perplexity.file).resolve()} if ev.perplexity else set()
    for t in ev.tasks:
        files |= {Path(f).resolve() for f in task_config(t, data_dir)["dataset_kwargs"]["data_files"].values()}
    return files


def apply_kv_cache(model, record: dict) -> dict:
    """Make `model` store its KV cache as the variant says, before anything is measured. Returns how.

    fp8: the checkpoint carries the calibrated scales and compressed-tensors already quantizes K/V with them on
    load; this only checks that it did (positive, finite scales in every layer), so fp8 figures can never silently
    come from a 16-bit cache. Other formats: the quantize-dequantize hook of compress.kvcache."""
    import math

    from compress import kvcache
    from compress.recipe import KVCache

    kv = KVCache(**record["kv_cache"])
    if record.get("kv_in_checkpoint"):
        scales = kvcache.checkpoint_kv_scales(model)
        layers = len(kvcache.attention_modules(model))
        if len(scales) != 2 * layers:
            raise RuntimeError(f"{record['name']}: expected k_scale and v_scale in each of {layers} attention layers "
                               f"after loading, found {len(scales)}: the fp8 KV cache would not be applied")
        values = [float(x) for t in scales.values() for x in t.flatten()]
        if not all(math.isfinite(x) and x > 0 for x in values):
            raise RuntimeError(f"{record['name']}: non-positive or non-finite KV scales in the checkpoint")
        return {"format": kv.label, "how": "checkpoint scales, applied by compressed-tensors on load",
                "scales": len(values), "scale_min": min(values), "scale_max": max(values)}
    kvcache.attach(model, kv)
    return {"format": kv.label, "how": "quantize-dequantize as K/V enter the cache (compress.kvcache)"}


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
        from compress.throughput import BANDWIDTH_PROBE

        settings["throughput"]["bandwidth_probe"] = BANDWIDTH_PROBE
    blob = {"format": EVAL_FORMAT, "checkpoint": cache_key, "settings": settings, "device": device,
            "lm_eval": lm_eval.__version__,
            "task_files": {p.name: sha256_file(p)[:16] for p in sorted(TASKS_DIR.iterdir()) if p.is_file()},
            "ppl_file": sha256_file(data_dir / ev.perplexity.file)[:16] if ev.perplexity else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def load_checkpoint(folder: Path, dtype, device: str):
    """A saved checkpoint loaded with plain transformers, as a user would."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()


def llamacpp_model(path: Path, context: int):
    """llama.cpp on one GGUF file, giving logits per window (compress.llamacpp, imported only for GGUF rows)."""
    from compress import llamacpp

    return llamacpp.GGUFModel(path, context=context)


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
    from transformers import AutoTokenizer

    from compress import perplexity, throughput
    from compress.environment import peak_memory_bytes, release_freed_memory, reset_peak_memory
    from compress.recovery import recovery

    ev = recipe.evaluation
    eval_dir = output / "eval"
    eval_dir.mkdir(exist_ok=True)
    data_dir = Path(ev.data_dir).expanduser()
    run_info: dict = {"evaluation": ev.model_dump(exclude={"selfcheck_prompts"})}

    names = sorted((n for n, r in records.items() if r["status"] == "ok"),
                   key=lambda n: records[n]["method"] != "baseline")
    base_name = next((n for n in names if records[n]["method"] == "baseline"), None)
    reference = None
    ppl_ids = None
    measured: dict[str, dict] = {}
    from tqdm import tqdm

    for name in tqdm(names, desc="evaluate", unit="variant"):
        record = records[name]
        gguf = record.get("gguf")
        key = eval_key(ev, record["cache_key"], device, gguf=bool(gguf))
        path = eval_dir / f"{name}.json"
        cached = _read_cached(path)
        if cached and cached.get("eval_key") == key:
            log.info("stage evaluate: %s unchanged, reusing %s", name, path)
            measured[name] = cached
            continue
        log.info("stage evaluate: %s from %s", name, record["checkpoint"])
        release_freed_memory()
        reset_peak_memory(device)  # this variant's peak (the baseline stays loaded as the KL reference)
        folder = Path(record["checkpoint"])
        # GGUF rows: perplexity, KL and decode run in llama.cpp on the file itself; lm-eval needs a transformers
        # model, so the tasks read the same file dequantized (same weights, fp32 arithmetic)
        gguf_path = folder / gguf["file"] if gguf else None
        model = None if gguf else load_checkpoint(folder, dtype, device)
        tok = AutoTokenizer.from_pretrained(folder)
        result: dict = {"eval_key": key}
        if record.get("kv_cache"):
            result["kv_eval"] = apply_kv_cache(model, record)
        if ev.perplexity:
            if ppl_ids is None:
                text = (data_dir / ev.perplexity.file).read_text()
                ppl_ids = tok(text, return_tensors="pt").input_ids[0]
            if name != base_name and reference is None and base_name is not None:
                reference = load_checkpoint(Path(records[base_name]["checkpoint"]), dtype, device)
            scorer = llamacpp_model(gguf_path, ev.perplexity.context) if gguf else model
            try:
                p = perplexity.evaluate_tokens(scorer, ppl_ids, context=ev.perplexity.context,
                                               stride=ev.perplexity.stride, max_windows=ev.perplexity.max_windows,
                                               reference=None if name == base_name else reference)
            finally:
                if gguf:
                    scorer.close()
            kl = p.pop("kl", None) if name != base_name else {"mean": 0.0, "stderr": 0.0, "top1_agreement": 1.0,
                                                               "tokens": p["tokens"]}
            engine = "llama.cpp" if gguf else "transformers"
            result["perplexity"] = {**p, "file": str(data_dir / ev.perplexity.file), "engine": engine}
            result["kl"] = kl
            log.info("stage perplexity: %s ppl %.3f, KL %.4g over %d tokens (%s)", name, p["value"],
                     kl["mean"] if kl else float("nan"), p["tokens"], engine)
        if ev.tasks:
            from compress.accuracy import run_tasks

            if model is None:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf["file"], dtype=dtype,
                                                             device_map=device).eval()
            result["tasks"] = run_tasks(model, tok, ev.tasks, data_dir, num_fewshot=ev.num_fewshot, limit=ev.limit,
                                        batch_size=ev.batch_size, device=device)
            result["tasks_engine"] = ("transformers, GGUF dequantized on load" if gguf else "transformers")
        if ev.throughput and record.get("kv_cache"):
            log.info("stage throughput: %s skipped: transformers only simulates its KV format, so its decode speed "
                     "would not be that of an engine storing the cache that way", name)
        elif ev.throughput:
            t = ev.throughput
            log.info("stage bandwidth: measuring %s memory read bandwidth (large read-only stream)", device)
            bandwidth = throughput.measure_bandwidth(device=device)
            if gguf:
                from compress import llamacpp

                log.info("stage throughput: %s with llama.cpp (%s threads), %d prompt + %d new tokens, batch 1, "
                         "%d repeats (own process)", name, t.llamacpp_threads or "all", t.prompt_tokens,
                         t.new_tokens, t.repeats)
                bench = llamacpp.decode_benchmark_in_subprocess(
                    gguf_path, prompt_tokens=t.prompt_tokens, new_tokens=t.new_tokens, repeats=t.repeats,
                    threads=t.llamacpp_threads, bandwidth_bytes_per_sec=bandwidth["bytes_per_sec"])
            else:
                log.info("stage throughput: %s, %d prompt + %d new tokens, batches %s, %d repeats (own process)",
                         name, t.prompt_tokens, t.new_tokens, t.batch_sizes, t.repeats)
                bench = throughput.benchmark_checkpoint_in_subprocess(
                    folder, prompt_tokens=t.prompt_tokens, new_tokens=t.new_tokens, batch_sizes=t.batch_sizes,
                    repeats=t.repeats, device=device, dtype=str(dtype).removeprefix("torch."),
                    bandwidth_bytes_per_sec=bandwidth["bytes_per_sec"])
            # probes before and after the row: the bound is their mean (a shared host's bandwidth drifts)
            bandwidth = throughput.bracketed(bandwidth, throughput.measure_bandwidth(device=device))
            result["bandwidth"] = bandwidth
            rooflines = {b: throughput.rebound(rf, bandwidth["bytes_per_sec"])
                         for b, rf in bench.pop("roofline").items()}
            result["throughput"] = bench
            result["roofline"] = rooflines.get("1") or next(iter(rooflines.values()))
            result["roofline"]["per_batch"] = {b: {k: r[k] for k in ("bound_tok_per_sec", "utilisation")}
                                               for b, r in rooflines.items()}
        if name == base_name:
            reference = model  # the KL reference for every later variant: no second load of the baseline
        del model
        result["evaluate_peak_memory_bytes"], result["evaluate_peak_memory_kind"] = peak_memory_bytes(device)
        ownership.write_owned(output, f"eval/{name}.json", json.dumps(result, indent=2) + "\n")
        measured[name] = result

    # the run's bandwidth: the figures every row's bound was computed with (one per throughput row), and their range
    bandwidths = [r["bandwidth"] for r in measured.values() if "bandwidth" in r]
    if bandwidths:
        figures = [b["bytes_per_sec"] for b in bandwidths]
        run_info["bandwidth"] = {**bandwidths[0], "bytes_per_sec": statistics.median(figures),
                                 "rows_bytes_per_sec_min": min(figures), "rows_bytes_per_sec_max": max(figures),
                                 "rows": len(figures)}
    for name, result in measured.items():
        summary = {k: v for k, v in result.items() if k not in ("eval_key", "bandwidth")}
        if "tasks" in summary:
            summary["tasks"] = {t: {k: v for k, v in s.items() if k != "items"} for t, s in result["tasks"].items()}
        records[name].update(summary)
        if base_name and name != base_name and "tasks" in result and "tasks" in measured.get(base_name, {}):
            base_items = {t: s["items"] for t, s in measured[base_name]["tasks"].items()}
            records[name]["recovery"] = recovery(base_items, {t: s["items"] for t, s in result["tasks"].items()})
    return run_info
