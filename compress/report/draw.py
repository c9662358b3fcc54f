"""Drawing: a Plot (plots.py) as an inline SVG string, drawn by matplotlib, with a tooltip on every mark.

matplotlib is imported here, inside svg(), and nowhere else: the Markdown and CSV reports, and everything that
imports compress.report, work without it. It draws on a bare matplotlib Figure rather than through pyplot, so no
backend is chosen and no global figure state is touched (a notebook that imports compress keeps its backend);
its rcParams are set only for the duration of the drawing.

What the browser shows on hover is added after matplotlib has written the SVG: every mark (point, bar, curve,
front, reference line) is drawn with a gid, which matplotlib writes as `<g id="...">`, and that group gets a
`<title>` child (the tooltip: the variant and its figures), a `data-name` attribute with the variant, and a class
saying what it is (`point`, `front-point`, `pareto-front`, `curve`, `bar`, `reference`, `loss-curve`), which is also how
tests and scripts find them. The output is deterministic: no date or metadata, a fixed hash salt for the ids
matplotlib derives from content, and every id prefixed with the plot's slug so that the plots inlined in one page
share no id.
"""

from __future__ import annotations

import html
import io
import re
from typing import NamedTuple

from compress.report.plots import Plot

W, H = 640, 420  # CSS pixels; matplotlib's SVG unit is the point (1/72 in), a CSS pixel is 1/96 in
FONT_PT = 8  # point labels and legends
CHAR_W = 0.62 * FONT_PT  # rough width of one character of DejaVu Sans, for keeping labels apart
LEGEND_CHARS = 24  # a longer variant name is cut in the legend (the point's label and tooltip keep it whole)
RC = {"svg.hashsalt": "compress-report", "svg.fonttype": "none", "font.family": "sans-serif",
      "font.sans-serif": ["DejaVu Sans"], "axes.titleweight": "bold", "axes.titlesize": 12, "axes.labelsize": 10,
      "axes.grid": True, "grid.color": "#e4e4e4", "axes.axisbelow": True, "legend.fontsize": FONT_PT,
      "legend.frameon": False}
FRONT = dict(color="#222", linewidth=1.5, linestyle=(0, (5, 3)))
REFERENCE = dict(color="#c00", linewidth=1.2, linestyle=(0, (6, 3)))
CI = dict(fmt="none", ecolor="#222", elinewidth=1.2, capsize=3)


class Hover(NamedTuple):
    """What one drawn mark says on hover: its class, the variant (None for a line that is no variant's), title."""
    cls: str
    name: str | None
    title: str


def svg(plot: Plot) -> str:
    """The plot as an `<svg>` element to inline in HTML (no XML prolog, no external references)."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(W / 96, H / 96), dpi=72, layout="constrained")  # dpi 72: display units are points
        ax = fig.add_subplot()
        ax.set_title(plot.title)
        ax.set_xlabel(plot.x_label)
        ax.set_ylabel(plot.y_label)
        hovers: list[Hover] = []
        handles = {"scatter": _scatter, "bars": _bars, "curves": _curves}[plot.kind](ax, plot, hovers)
        fig.legend(handles=handles, loc="outside right upper")
        if plot.kind == "scatter":
            _label_points(fig, ax, plot.marks)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return _annotate(buf.getvalue(), plot.title, hovers)


def _mark(artist, hovers: list[Hover], cls: str, name: str | None, title: str) -> None:
    """Give the artist a gid that _annotate will find, and remember what it says on hover."""
    artist.set_gid(f"mark{len(hovers)}")
    hovers.append(Hover(cls, name, title))


def _short(name: str) -> str:
    return name if len(name) <= LEGEND_CHARS else name[:LEGEND_CHARS - 1] + "…"


def _scatter(ax, plot: Plot, hovers: list[Hover]) -> list:
    """One point per variant; with a front, its points ringed and joined by a dashed line in order of x."""
    from matplotlib.lines import Line2D

    handles = []
    for p in plot.marks:
        colour = plot.colours[p.name]
        if p.x_lo is not None and p.x_hi is not None and p.x_hi > p.x_lo:  # drawn from its ends, as measured
            ax.errorbar([(p.x_lo + p.x_hi) / 2], [p.y], xerr=[(p.x_hi - p.x_lo) / 2], zorder=2,
                        **{**CI, "ecolor": colour})
        face = "white" if p.flagged else colour  # hollow: timed while other processes used the machine
        _mark(ax.scatter([p.x], [p.y], s=50, color=face, edgecolors=colour if p.flagged else "#333",
                         linewidths=1.6 if p.flagged else 0.6, zorder=3), hovers, "point", p.name, p.title)
        handles.append(Line2D([], [], marker="o", linestyle="", color=face, markeredgecolor="#333",
                              label=_short(p.name)))
    if any(p.flagged for p in plot.marks):
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="#333",
                              label="hollow: timed under contention"))
    if plot.curve:
        label, xy = plot.curve
        line, = ax.plot([x for x, _ in xy], [y for _, y in xy], color="#888", linewidth=1.2, zorder=1)
        _mark(line, hovers, "curve", None, label)
        handles.append(Line2D([], [], color="#888", linewidth=1.2, label=label))
    if plot.y_log:
        ax.set_yscale("log")
    if plot.front:
        at = {p.name: p for p in plot.marks}
        line, = ax.plot([at[n].x for n in plot.front], [at[n].y for n in plot.front], zorder=2, **FRONT)
        _mark(line, hovers, "pareto-front", None, "Pareto front: " + " → ".join(plot.front))
        for n in plot.front:
            _mark(ax.scatter([at[n].x], [at[n].y], s=180, facecolors="none", edgecolors="#222", linewidths=2,
                             zorder=4), hovers, "front-point", n, at[n].title + " (on the Pareto front)")
        handles += [Line2D([], [], label="Pareto front", **FRONT),
                    Line2D([], [], marker="o", markersize=11, linestyle="", markerfacecolor="none",
                           markeredgecolor="#222", markeredgewidth=2, label="on the front")]
    ax.margins(0.12, 0.15)
    return handles


def _bars(ax, plot: Plot, hovers: list[Hover]) -> list:
    """Grouped bars from the 100% line (one group per task), each with its 95% CI, and the 100% line itself."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = list(dict.fromkeys(b.name for b in plot.marks))
    width = 0.8 / len(names)
    for b in plot.marks:
        x = plot.groups.index(b.group) - 0.4 + (names.index(b.name) + 0.5) * width
        colour = plot.colours[b.name]
        # the edge keeps a bar of exactly 100% visible (and hoverable) as a line
        rect, = ax.bar([x], [b.pct - 100], bottom=100, width=width * 0.9, color=colour, edgecolor=colour,
                       linewidth=0.8)
        _mark(rect, hovers, "bar", b.name, b.title)
        if b.lo is not None and b.hi is not None:  # drawn from its ends: a CI need not be centred on the value
            ax.errorbar([x], [(b.lo + b.hi) / 2], yerr=[(b.hi - b.lo) / 2], zorder=3, **CI)
    _mark(ax.axhline(100, zorder=4, **REFERENCE), hovers, "reference", None, "baseline: 100%")
    crowded = sum(len(g) for g in plot.groups) > 48  # many or long task names: slanted, so they stay apart
    ax.set_xticks(range(len(plot.groups)), plot.groups, rotation=20 if crowded else 0,
                  ha="right" if crowded else "center")
    ax.grid(False, axis="x")
    return [Patch(color=plot.colours[n], label=_short(n)) for n in names] + [
        Line2D([], [], label="baseline (100%)", **REFERENCE),
        Line2D([], [], color="#222", marker="|", markersize=10, linestyle="", label="95% CI")]


