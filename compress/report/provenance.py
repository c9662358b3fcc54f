""""Where the figures come from": how every column of the table was measured, for every variant.

A figure without its provenance invites wrong comparisons: a perplexity from a different context length, a
throughput from a GPU next to one from a CPU, a "baseline" that is itself quantized. So each measurement gets
lines that say how it was taken, and a setting that differs between variants is listed per variant (and one that
differs between merged runs per run) instead of silently taking the first one.
"""

from __future__ import annotations

import json

from typing import Callable

from compress.report.tables import served_rows
from compress.report.rows import DASH, _get, task_names

# the environment fields said in the device line; every other field is a library version
CORE_ENVIRONMENT = ("device", "device_name", "dtype", "cpu_threads")
THROUGHPUT_SETTINGS = ("engine", "device", "repeats", "prompt_tokens", "new_tokens", "memory_kind", "threads",
                       "engine_version", "weight_repacking", "flash_attention")


def provenance(results: dict) -> list[tuple[str, list[str]]]:
    """The "Where the figures come from" section: (heading, lines) pairs, rendered as Markdown or HTML.

    Lines are plain text with `code` spans in backticks. A results dict that is not merged counts as one run.
    """
    variants = results.get("variants") or []
    ok = [r for r in variants if r.get("status", "ok") == "ok"]
    runs = results.get("runs") or [{"dir": None, **{k: v for k, v in results.items() if k != "variants"}}]
    return [("Model", _model(runs)), ("Compute", _compute(runs, variants) + _measured_in(ok)),
            ("Size and compression", _size(ok)),
            ("Perplexity and KL", _perplexity(ok) or ["not measured"]),
            ("Accuracy", _accuracy(ok, variants, runs) or ["not measured"]),
            ("Throughput and memory", _throughput(ok) or ["not measured"]), ("Roofline", _roofline(runs)),
            *([("vLLM", lines)] if (lines := _vllm(ok)) else [])]


# ---------------------------------------------------------------------------------------- settings, said once


def _distinct(variants: list[dict], key: str, fields: tuple[str, ...], sub: str | None = None) -> dict:
    """settings tuple -> names of the variants measured with it, for one measurement (`key`, optionally `sub`)."""
    out: dict[tuple, list[str]] = {}
    for rec in variants:
        block = _get(rec, key, sub) if sub else rec.get(key)
        if isinstance(block, dict):
            out.setdefault(tuple(block.get(f) for f in fields), []).append(rec["name"])
    return out


def _per_setting(groups: dict, render: Callable[[tuple], str], total: int) -> list[str]:
    """One line when every measured variant shares the settings, else one line per distinct setting."""
    if len(groups) == 1:
        (settings, names), = groups.items()
        suffix = "" if len(names) == total else f" ({', '.join(names)})"
        return [render(settings) + suffix]
    return [f"{render(s)} ({', '.join(n)})" for s, n in groups.items()]


def _per_run(runs: list[dict], describe: Callable[[dict], list[str]]) -> list[str]:
    """describe(run) -> lines. Said once when every run gives the same lines, else per run, prefixed with it."""
    per = [describe(run) for run in runs]
    if all(p == per[0] for p in per):
        return per[0]
    return [f"run `{run['dir']}`: {line}" for run, lines in zip(runs, per) for line in lines]


def _v(x) -> str:
    """A setting as text: "—" for None, thousands separators for integers, lists in brackets."""
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_v(i) for i in x) + "]"
    return DASH if x is None else (f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x))


# ------------------------------------------------------------------------------------------------ the sections


def _model(runs: list[dict]) -> list[str]:
    def describe(run: dict) -> list[str]:
        model = run.get("model") or {}
        lines = [f"recipe `{_v(run.get('recipe'))}`; model {_v(model.get('description'))} (`{_v(model.get('path'))}`)"]
        if "trust_remote_code" in model:  # recorded since the reliability work; older runs did not say
            lines.append("trust_remote_code: ON: the model's own Python code from its folder or hub repo was run"
                         if model["trust_remote_code"] else
                         "trust_remote_code: off (no code shipped with the model was run; transformers' own "
                         "implementation of its architecture was used)")
        return lines + ([f"NOTE: {model['note']}"] if model.get("note") else [])

    return _per_run(runs, describe) + [
        "The baseline row is the reference for compression ratio, KL, top-1 agreement and recovery"
        + (" (each run against its own baseline)." if len(runs) > 1 else ".")]


