"""The report's entry points: write_report (what a pipeline run calls at its end) and `compress report`.

Data flows top to bottom: runs.py loads, rows.py derives one row of figures per variant, tables.py,
provenance.py and plots.py build the sections' content, sections.py orders it, render.py writes it out, and this
module puts the three files in place.
"""

from __future__ import annotations

import sys
from pathlib import Path

from compress import ownership
from compress.recipe import InputError
from compress.report.render import render_csv, render_html, render_markdown
from compress.report.rows import variant_rows
from compress.report.runs import merge_runs
from compress.report.sections import sections, title


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.md, results.csv and report.html into out_dir (each via a temp file and os.replace, so a
    reader never sees half a file; none of them over a file compress did not write: compress/ownership.py).
    Returns {"md", "csv", "html"} -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = variant_rows(results)
    parts, head = sections(results, rows), title(results)
    paths = {"md": out_dir / "report.md", "csv": out_dir / "results.csv", "html": out_dir / "report.html"}
    texts = {"md": render_markdown(head, parts), "csv": render_csv(rows), "html": render_html(head, parts)}
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