def _curves(ax, plot: Plot, hovers: list[Hover]) -> list:
    """One line per distinct student."""
    handles = []
    for c in plot.marks:
        line, = ax.plot(c.steps, c.losses, color=plot.colours[c.name], linewidth=1.8, label=_short(c.name))
        _mark(line, hovers, "loss-curve", c.name, c.title)
        handles.append(line)
    return handles


def _label_points(fig, ax, points: list) -> None:
    """Name each point beside it, at the first of a few spots where its text overlaps no earlier label and stays
    inside the axes, or else the spot where it overlaps least. Run after the layout, so positions are final."""
    fig.draw_without_rendering()
    box = ax.get_window_extent()
    placed: list[tuple[float, float, float, float]] = []
    for p in sorted(points, key=lambda p: -p.y):
        px, py = ax.transData.transform((p.x, p.y))
        w, h = len(p.name) * CHAR_W, FONT_PT * 1.2
        best = None
        for dx, dy in ((7, 7), (7, -7), (-7, 7), (-7, -7), (7, 18), (7, -18), (-7, 18), (-7, -18)):
            left = px + dx if dx > 0 else px + dx - w
            spot = (left, py + dy - h / 2, left + w, py + dy + h / 2)
            outside = not (box.x0 <= spot[0] and spot[2] <= box.x1 and box.y0 <= spot[1] and spot[3] <= box.y1)
            cost = outside * w * h + sum(_overlap(spot, q) for q in placed)
            if best is None or cost < best[0]:
                best = (cost, dx, dy, spot)
            if not cost:
                break
        _, dx, dy, spot = best
        placed.append(spot)
        ax.annotate(p.name, (p.x, p.y), xytext=(dx, dy), textcoords="offset points", fontsize=FONT_PT,
                    ha="left" if dx > 0 else "right", va="center").set_in_layout(False)


def _overlap(a, b) -> float:
    """The area two boxes (x0, y0, x1, y1) share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _annotate(text: str, title: str, hovers: list[Hover]) -> str:
    """matplotlib's SVG document as an element for an HTML page: prolog and metadata dropped, the plot's title as
    its accessible name, ids prefixed with the plot's slug, and every marked group given its class, variant and
    tooltip."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    text = text[text.index("<svg"):]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)
    text = text.replace("<svg ", f'<svg role="img" aria-label="{html.escape(title)}" ', 1)
    text = re.sub(r'(\s)id="([^"]+)"', rf'\1id="{slug}-\2"', text)
    text = re.sub(r'(url\(#|href="#)', rf"\1{slug}-", text)
    for i, (cls, name, tip) in enumerate(hovers):
        gid = f'<g id="{slug}-mark{i}">'
        data = f' data-name="{html.escape(name)}"' if name is not None else ""
        text = text.replace(gid, f'{gid[:-1]} class="{cls}"{data}><title>{html.escape(tip)}</title>', 1)
    return text.rstrip() + "\n"
