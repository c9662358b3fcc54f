"""The comparison report: one table of every variant, where each figure came from, and three plots.

`compress report RUN_DIR [RUN_DIR ...] [--out DIR]` reads each run's results.json and writes three files:

- report.md: the table and a "Where the figures come from" section, for reading in a terminal or a PR;
- results.csv: the same columns as raw numbers (bytes, seconds, fractions), for spreadsheets and scripts;
- report.html: one self-contained page (no external CSS, JS, fonts or images, so it opens offline and survives
  being mailed around) with the table and three inline SVG plots drawn here by hand.

A figure without its provenance invites wrong comparisons: a perplexity from a different context length, a
throughput from a GPU next to one from a CPU, a "baseline" that is itself quantized. So every column has a line
under the table that says how it was measured, and any setting that differs between variants is listed per
variant instead of silently taking the first one.

Missing data is normal (a failed variant, a run without evaluation, a task only some variants ran): the tables
show "—", the plots skip the point and say which ones they skipped. Nothing here imports torch or matplotlib, so
the report can be rebuilt anywhere in a fraction of a second.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import sys
from pathlib import Path

from compress import ownership
from compress.recipe import InputError

RESULTS = "results.json"  # the name pipeline.py writes; repeated here so the report needs no torch import
DASH = "—"
MB = 1e6  # sizes are decimal megabytes, as the model cards print them


# --------------------------------------------------------------------------------------------------- loading


def load_results(run_dir: Path) -> dict:
    """One run's results.json. Raises InputError naming the file when it is missing or not valid JSON."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise InputError(f"{path}: not found; is {run_dir} a run directory (the recipe's `output`)?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
        raise InputError(f"{path}: expected an object with a `variants` list")
    return data


def merge_runs(run_dirs: list[Path]) -> dict:
    """Several runs as one results dict, so variants from different recipes sit in one table.

    Each record gets a "run" key (its run directory): compression ratio is computed against the baseline of the
    same run, and KL and recovery were measured against that baseline too. A name that occurs in more than one run
    (every run has a "baseline") is prefixed with its run directory's name, "lab-a/baseline"; names that are
    unique stay as they are. The top-level fields are the first run's, and "runs" keeps every run's own
    provenance (recipe, model, environment, bandwidth, evaluation) for the "Where the figures come from" section.
    """
    runs = [(Path(d), load_results(Path(d))) for d in run_dirs]
    if not runs:
        raise InputError("no run directories given")
    labels = _run_labels([d for d, _ in runs])
    counts: dict[str, int] = {}
    for _, data in runs:
        for rec in data["variants"]:
            counts[rec.get("name", "?")] = counts.get(rec.get("name", "?"), 0) + 1
    variants = []
    for (run_dir, data), label in zip(runs, labels):
        for rec in data["variants"]:
            name = rec.get("name", "?")
            variants.append({**rec, "name": f"{label}/{name}" if counts[name] > 1 else name, "run": str(run_dir)})
    first = runs[0][1]
    merged = {k: v for k, v in first.items() if k != "variants"}
    merged["variants"] = variants
    merged["runs"] = [{"dir": str(d), "label": label, **{k: v for k, v in data.items() if k != "variants"}}
                      for (d, data), label in zip(runs, labels)]
    return merged


def _run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run directory's name, numbered when two runs share a name (runs/a/out and runs/b/out)."""
    names = [d.resolve().name or str(d) for d in run_dirs]
    seen: dict[str, int] = {}
    labels = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        labels.append(n if names.count(n) == 1 else f"{n}#{seen[n]}")
    return labels


# --------------------------------------------------------------------------------------------------- figures


def _get(d, *keys):
    """d[k1][k2]... or None when any level is missing or null (results.json omits what was not measured)."""
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def task_names(variants: list[dict]) -> list[str]:
    """Every task any variant scored, in first-seen order."""
    names: list[str] = []
    for rec in variants:
        for t in rec.get("tasks") or {}:
            if t not in names:
                names.append(t)
    return names


def _baselines(variants: list[dict]) -> dict:
    """run -> the baseline record of that run (None for a results dict that is not merged)."""
    out = {}
    for rec in variants:
        if rec.get("method") == "baseline" and rec.get("status", "ok") == "ok":
            out.setdefault(rec.get("run"), rec)
    return out


def average_score(rec: dict, tasks: list[str]) -> float | None:
    """Mean task score (a fraction) over `tasks`, or None unless the variant has every one of them.

    An average over a different subset of tasks is a different number, so a variant missing a task gets no
    average rather than one that looks comparable and is not.
    """
    values = [_get(rec, "tasks", t, "value") for t in tasks]
    if not tasks or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def variant_rows(results: dict) -> list[dict]:
    """One dict of raw figures per variant: the CSV rows, and what the Markdown and HTML tables format.

    Units are in the keys: bytes, seconds, fractions (0-1) except `*_pct`, which are percent of the baseline.
    """
    variants = results.get("variants") or []
    tasks = task_names(variants)
    baselines = _baselines(variants)
    rows = []
    for rec in variants:
        base = baselines.get(rec.get("run"))
        weights = rec.get("weights_bytes")
        base_weights = base.get("weights_bytes") if base else None
        b1 = _get(rec, "throughput", "batches", "1") or {}
        row = {
            "name": rec.get("name"), "run": rec.get("run"), "method": rec.get("method"),
            "scheme": rec.get("scheme"), "bits": rec.get("bits"),
            "weights_bytes": weights, "size_bytes": rec.get("size_bytes"),
            "compression_ratio": base_weights / weights if weights and base_weights else None,
            "perplexity": _get(rec, "perplexity", "value"),
            "kl_mean": _get(rec, "kl", "mean"), "kl_stderr": _get(rec, "kl", "stderr"),
            "top1_agreement": _get(rec, "kl", "top1_agreement"),
        }
        for t in tasks:
            row[f"{t}_value"] = _get(rec, "tasks", t, "value")
            row[f"{t}_stderr"] = _get(rec, "tasks", t, "stderr")
        row["average_score"] = average_score(rec, tasks)
        for t in tasks:
            row[f"{t}_recovery_pct"] = _get(rec, "recovery", t, "pct")
        ci = _get(rec, "recovery", "average", "ci95") or [None, None]
        row.update({
            "recovery_avg_pct": _get(rec, "recovery", "average", "pct"),
            "recovery_avg_ci95_lo": ci[0], "recovery_avg_ci95_hi": ci[1],
            "engine": engine_text(rec.get("throughput")),
            "tok_per_sec_b1": b1.get("tok_per_sec"),
            "tok_per_sec_b1_min": b1.get("tok_per_sec_min"), "tok_per_sec_b1_max": b1.get("tok_per_sec_max"),
            "tok_per_sec_vs_baseline": (b1["tok_per_sec"] / base_tok if b1.get("tok_per_sec") and
                                        (base_tok := _get(base, "throughput", "batches", "1", "tok_per_sec"))
                                        else None),
            "ttft_s_b1": b1.get("ttft_s"),
            "peak_memory_bytes": _get(rec, "throughput", "peak_memory_bytes"),
            "bytes_read_per_token": _get(rec, "roofline", "bytes_per_token"),
            "bound_tok_per_sec": _get(rec, "roofline", "bound_tok_per_sec"),
            "roofline_utilisation": _get(rec, "roofline", "utilisation"),
            "compress_seconds": rec.get("compress_seconds"),
            "kv_format": _get(rec, "kv_memory", "format"), "kv_bytes_per_token": _get(rec, "kv_memory", "bytes_per_token"),
            "status": rec.get("status", "ok"), "error": rec.get("error"),
        })
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ formatting


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return DASH
    return format(value * scale if scale != 1.0 else value, spec)


