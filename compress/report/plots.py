"""What each plot shows: the data of the four plots, their hover texts and their "Not plotted (...)" notes.

This module decides which variants are plotted and with which figures; draw.py turns a Plot into SVG with
matplotlib. Keeping the two apart lets the choice of data be tested (and the Markdown report built) without
matplotlib, and keeps drawing code free of rules about results.json.

A plot skips what it cannot place (a failed variant, one without a score on every task) and says which variants
it skipped, so a missing point is never mistaken for a point hidden behind another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from compress.backends.unchanged import REFERENCE
from compress.report.rows import MB, _get, task_names

PALETTE = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7",
           "#bab0ac"]


class Point(NamedTuple):
    name: str
    x: float
    y: float
    title: str  # the hover text
    x_lo: float | None = None  # the interval of x, when x was measured with one (the speed ratio)
    x_hi: float | None = None
    flagged: bool = False  # timed while other processes used the machine: drawn hollow, said in the hover


class Bar(NamedTuple):
    name: str
    group: str  # the task, or "average"
    pct: float  # recovery, % of the baseline's score
    lo: float | None  # its 95% confidence interval, when the evaluation computed one
    hi: float | None
    title: str


class Curve(NamedTuple):
    name: str
    steps: list[int]
    losses: list[float]
    title: str


@dataclass(frozen=True)
class Plot:
    """One plot: kind "scatter" (Points), "bars" (Bars in `groups`) or "curves" (Curves), in per-variant colours.

    No marks means nothing could be plotted; `notes` then says why. Otherwise `notes` names what was skipped."""
    kind: str
    title: str
    x_label: str
    y_label: str
    marks: list
    colours: dict[str, str]
    notes: list[str] = field(default_factory=list)
    front: list[str] = field(default_factory=list)  # scatter: the Pareto front, by increasing x
    groups: list[str] = field(default_factory=list)  # bars: the x-axis groups, in order
    # scatter: a curve drawn under the points, (label, [(x, y), ...]) (the auto frontier as predicted)
    curve: tuple[str, list[tuple[float, float]]] | None = None
    y_log: bool = False


def colours(names: list[str]) -> dict[str, str]:
    """One colour per variant, the same in every plot."""
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def pareto_front(points) -> list[str]:
    """Names of the points no other point beats on both axes (x = speed, y = accuracy; higher is better for both).

    A point is dominated when another is at least as good on both axes and better on one; what remains is the set
    of reasonable choices, each buying speed only with accuracy. Where x has an interval (x_lo, x_hi), "at least
    as fast" must hold for the whole interval: q beats p on speed only when q's lower end is at or above p's upper
    end, so two variants whose speed intervals overlap are never ranked by speed (the front keeps both, unless one
    loses on accuracy with the other surely as fast). Equal points are all kept. Ordered by x ascending, the order
    to draw the front in. Points are Point or (name, x, y, ...) tuples.
    """
    def ends(p) -> tuple[float, float]:
        lo, hi = getattr(p, "x_lo", None), getattr(p, "x_hi", None)
        return (p[1] if lo is None else lo, p[1] if hi is None else hi)

    def beats(q, p) -> bool:
        (q_lo, _), (_, p_hi) = ends(q), ends(p)
        return q_lo >= p_hi and q[2] >= p[2] and (q_lo > p_hi or q[2] > p[2])

    front = [p for p in points if not any(beats(q, p) for q in points if q is not p)]
    return [p[0] for p in sorted(front, key=lambda p: (p[1], -p[2]))]


def plots(rows: list[dict], variants: list[dict]) -> list[Plot]:
    """The report's plots, in order: accuracy vs size, accuracy vs speed, recovery per task, and the
    distillation loss curves when the run trained a student."""
    palette = colours([r["name"] for r in rows if r["status"] == "ok"])
    out = [accuracy_vs_size(rows, palette), accuracy_vs_speed(rows, palette), recovery(rows, variants, palette)]
    if loss := loss_curves(variants, palette):
        out.append(loss)
    if frontier := auto_frontier(variants, palette):
        out.append(frontier)
    out += serving_curves(variants, palette)
    return out


def _skipped(rows: list[dict], kept: set[str], why: str) -> list[str]:
    missing = [r["name"] for r in rows if r["name"] not in kept]
    return [f"Not plotted ({why}): {', '.join(missing)}."] if missing else []


def _scatter(rows: list[dict], palette: dict, x_key: str, x_scale: float, x_unit: str, *, title: str,
             x_label: str, needs: str, lacks: str, front: bool = False, x_spec: str = ".1f") -> Plot:
    """Average task score (%) against one figure of the rows (row[x_key] * x_scale, in x_unit), for every ok
    variant that has both; `needs` and `lacks` name that figure in the notes ("a size" / "size")."""
    def point(r: dict) -> Point:
        x, lo, hi = r[x_key] * x_scale, r.get(x_key + "_lo"), r.get(x_key + "_hi")
        interval = f" [{lo * x_scale:.2f}, {hi * x_scale:.2f}]" if lo is not None and hi is not None and hi > lo else ""
        flagged = bool(r.get("speed_contended")) and x_key.startswith("tok_per_sec")
        title = (f"{r['name']}: {x:{x_spec}}{interval} {x_unit}, {r['average_score'] * 100:.1f} %"
                 + (" (timed under contention)" if flagged else ""))
        return Point(r["name"], x, r["average_score"] * 100, title,
                     None if lo is None else lo * x_scale, None if hi is None else hi * x_scale, flagged)

    pts = [point(r) for r in rows
           if r["status"] == "ok" and r[x_key] is not None and r["average_score"] is not None]
    if not pts:
        notes = [f"No variant has both {needs} and a score on every task: nothing to plot."]
    else:
        notes = _skipped(rows, {p.name for p in pts}, f"failed, or no {lacks} or no score on every task")
    return Plot("scatter", title, x_label, "average task score (%)", pts, palette, notes,
                front=pareto_front(pts) if front else [])


def accuracy_vs_size(rows: list[dict], palette: dict) -> Plot:
    return _scatter(rows, palette, "weights_bytes", 1 / MB, "MB", title="Accuracy vs size on disk",
                    x_label="size on disk (MB, weight files)", needs="a size", lacks="size")


def accuracy_vs_speed(rows: list[dict], palette: dict) -> Plot:
    """Accuracy against batch-1 decode speed relative to the baseline, each point with the interval of its
    interleaved ratio, and the Pareto front computed on those intervals: the variants worth choosing between.
    The ratio (not absolute tok/s) is plotted because it is the figure measured under the same conditions as the
    baseline; a row timed under contention is drawn hollow."""
    return _scatter(rows, palette, "tok_per_sec_vs_baseline", 1.0, "× baseline",
                    title="Accuracy vs decode speed (batch 1)",
                    x_label="decode tok/s ÷ baseline's (median of interleaved rounds, 95% interval)",
                    needs="an interleaved speed ratio", lacks="speed ratio", front=True, x_spec=".2f")


def recovery(rows: list[dict], variants: list[dict], palette: dict) -> Plot:
    """Grouped bars: one group per task (and the average), one bar per non-baseline variant, from the 100% line.

    Bars start at 100% (the baseline) rather than at 0: recoveries sit near 100%, and bars from a truncated axis
    would exaggerate differences, while bars from 0 would hide them. A bar's length is its gap to the baseline.
    """
    recs = {r.get("name"): r for r in variants}
    groups = task_names(variants) + ["average"]
    bars = []
    for r in rows:
        if r["status"] != "ok" or r["method"] == REFERENCE:
            continue
        for g in groups:
            pct = _get(recs.get(r["name"]), "recovery", g, "pct")
            if pct is not None:
                lo, hi = _get(recs.get(r["name"]), "recovery", g, "ci95") or [None, None]
                ci = f" [{lo:.1f}, {hi:.1f}]" if lo is not None and hi is not None else ""
                bars.append(Bar(r["name"], g, pct, lo, hi, f"{r['name']}, {g}: {pct:.1f}%{ci}"))
    names = {b.name for b in bars}
    notes = (_skipped([r for r in rows if r["method"] != REFERENCE], names, "failed, or no recovery figures")
             if bars else ["No variant has recovery figures: nothing to plot."])
    return Plot("bars", "Accuracy recovery vs baseline, per task", "task (bars start at the baseline's 100%)",
                "recovery (% of baseline score)", bars, palette, notes,
                groups=[g for g in groups if any(b.group == g for b in bars)])


def loss_curves(variants: list[dict], palette: dict) -> Plot | None:
    """KD loss per optimizer step for every distinct trained student (variants sharing a student share a line),
    or None when no variant was distilled."""
    curves: list[Curve] = []
    seen: list[list[dict]] = []
    for r in variants:
        curve = _get(r, "distill", "loss_curve")
        if not curve or curve in seen:
            continue
        seen.append(curve)
        steps, losses = [p["step"] for p in curve], [p["loss"] for p in curve]
        curves.append(Curve(r["name"], steps, losses, f"{r['name']}: KD loss {losses[0]:.3f} at step {steps[0]} "
                                                      f"→ {losses[-1]:.3f} at step {steps[-1]}"))
    if not curves:
        return None
    return Plot("curves", "Distillation loss", "optimizer step", "KD loss (KL × T², per token)", curves,
                {c.name: palette.get(c.name, PALETTE[0]) for c in curves})


def serving_curves(variants: list[dict], palette: dict) -> list[Plot]:
    """vLLM's TTFT p50 and TPOT p50 against concurrency, one line per served variant ([] when none was)."""
    out = []
    for key, label in (("ttft_s_p50", "TTFT p50 (ms)"), ("tpot_s_p50", "TPOT p50 (ms)")):
        curves = []
        for r in variants:
            sweep = _get(r, "vllm", "sweep")
            if r.get("status", "ok") != "ok" or not sweep:
                continue
            xs, ys = [lv["concurrency"] for lv in sweep], [1000 * lv[key] for lv in sweep]
            curves.append(Curve(r["name"], xs, ys, f"{r['name']}: {label} " + ", ".join(
                f"{y:.0f} at {x}" for x, y in zip(xs, ys))))
        if curves:
            out.append(Plot("curves", f"vLLM {label.split()[0]} vs concurrency", "concurrent requests", label,
                            curves, {c.name: palette.get(c.name, PALETTE[0]) for c in curves}))
    return out


