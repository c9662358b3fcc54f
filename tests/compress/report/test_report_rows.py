"""rows.py: the raw figures of each variant (the CSV's rows) and the main table's columns, on hand-built records."""

import json
from pathlib import Path

import pytest

from compress.report.rows import DASH, average_score, display_columns, task_names, variant_rows

FIXTURE_RUN = Path(__file__).resolve().parents[2] / "fixtures" / "run"


def rec(name: str, method: str = "rtn", weights: int | None = 100, tok: float | None = 10.0, run: str | None = None,
        ratio: tuple[float, float, float] | None = None, **tasks: float) -> dict:
    """A minimal ok variant record: weights, batch-1 throughput, its interleaved speed ratio (median, lo, hi), and
    task scores (fractions)."""
    out = {"name": name, "method": method, "status": "ok", "weights_bytes": weights, "run": run,
           "tasks": {t: {"metric": "acc", "value": v, "stderr": 0.01} for t, v in tasks.items()}}
    if tok is not None:
        out["throughput"] = {"engine": "transformers-eager", "threads": 2, "batches": {"1": {"tok_per_sec": tok}}}
    if ratio is not None:
        out["speed_ratio"] = {"ratio": ratio[0], "ratio_lo": ratio[1], "ratio_hi": ratio[2],
                              "verdict": "faster" if ratio[1] > 1 else "slower" if ratio[2] < 1 else
                              "no measurable difference"}
    return out


def test_ratios_are_the_interleaved_ones_never_a_quotient_of_two_rows():
    variants = [rec("a/baseline", "baseline", 400, 10.0, run="a"), rec("a/q", "rtn", 100, 15.0, run="a",
                                                                       ratio=(1.4, 1.3, 1.6)),
                rec("b/baseline", "baseline", 800, 20.0, run="b"), rec("b/q", "rtn", 100, 10.0, run="b")]
    rows = {r["name"]: r for r in variant_rows({"variants": variants})}
    assert rows["a/q"]["compression_ratio"] == 4.0 and rows["b/q"]["compression_ratio"] == 8.0
    # 1.4 measured in rounds, not 15 / 10 from two rows timed apart
    assert (rows["a/q"]["tok_per_sec_vs_baseline"], rows["a/q"]["tok_per_sec_vs_baseline_lo"],
            rows["a/q"]["tok_per_sec_vs_baseline_hi"], rows["a/q"]["speed_verdict"]) == (1.4, 1.3, 1.6, "faster")
    assert rows["b/q"]["tok_per_sec_vs_baseline"] is None  # no interleaved rounds: no ratio, not 10 / 20
    assert rows["a/baseline"]["compression_ratio"] == 1.0
    assert rows["a/baseline"]["tok_per_sec_vs_baseline"] == 1.0 and rows["a/baseline"]["speed_verdict"] == "reference"


def test_missing_figures_are_none_not_zero():
    failed = {"name": "broken", "method": "awq", "status": "failed", "error": "RuntimeError: nan"}
    rows = variant_rows({"variants": [rec("baseline", "baseline", tok=None), rec("q", weights=None), failed]})
    base, q, broken = rows
    assert base["tok_per_sec_b1"] is None and base["tok_per_sec_vs_baseline"] is None and base["engine"] is None
    assert q["compression_ratio"] is None and q["tok_per_sec_vs_baseline"] is None  # no baseline throughput
    assert broken["status"] == "failed" and broken["error"] == "RuntimeError: nan" and broken["perplexity"] is None
    assert [list(r) for r in rows] == [list(base)] * 3  # the same columns in every row: they are the CSV's


def test_average_only_over_every_task():
    variants = [rec("full", arc=0.5, piqa=0.7), rec("partial", piqa=0.6)]
    assert task_names(variants) == ["arc", "piqa"]
    assert average_score(variants[0], ["arc", "piqa"]) == pytest.approx(0.6)
    assert average_score(variants[1], ["arc", "piqa"]) is None  # a subset's mean is not comparable
    assert average_score(variants[0], []) is None
    rows = variant_rows({"variants": variants})
    assert rows[1]["arc_value"] is None and rows[1]["piqa_value"] == 0.6 and rows[1]["average_score"] is None