def _pm(value, stderr, spec: str, scale: float = 1.0) -> str:
    """"value ± stderr"; the stderr is left off (not invented) when only the value is known."""
    if value is None:
        return DASH
    text = format(value * scale, spec)
    return text if stderr is None else f"{text} ± {format(stderr * scale, spec)}"


def display_columns(tasks: list[str], variants: list[dict]) -> list[tuple[str, callable]]:
    """(header, row -> text) for the human tables. Headers carry units; tasks carry their metric name."""
    metrics = {t: next((_get(r, "tasks", t, "metric") for r in variants if _get(r, "tasks", t, "metric")), "score")
               for t in tasks}
    cols = [
        ("variant", lambda r: r["name"] or DASH),
        ("method", lambda r: r["method"] or DASH),
        ("scheme", lambda r: r["scheme"] or DASH),
        ("bits", lambda r: _fmt(r["bits"], "d")),
        ("size (MB)", lambda r: _fmt(r["weights_bytes"], ".1f", 1 / MB)),
        ("compression (×)", lambda r: _fmt(r["compression_ratio"], ".2f")),
        ("perplexity", lambda r: _fmt(r["perplexity"], ".2f")),
        ("KL vs baseline (nats/token)", lambda r: _pm(r["kl_mean"], r["kl_stderr"], ".4f")),
        ("top-1 agreement (%)", lambda r: _fmt(r["top1_agreement"], ".1f", 100)),
    ]
    for t in tasks:
        cols.append((f"{t} {metrics[t]} (%)", lambda r, t=t: _pm(r[f"{t}_value"], r[f"{t}_stderr"], ".1f", 100)))
    cols += [
        ("avg recovery (% [95% CI])", _recovery_text),
        ("decode engine", lambda r: r["engine"] or DASH),
        ("tok/s (batch 1)", lambda r: _fmt(r["tok_per_sec_b1"], ".1f")),
        ("× baseline tok/s", lambda r: _fmt(r["tok_per_sec_vs_baseline"], ".2f")),
        ("TTFT (ms)", lambda r: _fmt(r["ttft_s_b1"], ".0f", 1000)),
        ("peak memory (MB)", lambda r: _fmt(r["peak_memory_bytes"], ".0f", 1 / MB)),
        ("read per token (MB)", lambda r: _fmt(r["bytes_read_per_token"], ".1f", 1 / MB)),
        ("roofline utilisation (%)", lambda r: _fmt(r["roofline_utilisation"], ".0f", 100)),
        ("compress time (s)", lambda r: _fmt(r["compress_seconds"], ".1f")),
        ("status", _status_text),
    ]
    return cols


def engine_text(throughput: dict | None) -> str | None:
    """'llama.cpp, 1 thread' / 'transformers-eager, 2 threads': the engine of a throughput row and its threads."""
    if not throughput:
        return None
    threads = throughput.get("threads")
    return throughput["engine"] + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")


def _recovery_text(r: dict) -> str:
    if r["recovery_avg_pct"] is None:
        return DASH
    text = f"{r['recovery_avg_pct']:.1f}"
    if r["recovery_avg_ci95_lo"] is not None and r["recovery_avg_ci95_hi"] is not None:
        text += f" [{r['recovery_avg_ci95_lo']:.1f}, {r['recovery_avg_ci95_hi']:.1f}]"
    return text


def _status_text(r: dict) -> str:
    if r["status"] == "ok":
        return "ok"
    return f"{r['status']}: {r['error']}" if r["error"] else str(r["status"])


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------------ provenance


def _distinct(variants: list[dict], key: str, fields: tuple[str, ...], sub: str | None = None) -> dict:
    """settings tuple -> names of the variants measured with it, for one measurement (`key`, optionally `sub`)."""
    out: dict[tuple, list[str]] = {}
    for rec in variants:
        block = _get(rec, key, sub) if sub else rec.get(key)
        if isinstance(block, dict):
            out.setdefault(tuple(block.get(f) for f in fields), []).append(rec["name"])
    return out


def _per_setting(groups: dict, render, total: int) -> list[str]:
    """One line when every measured variant shares the settings, else one line per distinct setting."""
    if len(groups) == 1:
        (settings, names), = groups.items()
        suffix = "" if len(names) == total else f" ({', '.join(names)})"
        return [render(settings) + suffix]
    return [f"{render(s)} ({', '.join(n)})" for s, n in groups.items()]


def _per_run(runs: list[dict], describe) -> list[str]:
    """describe(run) -> lines. Said once when every run gives the same lines, else per run, prefixed with it."""
    per = [describe(run) for run in runs]
    if all(p == per[0] for p in per):
        return per[0]
    return [f"run `{run['dir']}`: {line}" for run, lines in zip(runs, per) for line in lines]


def _v(x) -> str:
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_v(i) for i in x) + "]"
    return DASH if x is None else (f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x))


