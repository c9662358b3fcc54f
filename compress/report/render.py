"""Writing the report: the section list (sections.py) as Markdown and as one self-contained HTML page, and the
rows as CSV.

Both renderers walk the same sections in the same order and differ only in how a kind of section is written, so
report.md and report.html always say the same things. The Markdown leaves the plots out (it points to
report.html); the HTML inlines them as SVG, so the page needs no external CSS, JS, fonts or images: it opens
offline and survives being mailed around.
"""

from __future__ import annotations

import csv
import html
import io
import math

from compress.report.draw import svg
from compress.report.plots import PALETTE, Plot
from compress.report.rows import DASH, _one_line, _status_text
from compress.report.sections import Section

MD_TABLE_NOTE = "`—` = not measured (or the variant failed). Plots are in report.html; raw numbers in results.csv."
HTML_TABLE_NOTE = "— = not measured (or the variant failed). Hover a point or bar for its exact value."
TEXT_COLUMNS = {"variant", "method", "scheme", "status", "decode engine"}  # left-aligned in the main table
NO_MATPLOTLIB = "Not drawn: matplotlib is not installed (pip install 'matplotlib>=3.8')."


# ---------------------------------------------------------------------------------------------------- Markdown


def render_markdown(title: str, sections: list[Section]) -> str:
    """report.md: the title, then every section (a section's heading one level below its parent's)."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += _md_section(section, level=2)
    return "\n".join(lines)


def _md_section(s: Section, level: int) -> list[str]:
    if s.kind == "plots":  # SVG has no place in Markdown: MD_TABLE_NOTE points to report.html for them
        return []
    lines = [f"{'#' * level} {s.heading}", ""] if s.heading else []
    if s.kind == "callout":
        return lines + [f"**Note:** {_one_line(s.content)}.", ""]
    if s.kind == "variants":
        cols, rows = s.content
        return lines + _md_table([h for h, _ in cols], [[f(r) for _, f in cols] for r in rows]) + [
            "", MD_TABLE_NOTE, ""]
    if s.kind == "table":
        return lines + _md_table(s.content.headers, s.content.rows) + ["", s.content.caption, ""]
    if s.kind == "list":
        label = f"**{s.label}:** " if s.label else ""
        return lines + [f"- {label}{_one_line(item)}" for item in s.content] + [""]
    if s.kind == "sections":
        return lines + [line for sub in s.content for line in _md_section(sub, level + 1)]
    raise ValueError(f"unknown section kind {s.kind!r}")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(_md_inline(c) for c in row) + " |" for row in rows])


def _md_inline(text: str) -> str:
    """A table cell: one line, its pipes escaped."""
    return _one_line(text).replace("|", "\\|")


# --------------------------------------------------------------------------------------------------------- CSV


def render_csv(rows: list[dict]) -> str:
    """The rows as they are (raw numbers; empty for None), one column per key."""
    buf = io.StringIO()
    fields = list(rows[0]) if rows else ["name"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------------- HTML

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
.plot svg { max-width: 100%; height: auto; }
.note { color: #666; font-size: 12px; max-width: 620px; }
.callout { background: #fff7e0; border-left: 4px solid #e0a800; padding: 8px 12px; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _html_inline(text: str) -> str:
    """Escape, then turn `code` spans into <code>."""
    parts = _e(_one_line(text)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(title: str, sections: list[Section]) -> str:
    """report.html: one page with its CSS inline, the title, then every section."""
    body = [line for section in sections for line in _html_section(section, level=2)]
    return "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                      f"<title>{_e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{_e(title)}</h1>",
                      *body, "</body></html>", ""])


def _html_section(s: Section, level: int) -> list[str]:
    out = [f"<h{level}>{_e(s.heading)}</h{level}>"] if s.heading else []
    if s.kind == "callout":
        return out + [f'<p class="callout"><b>Note:</b> {_html_inline(s.content)}.</p>']
    if s.kind == "variants":
        return out + [_variants_table(*s.content), f'<p class="note">{_e(HTML_TABLE_NOTE)}</p>']
    if s.kind == "table":
        t = s.content
        colour = _shades(t.rows, t.shade)
        body = ["<tr>" + "".join(_cell("td", _e(c), i < 2, colour.get(c) if i else None) for i, c in enumerate(row))
                + "</tr>" for row in t.rows]
        return out + [_table(s.id, [_cell("th", _e(h), i < 2) for i, h in enumerate(t.headers)], body),
                      f'<p class="note">{_html_inline(t.caption)}</p>']
    if s.kind == "list":
        label = f"<b>{_e(s.label)}:</b> " if s.label else ""
        return out + ["<ul>" + "".join(f"<li>{label}{_html_inline(item)}</li>" for item in s.content) + "</ul>"]
    if s.kind == "plots":
        return out + ['<div class="plots">', *(f'<div class="plot">{_plot(p)}</div>' for p in s.content), "</div>"]
    if s.kind == "sections":
        return out + [line for sub in s.content for line in _html_section(sub, level + 1)]
    raise ValueError(f"unknown section kind {s.kind!r}")


def _cell(tag: str, inner: str, is_text: bool, background: str | None = None) -> str:
    """A th or td around HTML; text columns are left-aligned, numbers right-aligned."""
    style = f' style="background:{background}"' if background else ""
    return f'<{tag} class="{"text" if is_text else ""}"{style}>{inner}</{tag}>'


def _shades(rows: list[list[str]], shade: str) -> dict[str, str]:
    """A background per cell text of a heat-map table (Table.shade), the first column left out."""
    values = [c for row in rows for c in row[1:] if c != DASH]
    if shade == "category":  # one light colour per distinct value, in order of first appearance
        distinct = list(dict.fromkeys(values))
        return {v: PALETTE[i % len(PALETTE)] + "55" for i, v in enumerate(distinct)}
    if shade == "scale":  # log scale from the smallest positive number (white) to the largest (dark red)
        numbers = {v: float(v) for v in values if _is_number(v) and float(v) > 0}
        if not numbers:
            return {}
        lo, hi = math.log10(min(numbers.values())), math.log10(max(numbers.values()))
        return {v: f"rgba(225,87,89,{(math.log10(x) - lo) / (hi - lo) if hi > lo else 1:.2f})"
                for v, x in numbers.items()}
    return {}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _table(table_id: str, head: list[str], body: list[str]) -> str:
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{"".join(head)}</tr></thead><tbody>'
            + "\n".join(body) + "</tbody></table></div>")


def _variants_table(cols: list, rows: list[dict]) -> str:
    """The main table: a row per variant (class ok/failed, data-name), a failed variant's error on a full-width
    row under it, and a confidence interval on its own line under its value."""
    body = []
    for r in rows:
        cells = [_cell("td", _e(r["status"] if h == "status" else f(r)).replace(" [", "<br>["), h in TEXT_COLUMNS)
                 for h, f in cols]
        body.append(f'<tr class="{"ok" if r["status"] == "ok" else "failed"}" data-name="{_e(r["name"])}">'
                    + "".join(cells) + "</tr>")
        if r["status"] != "ok":
            body.append(f'<tr class="failed"><td class="error" colspan="{len(cols)}">{_e(r["name"])} '
                        f'{_e(_status_text(r))}</td></tr>')
    return _table("variants", [_cell("th", _e(h), h in TEXT_COLUMNS) for h, _ in cols], body)


def _plot(plot: Plot) -> str:
    """A plot's SVG and its notes; only the heading and notes when there is nothing to draw (or no matplotlib)."""
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in plot.notes)
    if plot.marks:
        try:
            return svg(plot) + notes
        except ModuleNotFoundError as e:  # the tables and the rest of the page do not need it
            if e.name != "matplotlib":
                raise
            notes = f'<p class="note">{_e(NO_MATPLOTLIB)}</p>' + notes
    return f"<h3>{_e(plot.title)}</h3>" + notes