def _compute(runs: list[dict], variants: list[dict]) -> list[str]:
    def describe(run: dict) -> list[str]:
        env = run.get("environment") or {}
        threads = f", {env['cpu_threads']} CPU threads" if env.get("cpu_threads") is not None else ""
        versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in CORE_ENVIRONMENT)
        return [f"device {_v(env.get('device'))} ({_v(env.get('device_name'))}), dtype {_v(env.get('dtype'))}"
                f"{threads}", f"library versions: {versions or DASH}"]

    lines = _per_run(runs, describe)
    for run in runs:
        if c := run.get("cluster"):
            lines.append(f"Ray cluster `{c.get('address')}`: {len(c.get('nodes') or [])} node(s), "
                         f"{_v((c.get('settings') or {}).get('cpus_per_variant'))} CPU(s) and "
                         f"{_v((c.get('settings') or {}).get('threads'))} torch thread(s) per task"
                         + (f", dashboard {c['dashboard']}" if c.get("dashboard") else ""))
    for rec in variants:  # where each task of a cluster run ran
        c = rec.get("cluster") or {}
        where = [f"{stage} on {c[stage].get('hostname')} ({c[stage].get('node_ip')}, pid {c[stage].get('pid')}"
                 + (f", GPU {_v(c[stage]['gpus'])}" if c[stage].get("gpus") else "") + f", {c[stage].get('seconds')} s)"
                 for stage in ("build", "measure") if isinstance(c.get(stage), dict)]
        if where:
            lines.append(f"{rec['name']}: " + "; ".join(where))
    run_env = {run.get("dir"): run.get("environment") or {} for run in runs}
    for rec in variants:  # a cached variant may have been built on other hardware or versions than its run's
        own, env = rec.get("environment") or {}, run_env.get(rec.get("run"), {})
        diff = {k: v for k, v in own.items() if env and env.get(k) != v}
        if diff:
            lines.append(f"{rec['name']} was built with " + ", ".join(f"{k} {v}" for k, v in diff.items()))
    return lines


def _measured_in(ok: list[dict]) -> list[str]:
    """The float dtypes transformers measured each row in (evaluation.dtype, eval/measure.measure_dtype), and why."""
    return _per_setting(_distinct(ok, "measured_dtype", ("perplexity", "tasks", "why")),
                        lambda s: f"transformers computed perplexity and KL in {_v(s[0])}, the tasks and the speed in "
                                  f"{_v(s[1])} ({_v(s[2])})", len(ok))


def _size(ok: list[dict]) -> list[str]:
    lines = [
        "size = the checkpoint's weight files on disk (`weights_bytes`), in MB of 10^6 bytes; compression = baseline "
        "size / variant size.",
        "compress time = wall-clock seconds of the compress step (llm-compressor, calibration passes included), on "
        "the device above; 0 for the baseline, which is only loaded and saved.",
    ]
    if any(r.get("gguf") for r in ok):
        lines.append("GGUF rows: size = the tensor bytes in the .gguf file (what decode reads); the file also "
                     "carries the tokenizer and metadata (its full size is in the GGUF table and the model card). "
                     "compress time = llama.cpp's converter + quantizer (+ the importance matrix).")
    if any(r.get("bnb") for r in ok):
        lines.append("bitsandbytes rows: quantized while transformers loads the weights; compress time is that load.")
    return lines


def _scorer(name: str) -> str:
    from eval.accuracy import SCORERS

    return SCORERS.get(name, name)


def _engine_notes(ok: list[dict], section: str, recorded, by: str = "name") -> list[str]:
    """What each engine (eval/engines.ENGINES) says of the rows it measured in `section`: `recorded(row)` is what the
    row says measured it, matched against the engine's `by` field (its name, or its lm-eval label)."""
    from eval.engines import ENGINES

    lines = []
    for engine in ENGINES.values():
        rows = [r["name"] for r in ok if recorded(r) == getattr(engine, by)]
        if rows and section in engine.notes:
            lines.append(engine.notes[section].format(rows=", ".join(rows)))
    return lines


def _perplexity(ok: list[dict]) -> list[str]:
    lines = _per_setting(_distinct(ok, "perplexity", ("file", "context", "stride", "windows", "tokens")),
                         lambda s: f"perplexity of `{_v(s[0])}`: windows of {_v(s[1])} tokens with stride {_v(s[2])} "
                                   f"({_v(s[3])} windows, {_v(s[4])} scored tokens)", len(ok))
    lines += _per_setting(_distinct(ok, "kl", ("tokens",)),
                          lambda s: f"KL = mean over {_v(s[0])} tokens of the KL divergence between the baseline's "
                                    "and the variant's next-token distributions on the same text, ± its standard "
                                    "error; top-1 agreement = share of those tokens where both models' most likely "
                                    "token is the same", len(ok))
    return lines + _engine_notes(ok, "perplexity", lambda r: _get(r, "perplexity", "engine"))