def provenance(results: dict) -> list[tuple[str, list[str]]]:
    """The "Where the figures come from" section: (heading, lines) pairs, rendered as Markdown or HTML.

    Lines are plain text with `code` spans in backticks; every settings block that differs between variants is
    listed per variant.
    """
    variants = results.get("variants") or []
    ok = [r for r in variants if r.get("status", "ok") == "ok"]
    runs = results.get("runs") or [{"dir": None, **{k: v for k, v in results.items() if k != "variants"}}]
    sections: list[tuple[str, list[str]]] = []

    def model_lines(run: dict) -> list[str]:
        model = run.get("model") or {}
        lines = [f"recipe `{_v(run.get('recipe'))}`; model {_v(model.get('description'))} (`{_v(model.get('path'))}`)"]
        if "trust_remote_code" in model:  # recorded since the reliability work; older runs did not say
            lines.append("trust_remote_code: ON: the model's own Python code from its folder or hub repo was run"
                         if model["trust_remote_code"] else
                         "trust_remote_code: off (no code shipped with the model was run; transformers' own "
                         "implementation of its architecture was used)")
        return lines + ([f"NOTE: {model['note']}"] if model.get("note") else [])

    lines = _per_run(runs, model_lines)
    lines.append("The baseline row is the reference for compression ratio, KL, top-1 agreement and recovery"
                 + (" (each run against its own baseline)." if len(runs) > 1 else "."))
    sections.append(("Model", lines))

    core = ("device", "device_name", "dtype", "cpu_threads")

    def compute_lines(run: dict) -> list[str]:
        env = run.get("environment") or {}
        threads = f", {env['cpu_threads']} CPU threads" if env.get("cpu_threads") is not None else ""
        versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in core)
        return [f"device {_v(env.get('device'))} ({_v(env.get('device_name'))}), dtype {_v(env.get('dtype'))}"
                f"{threads}", f"library versions: {versions or DASH}"]

    lines = _per_run(runs, compute_lines)
    run_env = {run.get("dir"): run.get("environment") or {} for run in runs}
    for rec in variants:  # a cached variant may have been built on other hardware or versions than its run's
        own, env = rec.get("environment") or {}, run_env.get(rec.get("run"), {})
        diff = {k: v for k, v in own.items() if env and env.get(k) != v}
        if diff:
            lines.append(f"{rec['name']} was built with " + ", ".join(f"{k} {v}" for k, v in diff.items()))
    sections.append(("Compute", lines))

    size_lines = [
        "size = the checkpoint's weight files on disk (`weights_bytes`), in MB of 10^6 bytes; compression = baseline "
        "size / variant size.",
        "compress time = wall-clock seconds of the compress step (llm-compressor, calibration passes included), on "
        "the device above; "
        "0 for the baseline, which is only loaded and saved.",
    ]
    if any(r.get("gguf") for r in ok):
        size_lines.append("GGUF rows: size = the tensor bytes in the .gguf file (what decode reads); the file also "
                          "carries the tokenizer and metadata (its full size is in the GGUF table and the model card). "
                          "compress time = llama.cpp's converter + quantizer (+ the importance matrix).")
    if any(r.get("bnb") for r in ok):
        size_lines.append("bitsandbytes rows: quantized while transformers loads the weights; compress time is that "
                          "load.")
    sections.append(("Size and compression", size_lines))

    lines = _per_setting(_distinct(ok, "perplexity", ("file", "context", "stride", "windows", "tokens")),
                         lambda s: f"perplexity of `{_v(s[0])}`: windows of {_v(s[1])} tokens with stride {_v(s[2])} "
                                   f"({_v(s[3])} windows, {_v(s[4])} scored tokens)", len(ok))
    lines += _per_setting(_distinct(ok, "kl", ("tokens",)),
                          lambda s: f"KL = mean over {_v(s[0])} tokens of the KL divergence between the baseline's "
                                    "and the variant's next-token distributions on the same text, ± its standard "
                                    "error; top-1 agreement = share of those tokens where both models' most likely "
                                    "token is the same", len(ok))
    engines = {}
    for r in ok:
        if _get(r, "perplexity", "engine"):
            engines.setdefault(r["perplexity"]["engine"], []).append(r["name"])
    if "llama.cpp" in engines:
        lines.append(f"perplexity and KL of {', '.join(engines['llama.cpp'])} come from llama.cpp's logits for the "
                     f"same token windows (the GGUF file as llama.cpp runs it: quantized weights times 8-bit "
                     f"activations); the other rows' from transformers; KL always against the baseline's "
                     f"transformers logits.")
    sections.append(("Perplexity and KL", lines or ["not measured"]))

    lines = []
    for t in task_names(variants):
        lines += _per_setting(
            _distinct(ok, "tasks", ("metric", "file", "n", "limit", "num_fewshot"), sub=t),
            lambda s, t=t: f"{t}: {_v(s[0])} on `{_v(s[1])}`, n = {_v(s[2])} samples (limit {_v(s[3])}), "
                           f"{_v(s[4])}-shot; shown as percent ± stderr", len(ok))
    if lines:
        lines.append("task scores come from lm-eval (stderr is lm-eval's); the plots' accuracy is the mean over "
                     "all tasks, and a variant missing a task has none.")
        lines.append("recovery = variant score / baseline score in percent, per task and averaged, with the 95% "
                     "confidence interval of the evaluation's bootstrap over documents, paired across variants "
                     "(every variant answers the same ones).")
    dequantized = [r["name"] for r in ok if r.get("tasks_engine", "").startswith("transformers, GGUF")]
    if dequantized and lines:
        lines.append(f"task scores of {', '.join(dequantized)}: lm-eval needs a transformers model, so they read "
                     f"the GGUF file dequantized on load (the same weights, in fp32 arithmetic, without "
                     f"llama.cpp's 8-bit activations).")
    if any(run.get("evaluation") for run in runs):
        lines += _per_run(runs, lambda run: ["evaluation settings: " + ", ".join(
            f"{k} {_v(v)}" for k, v in (run.get("evaluation") or {}).items()) or DASH])
    sections.append(("Accuracy", lines or ["not measured"]))

    lines = _per_setting(
        _distinct(ok, "throughput", ("engine", "device", "repeats", "prompt_tokens", "new_tokens", "memory_kind",
                                     "threads", "engine_version", "weight_repacking", "flash_attention")),
        lambda s: f"engine {_v(s[0])}{' (' + s[7] + ')' if s[7] else ''} on {_v(s[1])}"
                  f"{', ' + str(s[6]) + (' threads' if s[6] != 1 else ' thread') if s[6] else ''}"
                  f"{'' if s[8] is None else ', weight repacking ' + ('on' if s[8] else 'off (AMX build)')}"
                  f"{'' if s[9] is None else ', flash attention ' + ('on' if s[9] else 'off')}: "
                  f"{_v(s[3])} prompt tokens then {_v(s[4])} generated, "
                  f"median tok/s of {_v(s[2])} repeats at batch 1 (results.csv has min and max); TTFT = time to the "
                  f"first generated token; peak memory = {_memory_kind(s[5])}", len(ok))
    if any(_get(r, "throughput", "engine") == "llama.cpp" for r in ok):
        lines.append("llama.cpp rows: one process per GGUF file, greedy decode of exactly the same number of tokens "
                     "after a prompt of the same length (the same sentence, tokenized by llama.cpp), batch 1 only; "
                     "peak memory includes the memory-mapped file pages it touched.")
    if any(r.get("bnb") for r in ok):
        lines.append("bitsandbytes rows run in transformers with bitsandbytes' CPU kernels, which dequantize the "
                     "4-bit/8-bit weights inside every matmul.")
    sections.append(("Throughput and memory", lines or ["not measured"]))

    def bandwidth_lines(run: dict) -> list[str]:
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

    lines = _per_run(runs, bandwidth_lines)
    lines.append("roofline: a batch-1 decode step reads every weight and the KV cache once, so tok/s cannot exceed "
                 "read bandwidth / (weight bytes + KV bytes); utilisation = measured tok/s at batch 1 / that bound. "
                 "Weight bytes = what the engine reads: transformers decompresses compressed-tensors checkpoints to "
                 "the float dtype, so those rows read fp32; llama.cpp reads the GGUF file's tensors as stored "
                 "(its tensor bytes); the KV cache is fp32 in transformers on CPU and F16 in llama.cpp.")
    lines.append("A model whose weights fit in the CPU's last-level cache can exceed 100%: the bound assumes every "
                 "byte comes from memory.")
    sections.append(("Roofline", lines))
    return sections


