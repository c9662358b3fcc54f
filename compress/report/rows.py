"""Rows: one dict of raw figures per variant, and the columns that turn a row into the text of the main table.

The rows are what results.csv holds (raw numbers: bytes, seconds, fractions) and what every other part of the
report reads, so a figure is derived once here (compression ratio, average score, speed against the baseline)
and only formatted further on. Missing data is normal: a figure that was not measured is None here and "—" in
the tables.
"""

from __future__ import annotations

from compress.backends.unchanged import REFERENCE
from compress.record import known_path
from typing import Callable

DASH = "—"
MB = 1e6  # sizes are decimal megabytes, as the model cards print them


def _get(d, *keys):
    """record[k1][k2]... or None when any level is missing or null (results.json omits what was not measured).

    The path must name a field compress/record.py declares: a misspelt key raises here, in the report's tests,
    instead of showing "—" in every report."""
    if not known_path(*keys):
        raise KeyError(f"{'.'.join(map(str, keys))} is not a field of a variant record (compress/record.py)")
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


def baselines(variants: list[dict]) -> dict:
    """run -> the baseline record of that run (the key is None for a results dict that is not merged).

    Ratios are taken against the baseline of the variant's own run: in a merged report each run was measured
    against its own baseline, on its own hardware."""
    out = {}
    for rec in variants:
        if rec.get("method") == REFERENCE and rec.get("status", "ok") == "ok":
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


def speed_ratio(rec: dict, base: dict | None) -> dict:
    """The row's decode speed over its baseline's, as eval/interleaved measured it (both checkpoints alternated
    in rounds, so both saw the same machine): median ratio, its interval, and the verdict. The baseline's own is
    1 exactly. A row without interleaved rounds gets none: the quotient of two medians timed minutes apart is
    what a busy machine fakes, so it is not shown in its place."""
    if base is not None and rec is base and _get(rec, "throughput"):
        return {"tok_per_sec_vs_baseline": 1.0, "tok_per_sec_vs_baseline_lo": 1.0,
                "tok_per_sec_vs_baseline_hi": 1.0, "speed_verdict": "reference"}
    ratio = _get(rec, "speed_ratio", "ratio")
    return {"tok_per_sec_vs_baseline": ratio,
            "tok_per_sec_vs_baseline_lo": _get(rec, "speed_ratio", "ratio_lo") if ratio is not None else None,
            "tok_per_sec_vs_baseline_hi": _get(rec, "speed_ratio", "ratio_hi") if ratio is not None else None,
            "speed_verdict": _get(rec, "speed_ratio", "verdict")}


def speed_contended(rec: dict) -> bool | None:
    """Whether any of the row's speed figures came from timed windows that other processes shared (after its
    retries): its batch-1..n decode rows or its interleaved ratio. None when it has no speed figures."""
    if not _get(rec, "throughput"):
        return None
    flags = [_get(rec, "throughput", "batches", b, "contention", "contended")
             for b in _get(rec, "throughput", "batches") or {}]
    flags.append(_get(rec, "speed_ratio", "contention", "contended"))
    return any(bool(f) for f in flags)


def variant_rows(results: dict) -> list[dict]:
    """One dict of raw figures per variant: the CSV rows, and what the Markdown and HTML tables format.

    Units are in the keys: bytes, seconds, fractions (0-1) except `*_pct`, which are percent of the baseline.
    Every row has the same keys in the same order (they are the CSV's columns).
    """
    variants = results.get("variants") or []
    tasks = task_names(variants)
    base_of = baselines(variants)
    rows = []
    for rec in variants:
        base = base_of.get(rec.get("run"))
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
            **speed_ratio(rec, base),
            "speed_contended": speed_contended(rec),
            "ttft_s_b1": b1.get("ttft_s"),
            "peak_memory_bytes": _get(rec, "throughput", "peak_memory_bytes"),
            "bytes_read_per_token": _get(rec, "roofline", "bytes_per_token"),
            "bound_tok_per_sec": _get(rec, "roofline", "bound_tok_per_sec"),
            "roofline_utilisation": _get(rec, "roofline", "utilisation"),
            "compress_seconds": rec.get("compress_seconds"),
            "kv_format": _get(rec, "kv_memory", "format"),
            "kv_bytes_per_token": _get(rec, "kv_memory", "bytes_per_token"),
            "status": rec.get("status", "ok"), "error": rec.get("error"),
        })
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ formatting


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    """format(value * scale, spec), or "—" for a figure that was not measured."""
    if value is None:
        return DASH
    return format(value * scale if scale != 1.0 else value, spec)


def _pm(value, stderr, spec: str, scale: float = 1.0) -> str:
    """"value ± stderr"; the stderr is left off (not invented) when only the value is known."""
    if value is None:
        return DASH
    text = format(value * scale, spec)
    return text if stderr is None else f"{text} ± {format(stderr * scale, spec)}"


def _one_line(text: str) -> str:
    """The text with every run of whitespace (newlines included) as one space: a table cell or list item."""
    return " ".join(str(text).split())


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
    """"ok", or the status with the error that ended the variant."""
    if r["status"] == "ok":
        return "ok"
    return f"{r['status']}: {r['error']}" if r["error"] else str(r["status"])


CONTENDED = "⚠ contended"  # what a row timed while other processes used its cores says, wherever it is shown


def ratio_text(r: dict) -> str:
    """'0.86 [0.84, 0.88]', '1.01 [0.97, 1.04] no measurable difference', '1 (reference)', or —."""
    ratio, lo, hi = r["tok_per_sec_vs_baseline"], r["tok_per_sec_vs_baseline_lo"], r["tok_per_sec_vs_baseline_hi"]
    if ratio is None:
        return DASH
    if r["speed_verdict"] == "reference":
        return "1 (reference)"
    text = f"{ratio:.2f} [{lo:.2f}, {hi:.2f}]"
    if r["speed_verdict"] == "no measurable difference":
        text += " no measurable difference"
    return text + (f" {CONTENDED}" if r["speed_contended"] else "")


Column = tuple[str, Callable[[dict], str]]


def display_columns(tasks: list[str], variants: list[dict]) -> list[Column]:
    """(header, row -> text) for the human tables. Headers carry units; tasks carry their metric name."""
    metrics = {t: next((_get(r, "tasks", t, "metric") for r in variants if _get(r, "tasks", t, "metric")), "score")
               for t in tasks}
    cols: list[Column] = [
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
        ("tok/s (batch 1)", lambda r: _fmt(r["tok_per_sec_b1"], ".1f") + (f" {CONTENDED}" if r["speed_contended"]
                                                                           else "")),
        ("× baseline tok/s [95% interval, interleaved]", ratio_text),
        ("TTFT (ms)", lambda r: _fmt(r["ttft_s_b1"], ".0f", 1000)),
        ("peak memory (MB)", lambda r: _fmt(r["peak_memory_bytes"], ".0f", 1 / MB)),
        ("read per token (MB)", lambda r: _fmt(r["bytes_read_per_token"], ".1f", 1 / MB)),
        ("roofline utilisation (%)", lambda r: _fmt(r["roofline_utilisation"], ".0f", 100)),
        ("compress time (s)", lambda r: _fmt(r["compress_seconds"], ".1f")),
        ("status", _status_text),
    ]
    return cols