def _accuracy(ok: list[dict], variants: list[dict], runs: list[dict]) -> list[str]:
    lines = []
    for t in task_names(variants):
        lines += _per_setting(
            _distinct(ok, "tasks", ("metric", "file", "n", "limit", "num_fewshot", "stderr_method", "scorer"), sub=t),
            lambda s, t=t: f"{t}: {_v(s[0])} on `{_v(s[1])}`, n = {_v(s[2])} samples (limit {_v(s[3])}), "
                           f"{_v(s[4])}-shot; shown as percent ± stderr"
                           + (f", stderr {s[5]}" if s[5] else "") + (f"; {_scorer(s[6])}" if s[6] else ""),
            len(ok))
    if lines:
        lines.append("task scores come from lm-eval; the plots' accuracy is the mean over all tasks, and a variant "
                     "missing a task has none.")
        lines.append("recovery = variant score / baseline score in percent, per task and averaged, with the 95% "
                     "confidence interval of the evaluation's bootstrap over documents, paired across variants "
                     "(every variant answers the same ones).")
        lines += _engine_notes(ok, "tasks", lambda r: r.get("tasks_engine"), by="tasks")
    if any(run.get("evaluation") for run in runs):
        lines += _per_run(runs, lambda run: ["evaluation settings: " + ", ".join(
            f"{k} {_v(v)}" for k, v in (run.get("evaluation") or {}).items()) or DASH])
    return lines


def _memory_kind(kind) -> str:
    return {"rss": "the process's peak resident set size (RSS, includes Python and torch themselves)",
            "cuda_max_allocated": "torch.cuda.max_memory_allocated (tensors only, not the CUDA context)"
            }.get(kind, _v(kind))


def _throughput_line(s: tuple) -> str:
    engine, device, repeats, prompt, new, memory, threads, version, repacking, flash = s
    return (f"engine {_v(engine)}{' (' + version + ')' if version else ''} on {_v(device)}"
            f"{', ' + str(threads) + (' threads' if threads != 1 else ' thread') if threads else ''}"
            f"{'' if repacking is None else ', weight repacking ' + ('on' if repacking else 'off (AMX build)')}"
            f"{'' if flash is None else ', flash attention ' + ('on' if flash else 'off')}: "
            f"{_v(prompt)} prompt tokens then {_v(new)} generated, "
            f"median tok/s of {_v(repeats)} repeats at batch 1 (results.csv has min and max); TTFT = time to the "
            f"first generated token; peak memory = {_memory_kind(memory)}")


def _throughput(ok: list[dict]) -> list[str]:
    lines = _per_setting(_distinct(ok, "throughput", THROUGHPUT_SETTINGS), _throughput_line, len(ok))
    lines += _engine_notes(ok, "throughput", lambda r: _get(r, "throughput", "engine"))
    if any(r.get("bnb") for r in ok):
        lines.append("bitsandbytes rows run in transformers with bitsandbytes' CPU kernels, which dequantize the "
                     "4-bit/8-bit weights inside every matmul.")
    return lines + _speed_ratios(ok)


def _speed_ratios(ok: list[dict]) -> list[str]:
    """How the × baseline figures were taken, and which rows were timed while other processes used the cores."""
    from compress.report.rows import speed_contended

    lines = []
    ratios = [r for r in ok if _get(r, "speed_ratio", "ratio") is not None]
    if ratios:
        sr = ratios[0]["speed_ratio"]
        rounds = sorted({r["speed_ratio"]["rounds"] for r in ratios})
        lines.append(f"× baseline tok/s: {_v(sr.get('method'))}; {', '.join(map(str, rounds))} rounds per row, "
                     f"batch 1, {_v(sr.get('prompt_tokens'))} prompt + {_v(sr.get('new_tokens'))} generated tokens; "
                     f"the interval is at least {100 * sr['level']:.0f}% (distribution-free); an interval that "
                     f"contains 1 reads \"no measurable difference\".")
    for r in ok:
        if why := _get(r, "speed_ratio", "skipped"):
            lines.append(f"× baseline tok/s not measured for {r['name']}: {why}.")
    rules = [_get(r, "throughput", "batches", b, "contention", "rule") for r in ok
             for b in _get(r, "throughput", "batches") or {}]
    rule = next((x for x in rules if x), None)
    if rule:
        lines.append(f"contention: {rule}.")
    flagged = [r["name"] for r in ok if speed_contended(r)]
    if flagged:
        lines.append(f"⚠ timed under contention (after their retries; their tok/s are what a busy machine gave, "
                     f"their ratios were still taken in interleaved rounds): {', '.join(flagged)}.")
    return lines