def _memory_kind(kind) -> str:
    return {"rss": "the process's peak resident set size (RSS, includes Python and torch themselves)",
            "cuda_max_allocated": "torch.cuda.max_memory_allocated (tensors only, not the CUDA context)"
            }.get(kind, _v(kind))


# ----------------------------------------------------------------------------------------------- pareto front


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes (x = tok/s, y = accuracy; higher is better for both).

    A point is dominated when another is at least as good on both axes and strictly better on one; what remains
    is the set of reasonable choices, each buying speed only with accuracy. Equal points are all kept. The result
    is ordered by x ascending, which is the order to draw the front in.
    """
    front = [(x, y, name) for name, x, y in points
             if not any(qx >= x and qy >= y and (qx > x or qy > y) for _, qx, qy in points)]
    return [name for x, y, name in sorted(front, key=lambda p: (p[0], -p[1]))]


# ------------------------------------------------------------------------------------------------------ plots

PALETTE = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7",
           "#bab0ac"]
W, H = 640, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 40, 56  # plot area margins; the legend sits in the right margin
CHAR_PX = 6.6  # rough width of one 11px sans-serif character, for keeping labels apart


def _colours(names: list[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if hi - lo <= 1e-9 * max(1.0, abs(lo), abs(hi)):  # one value (or float noise): give it a visible axis
        half = abs(hi) * 0.1 or 1.0
        lo, hi = lo - half, hi + half
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t < hi + step * 0.999:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _tick_text(t: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{t:.{decimals}f}"


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _frame(title: str, x_label: str, y_label: str, xt: list[float], yt: list[float], sx, sy) -> list[str]:
    """The SVG opening, title, grid, ticks and axis labels shared by every plot."""
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'role="img" aria-label="{_e(title)}" font-family="sans-serif" font-size="11">',
           f'<text x="{W / 2:.0f}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{_e(title)}</text>']
    for t in yt:
        y = sy(t)
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_text(t, yt)}</text>')
    for t in xt:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1}" y2="{y0}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle">{_tick_text(t, xt)}</text>')
    out.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{(x0 + x1) / 2:.0f}" y="{H - 14}" text-anchor="middle" font-size="12">{_e(x_label)}</text>')
    out.append(f'<text transform="translate(16 {(y0 + y1) / 2:.0f}) rotate(-90)" text-anchor="middle" '
               f'font-size="12">{_e(y_label)}</text>')
    return out


def _legend(entries: list[tuple[str, str]]) -> list[str]:
    """Legend in the right margin: (svg marker snippet at origin, label) per entry."""
    x, y = W - RIGHT + 14, TOP + 8
    out = []
    for i, (marker, label) in enumerate(entries):
        short = label if len(label) <= 22 else label[:21] + "…"  # the right margin holds about 22 characters
        out.append(f'<g transform="translate({x} {y + i * 18})"><title>{_e(label)}</title>{marker}'
                   f'<text x="14" y="4">{_e(short)}</text></g>')
    return out


def _dot(colour: str, r: float = 5) -> str:
    return f'<circle r="{r}" fill="{colour}" stroke="#333" stroke-width="0.6"/>'


def _place_labels(points: list[tuple[str, float, float]]) -> list[str]:
    """Text labels next to points, each moved to the first of a few spots that overlaps no earlier label."""
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for name, px, py in sorted(points, key=lambda p: p[2]):
        w, h = len(name) * CHAR_PX, 12
        for dx, dy, anchor in ((8, -7, "start"), (8, 15, "start"), (-8, -7, "end"), (-8, 15, "end"),
                               (8, 30, "start"), (8, -22, "start"), (-8, 30, "end"), (-8, -22, "end")):
            left = px + dx if anchor == "start" else px + dx - w
            box = (left, py + dy - h + 2, left + w, py + dy + 2)
            inside = LEFT <= box[0] and box[2] <= W - RIGHT + 10 and TOP <= box[1] and box[3] <= H - BOTTOM
            if inside and not any(_overlap(box, b) for b in placed):
                break
        placed.append(box)
        out.append(f'<text x="{px + dx:.1f}" y="{py + dy:.1f}" text-anchor="{anchor}">{_e(name)}</text>')
    return out


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _skipped(rows: list[dict], kept: set[str], why: str) -> str:
    missing = [r["name"] for r in rows if r["name"] not in kept]
    return _note(f"Not plotted ({why}): {', '.join(missing)}.") if missing else ""


def _scatter(title: str, x_label: str, y_label: str, pts: list[tuple[str, float, float]], colours: dict,
             front: list[str] | None = None) -> str:
    """A labelled scatter plot; with `front`, those points get a ring and are joined by a dashed line."""
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    pad_x = (max(xs) - min(xs)) * 0.12 or max(abs(xs[0]) * 0.1, 1)
    pad_y = (max(ys) - min(ys)) * 0.15 or max(abs(ys[0]) * 0.05, 1)
    xt, yt = _nice_ticks(min(xs) - pad_x, max(xs) + pad_x), _nice_ticks(min(ys) - pad_y, max(ys) + pad_y)
    sx = lambda v: LEFT + (v - xt[0]) / (xt[-1] - xt[0]) * (W - RIGHT - LEFT)  # noqa: E731
    sy = lambda v: H - BOTTOM - (v - yt[0]) / (yt[-1] - yt[0]) * (H - BOTTOM - TOP)  # noqa: E731
    out = _frame(title, x_label, y_label, xt, yt, sx, sy)
    legend = [(_dot(colours[n]), n) for n, _, _ in pts]
    if front:
        by_name = {n: (x, y) for n, x, y in pts}
        path = " ".join(f"{sx(by_name[n][0]):.1f},{sy(by_name[n][1]):.1f}" for n in front)
        out.append(f'<polyline class="pareto-front" points="{path}" fill="none" stroke="#222" stroke-width="1.5" '
                   f'stroke-dasharray="5 3"/>')
        legend += [('<line x1="-7" x2="7" y1="0" y2="0" stroke="#222" stroke-width="1.5" stroke-dasharray="5 3"/>',
                    "Pareto front"),
                   ('<circle r="8" fill="none" stroke="#222" stroke-width="2"/>', "on the front")]
    for n, x, y in pts:
        out.append(f'<g class="point" data-name="{_e(n)}"><title>{_e(n)}: {x:.4g}, {y:.4g}</title>'
                   f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{colours[n]}" stroke="#333" '
                   f'stroke-width="0.6"/></g>')
        if front and n in front:
            out.append(f'<circle class="front-point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="9" fill="none" '
                       f'stroke="#222" stroke-width="2"/>')
    out += _place_labels([(n, sx(x), sy(y)) for n, x, y in pts])
    out += _legend(legend)
    out.append("</svg>")
    return "\n".join(out)


def plot_accuracy_vs_size(rows: list[dict], colours: dict) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    pts = [(r["name"], r["weights_bytes"] / MB, r["average_score"] * 100) for r in ok
           if r["weights_bytes"] is not None and r["average_score"] is not None]
    title = "Accuracy vs size on disk"
    if not pts:
        return f"<h3>{title}</h3>" + _note("No variant has both a size and a score on every task: nothing to plot.")
    svg = _scatter(title, "size on disk (MB, weight files)", "average task score (%)", pts, colours)
    return svg + _skipped(rows, {p[0] for p in pts}, "failed, or no size or no score on every task")


def plot_accuracy_vs_speed(rows: list[dict], colours: dict) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    pts = [(r["name"], r["tok_per_sec_b1"], r["average_score"] * 100) for r in ok
           if r["tok_per_sec_b1"] is not None and r["average_score"] is not None]
    title = "Accuracy vs decode speed (batch 1)"
    if not pts:
        return f"<h3>{title}</h3>" + _note("No variant has both a batch-1 throughput and a score on every task: "
                                           "nothing to plot.")
    svg = _scatter(title, "decode throughput at batch 1 (tokens/s, median)", "average task score (%)", pts,
                   colours, front=pareto_front(pts))
    return svg + _skipped(rows, {p[0] for p in pts}, "failed, or no throughput or no score on every task")


def plot_recovery(rows: list[dict], colours: dict, tasks: list[str], results: dict) -> str:
    """Grouped bars: one group per task (and the average), one bar per non-baseline variant, from the 100% line.

    Bars start at 100% (the baseline) rather than at 0: recoveries sit near 100%, and bars from a truncated axis
    would exaggerate differences, while bars from 0 would hide them. A bar's length is its gap to the baseline.
    """
    title = "Accuracy recovery vs baseline, per task"
    recs = {r.get("name"): r for r in results.get("variants") or []}
    groups = tasks + ["average"]
    bars = {}  # (variant, group) -> (pct, lo, hi)
    for r in rows:
        if r["status"] != "ok" or r["method"] == "baseline":
            continue
        for g in groups:
            pct = _get(recs.get(r["name"]), "recovery", g, "pct")
            if pct is not None:
                ci = _get(recs.get(r["name"]), "recovery", g, "ci95") or [None, None]
                bars[(r["name"], g)] = (pct, ci[0], ci[1])
    names = [r["name"] for r in rows if any((r["name"], g) in bars for g in groups)]
    groups = [g for g in groups if any((n, g) in bars for n in names)]
    if not bars:
        return f"<h3>{title}</h3>" + _note("No variant has recovery figures: nothing to plot.")
    values = [v for pct, lo, hi in bars.values() for v in (pct, lo, hi) if v is not None and math.isfinite(v)]
    values.append(100.0)
    pad = max((max(values) - min(values)) * 0.1, 1.0)  # at least 1 point: identical scores still get an axis
    yt = _nice_ticks(min(values) - pad, max(values) + pad)
    sy = lambda v: H - BOTTOM - (v - yt[0]) / (yt[-1] - yt[0]) * (H - BOTTOM - TOP)  # noqa: E731
    group_w = (W - RIGHT - LEFT) / len(groups)
    bar_w = min(28.0, group_w * 0.8 / len(names))
    out = _frame(title, "task (bars start at the baseline's 100%)", "recovery (% of baseline score)", [], yt,
                 lambda v: 0, sy)
    for gi, g in enumerate(groups):
        cx = LEFT + group_w * (gi + 0.5)
        y = H - BOTTOM + (14 if gi % 2 == 0 else 27)  # staggered: long task names side by side stay readable
        out.append(f'<text x="{cx:.1f}" y="{y}" text-anchor="middle">{_e(g)}</text>')
        for ni, n in enumerate(names):
            if (n, g) not in bars:
                continue
            pct, lo, hi = bars[(n, g)]
            x = cx - bar_w * len(names) / 2 + ni * bar_w
            top, bottom = sorted((sy(pct), sy(100.0)))
            ci = f" [{lo:.1f}, {hi:.1f}]" if lo is not None and hi is not None else ""
            out.append(f'<g class="bar" data-name="{_e(n)}"><title>{_e(n)}, {_e(g)}: {pct:.1f}%{ci}</title>'
                       f'<rect x="{x + 1:.1f}" y="{top:.1f}" width="{bar_w - 2:.1f}" '
                       f'height="{max(bottom - top, 1):.1f}" fill="{colours[n]}"/></g>')
            if lo is not None and hi is not None:
                mx = x + bar_w / 2
                out.append(f'<path d="M{mx:.1f},{sy(lo):.1f}V{sy(hi):.1f}M{mx - 4:.1f},{sy(lo):.1f}h8'
                           f'M{mx - 4:.1f},{sy(hi):.1f}h8" stroke="#222" stroke-width="1.2" fill="none"/>')
    out.append(f'<line class="reference" x1="{LEFT}" x2="{W - RIGHT}" y1="{sy(100.0):.1f}" y2="{sy(100.0):.1f}" '
               f'stroke="#c00" stroke-width="1.2" stroke-dasharray="6 3"/>')
    legend = [(f'<rect x="-6" y="-6" width="12" height="12" fill="{colours[n]}"/>', n) for n in names]
    legend += [('<line x1="-7" x2="7" y1="0" y2="0" stroke="#c00" stroke-width="1.2" stroke-dasharray="6 3"/>',
                "baseline (100%)"),
               ('<path d="M0,-6V6M-4,-6h8M-4,6h8" stroke="#222" fill="none"/>', "95% CI")]
    out += _legend(legend)
    out.append("</svg>")
    skipped = _skipped([r for r in rows if r["method"] != "baseline"], set(names), "failed, or no recovery figures")
    return "\n".join(out) + skipped


# ----------------------------------------------------------------------------------------------------- output


def _md_inline(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


CALIBRATED_METHODS = ("gptq", "awq", "smoothquant-gptq")


def calibration_warnings(variants: list[dict]) -> list[str]:
    """Flag every calibrated variant that came out worse than round-to-nearest of the same weight format (bits,
    group size, symmetric or with zero points, KV cache), when the run has one.

    GPTQ/AWQ spend minutes on calibration to beat plain rounding; when they do not, the usual cause is the
    calibration text (off-domain for what is evaluated, or too few tokens), which the model card names. Compared on
    perplexity and KL to the baseline, the two figures measured on identical tokens for every variant.
    """
    out = []
    for v in variants:
        if v.get("status") != "ok" or v.get("method") not in CALIBRATED_METHODS:
            continue
        peers = [r for r in variants if r.get("status") == "ok" and r.get("method") == "rtn"
                 and (r.get("bits"), r.get("group_size"), r.get("symmetric"), r.get("kv_cache"))
                 == (v.get("bits"), v.get("group_size"), v.get("symmetric"), v.get("kv_cache"))
                 and r.get("run") == v.get("run")]
        for rtn in peers:
            worse = [f"{label} {_get(v, *key):.4g} vs {_get(rtn, *key):.4g}"
                     for label, key in (("perplexity", ("perplexity", "value")), ("KL", ("kl", "mean")))
                     if _get(v, *key) is not None and _get(rtn, *key) is not None and _get(v, *key) > _get(rtn, *key)]
            if worse:
                cal = v.get("calibration") or {}
                data = (f"{cal.get('samples')} x {cal.get('seq_len')} tokens of {cal.get('source')}" if cal
                        else "its calibration data")
                out.append(f"{v['name']} ({v['method']}) is worse than plain rounding ({rtn['name']}) on "
                           f"{' and '.join(worse)}. Likely cause: the calibration text ({data}) is unlike the "
                           f"evaluation text or too short; try in-domain text or more samples.")
    return out


def kv_table(variants: list[dict]) -> tuple[list[str], list[list[str]], str] | None:
    """The KV-cache table: (headers, rows, caption), or None when no variant changes the KV cache.

    Per variant: its KV format, bytes per token, the cache at the planner's context x batch, and per planner GPU
    how many sequences of that context fit beside its weights, with the gain over a 16-bit cache in brackets."""
    ok = [r for r in variants if r.get("status", "ok") == "ok" and r.get("kv_memory")]
    if not any(r.get("kv_cache") for r in ok):
        return None
    gpus = list(ok[0]["kv_memory"]["gpus"])
    headers = ["variant", "KV format", "KV bytes/token", "vs 16-bit (×)",
               f"KV at context × batch (MB)", "KL vs baseline", "perplexity"] + [f"{g}: sequences (+ vs 16-bit KV)"
                                                                                 for g in gpus]
    rows = []
    for r in ok:
        m = r["kv_memory"]
        rows.append([r["name"], m["format"], f"{m['bytes_per_token']:,.0f}", f"{m['ratio_vs_16bit']:.2f}",
                     f"{m['bytes_at_context_batch'] / MB:,.1f}", _pm(_get(r, "kl", "mean"), _get(r, "kl", "stderr"),
                                                                      ".4f"),
                     _fmt(_get(r, "perplexity", "value"), ".2f")]
                    + [f"{g['max_sequences']:,} (+{g['extra_sequences']:,})" for g in m["gpus"].values()])
    m0 = ok[0]["kv_memory"]
    caption = (f"Context {m0['context']:,} tokens × batch {m0['batch']} (the recipe's evaluation.planner); sequences "
               f"= how many {m0['context']:,}-token sequences fit in memory × (1 − {m0['headroom']:g}) after the "
               f"variant's weights (estimated from the config at serving precision: 16-bit unless quantized), "
               f"with the gain over a 16-bit KV cache. Integer formats count a 16-bit scale and minimum per group. "
               f"fp8 KV uses the checkpoint's calibrated scales as compressed-tensors applies them on load; int8/int4 "
               f"are quantized and dequantized as each key/value enters the cache (compress/kvcache.py), the "
               f"channel (KIVI) format quantizing every key, including the last few that KIVI keeps in 16 bits.")
    return headers, rows, caption


def gguf_table(variants: list[dict]) -> tuple[list[str], list[list[str]], str] | None:
    """What each GGUF file really holds: the requested llama.cpp type, the tensor types the quantizer chose, bits
    per weight, sizes, and the two engines' agreement on it. None without GGUF rows."""
    rows = []
    for r in variants:
        g = r.get("gguf")
        if r.get("status", "ok") != "ok" or not g:
            continue
        check = r.get("selfcheck") or {}
        types = ", ".join(f"{t} × {e['tensors']} ({e['bytes'] / MB:.1f} MB)" for t, e in g["types"].items())
        rows.append([r["name"], g["type_requested"] + (" + imatrix" if g.get("imatrix") else ""), types,
                     f"{g['bits_per_weight']:.2f}", f"{g['tensor_bytes'] / MB:.1f}", f"{g['file_bytes'] / MB:.1f}",
                     _fmt(check.get("engines_kl_mean"), ".2g")])
    if not rows:
        return None
    headers = ["variant", "requested type", "tensor types stored (count, MB)", "bits/weight", "tensors (MB)",
               "file (MB)", "llama.cpp vs transformers KL (self-check)"]
    caption = ("Read back from each file with gguf-py. llama.cpp's quantizer picks each tensor's type: the _M/_S "
               "mixtures give some tensors more bits, norms stay F32, and a K-quant (Q4_K, Q6_K) needs rows that "
               "are a multiple of 256 weights, so tensors with shorter or odd rows (576-wide on SmolLM2) fall back "
               "to a 32-block type (Q4_K → Q5_0, Q6_K → Q8_0). bits/weight = 8 × tensor bytes / parameters. The "
               "self-check KL is between llama.cpp's and transformers' next-token distributions for the same file "
               "on the self-check prompts.")
    return headers, rows, caption


