"""The report's sections, in order: built once from the results, walked by the Markdown and the HTML renderer.

This list is the one place that says what the report contains and in which order; render.py only says how each
kind of section is written. Adding a section is one entry here (and, for a new kind, one case per renderer).
A section the run has nothing for (no KV-cache variants, no warnings) is left out rather than shown empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.report.plots import plots
from compress.report.provenance import provenance
from compress.report.rows import DASH, display_columns, task_names
from compress.report.tables import (auto_map_table, auto_sensitivity_table, auto_table, calibration_warnings,
                                    distill_table, gguf_table, kv_table, speed_summary, stage_table, vllm_sweep_table,
                                    vllm_table, vllm_tasks_table)


@dataclass(frozen=True)
class Section:
    """One part of the report. `kind` says what `content` is:

    - "callout": a sentence to stand out (the model's note, e.g. that the baseline is itself dequantized);
    - "variants": the main table, (display_columns, rows);
    - "table": a tables.Table (headers, rows of text, caption); `id` is its HTML id;
    - "list": lines of text (`code` in backticks), each after `label` in bold when there is one;
    - "plots": a list of plots.Plot (HTML only: the Markdown report points to report.html for them);
    - "sections": a list of Sections, one heading level down.

    `heading` is None for what sits directly under the title (the callout, the main table).
    """
    heading: str | None
    kind: str
    content: object
    id: str | None = None
    label: str | None = None


def title(results: dict) -> str:
    """The report's title (the first line of report.md; ownership.py recognises older reports by it)."""
    return f"Compression report: {(results.get('model') or {}).get('description', DASH)}"


def sections(results: dict, rows: list[dict]) -> list[Section]:
    """Every section of the report, in order (the rows are rows.variant_rows(results))."""
    variants = results.get("variants") or []
    out = []
    if partial := partial_note(results.get("progress")):
        out.append(Section(None, "callout", partial))
    if note := (results.get("model") or {}).get("note"):
        out.append(Section(None, "callout", note))
    out.append(Section(None, "variants", (display_columns(task_names(variants), variants), rows)))
    for heading, table_id, table in (("KV cache", "kv", kv_table(variants)),
                                     ("GGUF files", "gguf", gguf_table(variants)),
                                     ("Distillation", "distill", distill_table(variants)),
                                     ("Auto-choose: targets, predicted and measured", "auto", auto_table(variants)),
                                     ("Auto-choose: format per unit", "auto-map", auto_map_table(variants)),
                                     ("Auto-choose: sensitivity per unit", "auto-sensitivity",
                                      auto_sensitivity_table(variants)),
                                     ("Served by vLLM", "vllm", vllm_table(variants)),
                                     ("vLLM serving sweep", "vllm-sweep", vllm_sweep_table(variants)),
                                     ("Tasks through vLLM", "vllm-tasks", vllm_tasks_table(variants)),
                                     ("Where the time went", "stage-times", stage_table(variants))):
        if table:
            out.append(Section(heading, "table", table, id=table_id))
    if warnings := calibration_warnings(variants):
        out.append(Section("Checks", "list", warnings, label="Warning"))
    if speed := speed_summary(variants):
        out.append(Section("Decode speed", "list", speed))
    out.append(Section("Plots", "plots", plots(rows, variants)))
    out.append(Section("Where the figures come from", "sections",
                       [Section(heading, "list", lines) for heading, lines in provenance(results)]))
    return out


def partial_note(progress: dict | None) -> str | None:
    """The sentence that marks a report written before its run ended (None for a finished run, or a results.json
    from before compress recorded its progress)."""
    if not progress or progress.get("state") == "complete":
        return None
    counted = (f"{progress['rows_measured']} of {progress['rows']} rows measured"
               if "rows_measured" in progress else "no row measured yet")
    last = f", last stage: {progress['stage']}" if progress.get("stage") else ""
    if progress.get("state") == "stopped":
        return (f"Partial run: stopped ({progress.get('reason', 'no reason recorded')}){last}; {counted}. Run the "
                f"same command again to continue.")
    return f"Partial run: still running when this was written{last}; {counted}."