def test_fixture_rows():
    rows = variant_rows(json.loads((FIXTURE_RUN / "results.json").read_text()))
    assert [r["name"] for r in rows] == ["baseline", "rtn-w4a16", "gptq-w4a16", "awq-w4a16"]
    gptq = rows[2]
    assert gptq["weights_bytes"] == 173186776 and gptq["compression_ratio"] == pytest.approx(538090408 / 173186776)
    assert (gptq["hellaswag_value"], gptq["hellaswag_stderr"], gptq["kl_mean"]) == (0.405, 0.022, 0.0514)
    assert gptq["average_score"] == pytest.approx((0.538 + 0.405 + 0.659) / 3)
    assert (gptq["recovery_avg_pct"], gptq["recovery_avg_ci95_lo"], gptq["recovery_avg_ci95_hi"]) == (98.6, 96.7, 100.4)
    assert gptq["tok_per_sec_vs_baseline"] == 1.02 and gptq["ttft_s_b1"] == 0.079
    assert (gptq["tok_per_sec_vs_baseline_lo"], gptq["tok_per_sec_vs_baseline_hi"]) == (0.98, 1.05)
    assert gptq["speed_verdict"] == "no measurable difference" and gptq["speed_contended"] is True
    assert rows[1]["speed_contended"] is False and rows[3]["speed_contended"] is None  # quiet; not timed


def test_display_columns_format_units_and_dashes():
    variants = [rec("baseline", "baseline", 538_090_408, 24.6, arc=0.548), rec("q", weights=173_186_776, tok=None)]
    variants[0]["recovery"] = {"average": {"pct": 100.0, "ci95": [100.0, 100.0]}}
    variants[1]["tasks"] = {}
    cols = display_columns(task_names(variants), variants)
    headers = [h for h, _ in cols]
    assert headers[:3] == ["variant", "method", "scheme"] and headers[-1] == "status"
    assert "arc acc (%)" in headers  # a task's header carries its metric
    table = {r["name"]: dict(zip(headers, (f(r) for _, f in cols))) for r in variant_rows({"variants": variants})}
    assert table["baseline"]["size (MB)"] == "538.1" and table["q"]["compression (×)"] == "3.11"
    assert table["baseline"]["arc acc (%)"] == "54.8 ± 1.0" and table["q"]["arc acc (%)"] == DASH
    assert table["baseline"]["avg recovery (% [95% CI])"] == "100.0 [100.0, 100.0]"
    assert table["baseline"]["decode engine"] == "transformers-eager, 2 threads"
    assert table["q"]["tok/s (batch 1)"] == DASH
    assert table["q"]["bits"] == DASH and table["q"]["status"] == "ok"


def test_ratio_column_says_the_verdict_and_flags_contention():
    base = rec("baseline", "baseline", tok=20.0)
    faster = rec("fast", tok=30.0, ratio=(1.48, 1.41, 1.55))
    same = rec("same", tok=20.5, ratio=(1.01, 0.97, 1.04))
    busy = rec("busy", tok=9.0, ratio=(0.95, 0.90, 0.99))
    busy["throughput"]["batches"]["1"]["contention"] = {"contended": True}
    variants = [base, faster, same, busy, rec("untimed", tok=None)]
    cols = dict(display_columns([], variants))
    rows = {r["name"]: r for r in variant_rows({"variants": variants})}
    ratio, tok = cols["× baseline tok/s [95% interval, interleaved]"], cols["tok/s (batch 1)"]
    assert ratio(rows["baseline"]) == "1 (reference)"
    assert ratio(rows["fast"]) == "1.48 [1.41, 1.55]"
    assert ratio(rows["same"]) == "1.01 [0.97, 1.04] no measurable difference"
    assert ratio(rows["busy"]) == "0.95 [0.90, 0.99] ⚠ contended" and tok(rows["busy"]) == "9.0 ⚠ contended"
    assert tok(rows["fast"]) == "30.0" and ratio(rows["untimed"]) == DASH