def speed_summary(variants: list[dict]) -> list[str]:
    """The closing note on decode speed: every measured row against its run's baseline (tok/s ratio, engine,
    utilisation), and the fastest 4-bit GGUF row quoted against the fp32 transformers baseline."""
    baselines = _baselines(variants)
    out = []
    best = None
    for r in variants:
        base = baselines.get(r.get("run"))
        tok = _get(r, "throughput", "batches", "1", "tok_per_sec")
        base_tok = _get(base, "throughput", "batches", "1", "tok_per_sec")
        if r.get("status", "ok") != "ok" or not tok or not base_tok or r is base:
            continue
        if r.get("method") == "gguf" and r.get("bits") == 4 and (best is None or tok > best[1]):
            best = (r, tok, base, base_tok)
    if best:
        r, tok, base, base_tok = best
        rf = r.get("roofline") or {}
        util = rf.get("utilisation")
        out.append(f"Fastest 4-bit GGUF row: {r['name']} ({r['scheme']}) decodes at {tok:.1f} tok/s with "
                   f"{engine_text(r['throughput'])}, {tok / base_tok:.2f}× the baseline's {base_tok:.1f} tok/s "
                   f"({engine_text(base['throughput'])}, {_get(base, 'throughput', 'dtype') or 'fp32'}), same prompt "
                   f"and lengths, batch 1"
                   + (f"; it reaches {100 * util:.0f}% of its memory-bandwidth bound ({rf['bound_tok_per_sec']:.0f} "
                      f"tok/s = {rf['bandwidth_bytes_per_sec'] / 1e9:.1f} GB/s / {rf['bytes_per_token'] / MB:.1f} MB "
                      f"read per token)." if util is not None else "."))
        out.append(f"Edge targets (recipes/smollm2-135m-edge.yaml): ≥ 2× the baseline's tok/s — "
                   f"{'met' if tok / base_tok >= 2 else 'NOT met'}; ≥ 50% of the bandwidth bound — "
                   + (DASH if util is None else ('met' if util >= 0.5 else 'NOT met')) + ".")
    return out