def auto_frontier(variants: list[dict], palette: dict) -> Plot | None:
    """Method `auto`: the size-damage frontier its sensitivity pass predicted (summed one-unit KL against bits per
    weight), with every built variant of the run placed by its measured KL on held-out text: the auto points and
    the uniform ones they chose between. None when no variant is `auto`."""
    ok = [r for r in variants if r.get("status", "ok") == "ok" and _get(r, "kl", "mean") is not None]
    autos = [r for r in variants if r.get("status", "ok") == "ok" and r.get("auto")]
    if not autos:
        return None
    pts = []
    for r in ok:
        bits = _get(r, "auto", "effective_bits") or _get(r, "format", "bits_per_weight")
        if bits is None or r.get("method") == REFERENCE or r["kl"]["mean"] <= 0:
            continue
        kind = "auto" if r.get("auto") else "uniform"
        pts.append(Point(r["name"], bits, r["kl"]["mean"],
                         f"{r['name']} ({kind}): {bits:.3f} bits/weight, measured KL {r['kl']['mean']:.4f}"))
    a = autos[0]["auto"]
    curve = [(b, c) for b, c in a["frontier"] if c > 0]
    notes = [f"Predicted frontier from {autos[0]['name']}'s sensitivity pass ({a['sensitivity']['score']} on "
             f"{a['sensitivity']['windows']} × {a['sensitivity']['seq_len']} calibration tokens); points: KL "
             f"measured on the perplexity file."]
    notes += _skipped([r for r in variants if r.get("status", "ok") == "ok" and r.get("method") != REFERENCE],
                      {p.name for p in pts}, "no measured KL or no bits per weight")
    return Plot("scatter", "Auto-choose: predicted frontier and measured variants", "bits per weight (scales included)",
                "KL to baseline (nats/token, log)", pts, palette, notes, curve=("predicted frontier", curve),
                y_log=True)
