"""plots.py (what each plot shows) and draw.py (the plot as inline SVG with a tooltip on every mark)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from compress.report import pareto_front, variant_rows
from compress.report.draw import svg
from compress.report.plots import Plot, Point, loss_curves, plots

ROOT = Path(__file__).resolve().parents[3]


def rec(name: str, method: str, mb: float, tok: float | None, score: float | None, recovery: float | None = None,
        status: str = "ok") -> dict:
    """A record; `tok` is its speed relative to a baseline at 20 tok/s, measured in rounds with a +-5% interval."""
    out = {"name": name, "method": method, "status": status, "weights_bytes": int(mb * 1e6)}
    if tok is not None:
        out["throughput"] = {"engine": "transformers-eager", "batches": {"1": {"tok_per_sec": tok}}}
        if method != "baseline":
            r = tok / 20.0
            out["speed_ratio"] = {"ratio": r, "ratio_lo": r * 0.95, "ratio_hi": r * 1.05}
    if score is not None:
        out["tasks"] = {"arc": {"value": score}, "piqa": {"value": score}}
    if recovery is not None:
        out["recovery"] = {"arc": {"pct": recovery, "ci95": [recovery - 3, recovery + 2]},
                           "average": {"pct": recovery}}  # no CI for the average
    return out


VARIANTS = [rec("baseline", "baseline", 500, 20.0, 0.55), rec("rtn", "rtn", 150, 18.0, 0.50, 91.0),
            rec("gptq", "gptq", 150, 22.0, 0.53, 96.4), rec("slow", "rtn", 200, None, 0.54, 98.0),
            rec("awq", "awq", 150, 22.0, None, status="failed")]


def _plots() -> dict[str, Plot]:
    return {p.title: p for p in plots(variant_rows({"variants": VARIANTS}), VARIANTS)}


def test_pareto_front():
    points = [("a", 10.0, 0.50), ("b", 20.0, 0.45), ("c", 15.0, 0.40),  # c is beaten by b on both axes
              ("d", 30.0, 0.30), ("e", 30.0, 0.25),  # e ties d on speed but is less accurate
              ("f", 5.0, 0.50)]  # f ties a on accuracy but is slower
    assert pareto_front(points) == ["a", "b", "d"]
    assert pareto_front([("x", 1.0, 1.0), ("y", 1.0, 1.0)]) == ["x", "y"]  # equal points both stay
    assert pareto_front([]) == []


def test_pareto_front_on_speed_intervals():
    """A variant beats another on speed only when its whole interval is at or above the other's: overlapping
    intervals are no measurable difference, so the less accurate one is not pushed off the front by a point."""
    base, q = Point("base", 1.0, 55.0, "", 1.0, 1.0), Point("q", 0.98, 50.0, "", 0.93, 1.04)
    assert pareto_front([base, q]) == ["q", "base"]  # q may be as fast as the baseline: not dominated
    surely_slower = Point("q", 0.90, 50.0, "", 0.86, 0.95)
    assert pareto_front([base, surely_slower]) == ["base"]  # slower for sure and less accurate
    fast = Point("fast", 1.5, 52.0, "", 1.4, 1.6)
    assert pareto_front([base, fast, Point("mid", 1.45, 51.0, "", 1.2, 1.7)]) == ["base", "mid", "fast"]


def test_scatter_data_and_skipped_variants():
    p = _plots()
    size, speed = p["Accuracy vs size on disk"], p["Accuracy vs decode speed (batch 1)"]
    assert [m.name for m in size.marks] == ["baseline", "rtn", "gptq", "slow"]
    assert [m.x for m in size.marks] == pytest.approx([500.0, 150.0, 150.0, 200.0])  # MB
    assert [m.y for m in size.marks] == pytest.approx([55.0, 50.0, 53.0, 54.0])  # average score, %
    assert size.marks[2].title == "gptq: 150.0 MB, 53.0 %"
    assert len(size.notes) == 1 and size.notes[0].endswith(": awq.")  # only the failed variant is missing
    assert [m.name for m in speed.marks] == ["baseline", "rtn", "gptq"]
    assert speed.marks[0].title == "baseline: 1.00 × baseline, 55.0 %"  # the reference has no interval
    assert (speed.marks[2].x, speed.marks[2].x_lo, speed.marks[2].x_hi) == pytest.approx((1.1, 1.045, 1.155))
    assert speed.front == ["baseline", "gptq"]  # rtn is surely slower than gptq, and less accurate
    assert "slow" in speed.notes[0] and "awq" in speed.notes[0] and "rtn" not in speed.notes[0]
    assert size.colours["gptq"] == speed.colours["gptq"]  # a variant keeps its colour across plots


def test_recovery_bars_from_the_records():
    bars = _plots()["Accuracy recovery vs baseline, per task"]
    assert bars.groups == ["arc", "average"]  # piqa has no recovery figures: no empty group
    assert [(b.name, b.group, b.pct, b.lo, b.hi) for b in bars.marks] == [
        ("rtn", "arc", 91.0, 88.0, 93.0), ("rtn", "average", 91.0, None, None),
        ("gptq", "arc", 96.4, 93.4, 98.4), ("gptq", "average", 96.4, None, None),
        ("slow", "arc", 98.0, 95.0, 100.0), ("slow", "average", 98.0, None, None)]
    assert bars.marks[0].title == "rtn, arc: 91.0% [88.0, 93.0]" and bars.marks[1].title == "rtn, average: 91.0%"
    assert bars.notes[0].endswith(": awq.")  # the baseline is the 100% line, not a skipped bar


def test_nothing_to_plot_is_a_note():
    bare = [{"name": "baseline", "method": "baseline", "status": "ok"}, {"name": "q", "method": "rtn", "status": "ok"}]
    result = plots(variant_rows({"variants": bare}), bare)
    assert len(result) == 3 and all(not p.marks and "nothing to plot" in p.notes[0] for p in result)


def test_loss_curves_one_per_distinct_student():
    curve = [{"step": 0, "loss": 3.0}, {"step": 10, "loss": 1.5}, {"step": 20, "loss": 1.2}]
    variants = [{"name": "distilled", "distill": {"loss_curve": curve}},
                {"name": "distilled-w4", "distill": {"loss_curve": curve}},  # the same student, quantized
                {"name": "short", "distill": {"loss_curve": curve[:2]}}, {"name": "baseline"}]
    plot = loss_curves(variants, {"distilled": "#111111"})
    assert [(c.name, c.steps, c.losses) for c in plot.marks] == [("distilled", [0, 10, 20], [3.0, 1.5, 1.2]),
                                                                  ("short", [0, 10], [3.0, 1.5])]
    assert plot.colours["distilled"] == "#111111" and "3.000" in plot.marks[0].title and "1.200" in plot.marks[0].title
    assert loss_curves([{"name": "baseline"}], {}) is None  # no student: no plot at all


def _groups(svg_text: str) -> list[dict[str, str]]:
    """Every marked group: its class, data-name (if any) and title."""
    return [{"class": c, "name": n, "title": t} for c, n, t in re.findall(
        r'<g id="[^"]+" class="([^"]+)"(?: data-name="([^"]*)")?><title>([^<]*)</title>', svg_text)]


def test_svg_marks_carry_class_variant_and_tooltip():
    p = _plots()
    speed = svg(p["Accuracy vs decode speed (batch 1)"])
    assert speed.startswith("<svg ") and 'aria-label="Accuracy vs decode speed (batch 1)"' in speed
    marks = _groups(speed)
    assert [(m["name"], m["title"]) for m in marks if m["class"] == "point"] == [
        ("baseline", "baseline: 1.00 × baseline, 55.0 %"),
        ("rtn", f"rtn: 0.90 [{0.9 * 0.95:.2f}, {0.9 * 1.05:.2f}] × baseline, 50.0 %"),
        ("gptq", f"gptq: 1.10 [{1.1 * 0.95:.2f}, {1.1 * 1.05:.2f}] × baseline, 53.0 %")]
    assert [m["name"] for m in marks if m["class"] == "front-point"] == ["baseline", "gptq"]
    assert [m["class"] for m in marks].count("pareto-front") == 1
    bars = _groups(svg(p["Accuracy recovery vs baseline, per task"]))
    assert [(m["name"], m["title"]) for m in bars if m["class"] == "bar"][:2] == [
        ("rtn", "rtn, arc: 91.0% [88.0, 93.0]"), ("rtn", "rtn, average: 91.0%")]
    assert len([m for m in bars if m["class"] == "bar"]) == 6 and [m["class"] for m in bars].count("reference") == 1
    curve = [{"step": s, "loss": 3.0 / (s + 1)} for s in range(0, 50, 10)]
    loss = _groups(svg(loss_curves([{"name": "d<1>", "distill": {"loss_curve": curve}}], {})))
    assert [(m["class"], m["name"]) for m in loss] == [("loss-curve", "d&lt;1&gt;")]  # names are escaped


def test_a_row_timed_under_contention_is_drawn_hollow_and_says_so():
    variants = [dict(v) for v in VARIANTS]
    variants[2]["speed_ratio"] = {**variants[2]["speed_ratio"], "contention": {"contended": True}}
    speed = next(p for p in plots(variant_rows({"variants": variants}), variants) if "speed" in p.title)
    gptq = next(m for m in speed.marks if m.name == "gptq")
    assert gptq.flagged and gptq.title.endswith("(timed under contention)")
    assert not any(m.flagged for m in speed.marks if m.name != "gptq")
    drawn = svg(speed)
    assert "hollow: timed under contention" in drawn
    assert "hollow" not in svg(_plots()["Accuracy vs decode speed (batch 1)"])  # no flagged row, no legend entry


def test_svg_is_deterministic_self_contained_and_has_unique_ids():
    p = _plots()
    first = [svg(plot) for plot in p.values()]
    assert first == [svg(plot) for plot in p.values()]
    page = "".join(first)
    assert "<metadata" not in page and "<?xml" not in page and "<!DOCTYPE" not in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing fetched
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # several plots inline in one page share no id
    refs = set(re.findall(r'(?:url\(#|href="#)([^)"]+)', page))
    assert refs and refs <= set(ids)  # and every reference still points inside its own plot


def test_a_point_on_its_own_gets_an_axis():
    one = [rec("baseline", "baseline", 500, 20.0, 0.55)]
    drawn = svg(plots(variant_rows({"variants": one}), one)[0])
    assert [m["name"] for m in _groups(drawn)] == ["baseline"]


def test_report_imports_without_matplotlib_or_torch():
    """Only draw.svg() imports matplotlib: loading the package, and building every section, need none; without it
    the page says so where each plot would be. Nothing imports torch: a report can be rebuilt anywhere."""
    code = ("import sys, json; sys.modules['matplotlib'] = None\n"
            "from compress.report import variant_rows\n"
            "assert 'torch' not in sys.modules\n"
            "from compress.report.render import render_markdown, render_html\n"
            "from compress.report.sections import sections, title\n"
            f"r = json.load(open({str(ROOT / 'tests/fixtures/run/results.json')!r}))\n"
            "s = sections(r, variant_rows(r))\n"
            "assert 'rtn-w4a16' in render_markdown(title(r), s)\n"
            "page = render_html(title(r), s)\n"
            "assert '<svg' not in page and page.count('matplotlib is not installed') == 3, page\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