def distill_table(variants: list[dict]) -> tuple[list[str], list[list[str]], str] | None:
    """The distillation table: how each student was made and what it scored, or None without students.

    Rows: the teacher (baseline) and every variant built from a student, so the pruned-untrained row, the
    distilled row and the distilled + quantized row sit together."""
    students = [r for r in variants if r.get("status", "ok") == "ok" and r.get("distill")]
    if not students:
        return None
    teacher = next((r for r in variants if r.get("method") == "baseline" and r.get("run") == students[0].get("run")),
                   None)
    headers = ["variant", "layers", "dropped layers (chosen by)", "steps", "tokens trained (epochs)",
               "train time (s)", "KD loss first → last", "size (MB)", "perplexity", "KL vs teacher", "tok/s (batch 1)"]

    def common(r: dict) -> list[str]:
        return [_fmt(r.get("weights_bytes"), ".1f", 1 / MB), _fmt(_get(r, "perplexity", "value"), ".2f"),
                _pm(_get(r, "kl", "mean"), _get(r, "kl", "stderr"), ".4f"),
                _fmt(_get(r, "throughput", "batches", "1", "tok_per_sec"), ".1f")]

    rows = []
    if teacher:
        n = students[0]["distill"]["teacher_layers"]
        rows.append([f"{teacher['name']} (teacher)", str(n), DASH, DASH, DASH, DASH, DASH] + common(teacher))
    for r in students:
        d = r["distill"]
        losses = (f"{d['first_loss']:.3f} → {d['final_loss']:.3f}" if d.get("final_loss") is not None else DASH)
        rows.append([r["name"], f"{d['student_layers']} of {d['teacher_layers']}",
                     f"{d['dropped_layers']} ({d['chosen_by']})", str(d["steps"]),
                     f"{d['tokens_trained']:,} ({d['epochs']:g})" if d["steps"] else "0",
                     _fmt(d.get("train_seconds"), ".0f") if d["steps"] else DASH, losses] + common(r))
    d0 = students[0]["distill"]
    caption = (f"Students are the teacher with its lowest block-influence layers removed (BI = 1 − cos(layer input, "
               f"layer output), mean over {d0['importance_windows']} windows of the training text), then trained "
               f"by logit distillation (KL at temperature {d0['settings']['temperature']:g}"
               + (f", + {d0['settings']['ce_weight']:g} × cross-entropy" if d0['settings']['ce_weight'] else "")
               + f") on `{d0['data']}`, never an evaluation file. A student shared by several variants was trained "
               f"once; its train time is that run's. KL is measured against the teacher on the perplexity tokens.")
    return headers, rows, caption


