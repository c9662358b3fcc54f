"""The comparison report: one table of every variant, where each figure came from, and plots.

`compress report RUN_DIR [RUN_DIR ...] [--out DIR]` reads each run's results.json and writes three files:

- report.md: the table and a "Where the figures come from" section, for reading in a terminal or a PR;
- results.csv: the same columns as raw numbers (bytes, seconds, fractions), for spreadsheets and scripts;
- report.html: one self-contained page (no external CSS, JS, fonts or images, so it opens offline and survives
  being mailed around) with the same sections and the plots inline as SVG: accuracy vs size, accuracy vs decode
  speed with its Pareto front, recovery per task, and the distillation loss when a student was trained.

A figure without its provenance invites wrong comparisons: a perplexity from a different context length, a
throughput from a GPU next to one from a CPU, a "baseline" that is itself quantized. So every column has a line
under the table that says how it was measured, and any setting that differs between variants is listed per
variant instead of silently taking the first one.

Missing data is normal (a failed variant, a run without evaluation, a task only some variants ran): the tables
show "—", the plots skip the point and say which ones they skipped.

Nothing here imports torch, so the report can be rebuilt anywhere from results.json alone. The plots are drawn
with matplotlib, imported only when report.html is written (draw.py), so report.md and results.csv need nothing
beyond the standard library; without matplotlib the page says so where each plot would be.

The modules, in the order data flows through them: runs (load and merge results.json), rows (one row of raw
figures per variant, and the main table's columns), tables / provenance / plots (each section's content),
sections (the one ordered list of sections), render (Markdown, CSV, HTML; draw for the plots' SVG), write (the
files, and the `compress report` command).
"""

from compress.report.plots import pareto_front
from compress.report.rows import variant_rows
from compress.report.runs import load_results, merge_runs
from compress.report.write import main_report, write_report

__all__ = ["load_results", "main_report", "merge_runs", "pareto_front", "variant_rows", "write_report"]