def _vllm(ok: list[dict]) -> list[str]:
    """Where the vLLM figures come from: the engine, how each row was served, what failed and why."""
    served = [r for r in ok if r.get("vllm")]
    if not served:
        return []
    lines = []
    engines = {json.dumps(r["vllm"].get("engine") or {}, sort_keys=True) for r in served}
    for e in map(json.loads, sorted(engines)):
        lines.append(f"engine: vLLM {_v(e.get('vllm'))} ({_v(e.get('package'))}, {_v(e.get('build'))} build), torch "
                     f"{_v(e.get('torch'))}, transformers {_v(e.get('transformers'))}, compressed-tensors "
                     f"{_v(e.get('compressed_tensors'))}, in its own environment (built in "
                     f"{_v(e.get('install_seconds'))} s); its OpenAI server in a subprocess, one per variant.")
    rows = [(label, v) for r in served for label, v in served_rows(r)]
    for label, v in rows:
        if v["status"] == "ok":
            cp = v.get("compute_path") or {}
            computed = "; ".join(f"{g['layers']} x{g['count']}: {g['activations']}, {g['gemm']}"
                                 for g in cp.get("groups", []) if g["quantized"]) or "no quantized layer"
            cpu = v.get("cpu") or {}
            lines.append(f"{label}: `{v['serve_command']}` + `{' '.join(v.get('harness_flags') or [])}` "
                         f"(env {', '.join(f'{k}={x}' for k, x in (v.get('env_vars') or {}).items()) or 'none'}); "
                         f"ready in {_v(v.get('load_s'))} s; log `{v.get('log')}`. Computed "
                         f"({cp.get('source', 'no probe')}): {computed}"
                         + (f" — the checkpoint declares activations {cp.get('declared_activations')}, so this is "
                            f"{'its own scheme' if cp.get('own_scheme') else 'NOT its own scheme'}" if cp else "")
                         + (f"; CPU {cpu.get('model')}, deciding flags {', '.join(cpu.get('flags') or []) or 'none'}"
                            if cpu else "")
                         + (f"; binding {v['binding']}" if v.get("binding") else "") + ".")
        else:
            what = ("served, not measured" if v["status"] == "too slow" else
                    "not measured" if v.get("runtime") else f"not served ({v['status']})")
            lines.append(f"{label}: {what}: {v.get('reason')}.")
    flagged = [label for label, v in rows
               if any((lv.get("contention") or {}).get("contended") for lv in v.get("sweep") or [])
               or ((v.get("speed_ratio") or {}).get("contention") or {}).get("contended")]
    if flagged:
        lines.append(f"⚠ vLLM figures timed under contention (after their retries): {', '.join(flagged)}.")
    return lines


def _bandwidth(run: dict) -> list[str]:
    bw = run.get("bandwidth") or {}
    if not bw.get("bytes_per_sec"):
        return ["memory bandwidth: not measured"]
    line = f"memory bandwidth {bw['bytes_per_sec'] / 1e9:.1f} GB/s, measured by {_v(bw.get('method'))}"
    if bw.get("rows", 0) > 1:
        line += (f"; median over the {bw['rows']} throughput rows, each row's bound uses its own figure "
                 f"({bw['rows_bytes_per_sec_min'] / 1e9:.1f}-{bw['rows_bytes_per_sec_max'] / 1e9:.1f} GB/s)")
    if bw.get("copy_bytes_per_sec"):
        line += (f"; a copy moved {bw['copy_bytes_per_sec'] / 1e9:.1f} GB/s (read + write counted; not the bound: "
                 f"decode only reads)")
    return [line]


def _roofline(runs: list[dict]) -> list[str]:
    return _per_run(runs, _bandwidth) + [
        "roofline: a batch-1 decode step reads every weight and the KV cache once, so tok/s cannot exceed "
        "read bandwidth / (weight bytes + KV bytes); utilisation = measured tok/s at batch 1 / that bound. "
        "Weight bytes = what the engine reads: transformers decompresses compressed-tensors checkpoints to "
        "the dtype they are measured in (above); llama.cpp reads the GGUF file's tensors as stored "
        "(its tensor bytes); the KV cache is in the measured dtype in transformers and F16 in llama.cpp.",
        "A model whose weights fit in the CPU's last-level cache can exceed 100%: the bound assumes every "
        "byte comes from memory."]