def plot_loss_curves(variants: list[dict], colours: dict) -> str:
    """KD loss per optimizer step for every distinct trained student (variants sharing a student share a line)."""
    curves: dict[str, list[dict]] = {}
    for r in variants:
        curve = _get(r, "distill", "loss_curve")
        if curve and not any(c == curve for c in curves.values()):
            curves[r["name"]] = curve
    title = "Distillation loss"
    if not curves:
        return ""
    xs = [p["step"] for c in curves.values() for p in c]
    ys = [p["loss"] for c in curves.values() for p in c]
    xt, yt = _nice_ticks(0, max(xs)), _nice_ticks(min(ys) * 0.95, max(ys) * 1.02)
    sx = lambda v: LEFT + (v - xt[0]) / (xt[-1] - xt[0]) * (W - RIGHT - LEFT)  # noqa: E731
    sy = lambda v: H - BOTTOM - (v - yt[0]) / (yt[-1] - yt[0]) * (H - BOTTOM - TOP)  # noqa: E731
    out = _frame(title, "optimizer step", "KD loss (KL × T², per token)", xt, yt, sx, sy)
    for name, c in curves.items():
        colour = colours.get(name, PALETTE[0])
        pts = " ".join(f"{sx(p['step']):.1f},{sy(p['loss']):.1f}" for p in c)
        out.append(f'<polyline class="loss-curve" data-name="{_e(name)}" points="{pts}" fill="none" '
                   f'stroke="{colour}" stroke-width="1.8"><title>{_e(name)}</title></polyline>')
    out += _legend([(f'<line x1="-7" x2="7" y1="0" y2="0" stroke="{colours.get(n, PALETTE[0])}" stroke-width="2"/>', n)
                    for n in curves])
    out.append("</svg>")
    return "\n".join(out)


def render_markdown(results: dict, rows: list[dict]) -> str:
    tasks = task_names(results.get("variants") or [])
    cols = display_columns(tasks, results.get("variants") or [])
    model = results.get("model") or {}
    lines = [f"# Compression report: {model.get('description', DASH)}", ""]
    if model.get("note"):
        lines += [f"**Note:** {_one_line(model['note'])}.", ""]
    lines += ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_md_inline(f(r)) for _, f in cols) + " |")
    lines += ["", "`—` = not measured (or the variant failed). Plots are in report.html; raw numbers in results.csv.",
              ""]
    for heading, table in (("KV cache", kv_table(results.get("variants") or [])),
                           ("GGUF files", gguf_table(results.get("variants") or [])),
                           ("Distillation", distill_table(results.get("variants") or []))):
        if table:
            headers, extra_rows, caption = table
            lines += [f"## {heading}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(_md_inline(c) for c in row) + " |" for row in extra_rows]
            lines += ["", caption, ""]
    if warnings := calibration_warnings(results.get("variants") or []):
        lines += ["## Checks", ""] + [f"- **Warning:** {_one_line(w)}" for w in warnings] + [""]
    if speed := speed_summary(results.get("variants") or []):
        lines += ["## Decode speed", ""] + [f"- {_one_line(t)}" for t in speed] + [""]
    lines += ["## Where the figures come from", ""]
    for heading, items in provenance(results):
        lines += [f"### {heading}", ""] + [f"- {_one_line(i)}" for i in items] + [""]
    return "\n".join(lines)


def render_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["name"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


CSS = """
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; } h3 { font-size: 15px; margin-bottom: 4px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 5px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; white-space: normal; vertical-align: bottom; font-size: 11px; }
td.text, th.text { text-align: left; }
td { background: #fff; }
tr.failed td { background: #fdecec; }
/* many tasks make the table wider than the screen: the variant names stay in view while it scrolls */
th:first-child, td:first-child:not(.error) { position: sticky; left: 0; z-index: 1; box-shadow: 1px 0 0 #ccc; }
td.error { white-space: normal; color: #900; text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plot { border: 1px solid #ddd; padding: 6px; }
.note { color: #666; font-size: 12px; max-width: 620px; }
.callout { background: #fff7e0; border-left: 4px solid #e0a800; padding: 8px 12px; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _html_inline(text: str) -> str:
    """Escape, then turn `code` spans into <code>."""
    parts = _e(_one_line(text)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(results: dict, rows: list[dict]) -> str:
    variants = results.get("variants") or []
    tasks = task_names(variants)
    cols = display_columns(tasks, variants)
    colours = _colours([r["name"] for r in rows if r["status"] == "ok"])
    model = results.get("model") or {}
    text_cols = {"variant", "method", "scheme", "status", "decode engine"}
    head = "".join(f'<th class="{"text" if h in text_cols else ""}">{_e(h)}</th>' for h, _ in cols)
    body = []
    for r in rows:
        cells = []
        for h, f in cols:
            text = r["status"] if h == "status" else f(r)  # a failed row's error gets its own full-width row
            cell = _e(text).replace(" [", "<br>[")  # a CI under its value keeps the wide table on one screen
            cells.append(f'<td class="{"text" if h in text_cols else ""}">{cell}</td>')
        body.append(f'<tr class="{"ok" if r["status"] == "ok" else "failed"}" data-name="{_e(r["name"])}">'
                    + "".join(cells) + "</tr>")
        if r["status"] != "ok":
            body.append(f'<tr class="failed"><td class="error" colspan="{len(cols)}">{_e(r["name"])} '
                        f'{_e(_status_text(r))}</td></tr>')
    prov = []
    for heading, items in provenance(results):
        prov.append(f"<h3>{_e(heading)}</h3><ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in items) + "</ul>")
    plots = [plot_accuracy_vs_size(rows, colours), plot_accuracy_vs_speed(rows, colours),
             plot_recovery(rows, colours, tasks, results)]
    if loss := plot_loss_curves(variants, colours):
        plots.append(loss)
    note = f'<p class="callout"><b>Note:</b> {_e(model["note"])}.</p>' if model.get("note") else ""
    title = f"Compression report: {model.get('description', DASH)}"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>", note,
        '<div class="scroll"><table id="variants"><thead><tr>' + head + "</tr></thead><tbody>",
        *body, "</tbody></table></div>",
        '<p class="note">— = not measured (or the variant failed). Hover a point or bar for its exact value.</p>',
        *_table_html("KV cache", "kv", kv_table(variants)),
        *_table_html("GGUF files", "gguf", gguf_table(variants)),
        *_table_html("Distillation", "distill", distill_table(variants)),
        *([f'<h2>Checks</h2><ul>{"".join(f"<li><b>Warning:</b> {_e(w)}</li>" for w in warnings)}</ul>']
          if (warnings := calibration_warnings(variants)) else []),
        *([f'<h2>Decode speed</h2><ul>{"".join(f"<li>{_e(t)}</li>" for t in speed)}</ul>']
          if (speed := speed_summary(variants)) else []),
        "<h2>Plots</h2>", '<div class="plots">', *(f'<div class="plot">{p}</div>' for p in plots), "</div>",
        "<h2>Where the figures come from</h2>", *prov, "</body></html>", ""])


def _table_html(heading: str, table_id: str, table) -> list[str]:
    """A section table (kv_table, distill_table) as HTML: its first two columns are text."""
    if not table:
        return []
    headers, rows, caption = table
    head = "".join(f'<th class="{"text" if i < 2 else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"text" if i < 2 else ""}">{_e(c)}</td>' for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return [f"<h2>{_e(heading)}</h2>", f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>", f'<p class="note">{_html_inline(caption)}</p>']


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.md, results.csv and report.html into out_dir (each via a temp file and os.replace, so a
    reader never sees half a file; none of them over a file compress did not write: compress/ownership.py).
    Returns {"md", "csv", "html"} -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = variant_rows(results)
    paths = {"md": out_dir / "report.md", "csv": out_dir / "results.csv", "html": out_dir / "report.html"}
    texts = {"md": render_markdown(results, rows), "csv": render_csv(rows), "html": render_html(results, rows)}
    foreign = ownership.check_files(out_dir, [p.name for p in paths.values()])
    if foreign:  # all three or none: a report is never half replaced
        raise ownership.ForeignPathError("\n".join(foreign))
    for kind, path in paths.items():
        ownership.write_owned(out_dir, path.name, texts[kind])
    return paths


def main_report(run_dirs: list[Path], out: Path | None) -> int:
    """`compress report RUN_DIR [RUN_DIR ...] [--out DIR]`. Exit code 0, or 2 on bad input (nothing written).

    One run: the report goes next to its results.json unless --out says otherwise. Several runs: --out is
    required, since no single run directory owns the merged table.
    """
    try:
        if not run_dirs:
            raise InputError("give at least one run directory")
        if out is None and len(run_dirs) > 1:
            raise InputError("several run directories: say where the merged report goes with --out DIR")
        results = merge_runs([Path(d) for d in run_dirs])
        paths = write_report(results, Path(out) if out is not None else Path(run_dirs[0]))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths.values():
        print(p)
    return 0
