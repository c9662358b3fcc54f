"""sections.py and render.py: the one list of sections, and the Markdown, CSV and HTML written from it."""

import csv
import io
import json
import re
import subprocess
from pathlib import Path

import pytest

from compress.report import variant_rows, write_report
from compress.report.render import render_csv, render_html, render_markdown
from compress.report.sections import Section, sections, title

FIXTURE_RUN = Path(__file__).resolve().parents[2] / "fixtures" / "run"
CHROMIUM = Path("/usr/bin/chromium")
NAMES = ["baseline", "rtn-w4a16", "gptq-w4a16", "awq-w4a16"]


@pytest.fixture
def results() -> dict:
    return json.loads((FIXTURE_RUN / "results.json").read_text())


def gguf_record(name: str, tok: float) -> dict:
    return {"name": name, "method": "gguf", "scheme": "GGUF Q4_K_M", "bits": 4, "status": "ok", "run": None,
            "gguf": {"type_requested": "Q4_K_M", "types": {"Q5_0": {"tensors": 166, "bytes": 53_700_000}},
                     "bits_per_weight": 6.17, "tensor_bytes": 103_668_480, "file_bytes": 105_453_984},
            "throughput": {"engine": "llama.cpp", "threads": 1, "batches": {"1": {"tok_per_sec": tok}}},
            "speed_ratio": {"ratio": tok / 24.6, "ratio_lo": tok / 25.0, "ratio_hi": tok / 24.0, "rounds": 8,
                            "verdict": "faster", "tok_per_sec": tok, "baseline_tok_per_sec": 24.6},
            "roofline": {"bytes_per_token": 104_000_000, "bound_tok_per_sec": 240.0, "bandwidth_bytes_per_sec": 25e9,
                         "utilisation": tok / 240.0}}


def md_table(md: str) -> dict[str, dict[str, str]]:
    """The first Markdown table in md: variant -> header -> cell (pipes in a cell are escaped, so the split is on
    unescaped ones)."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| variant |"))
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]  # noqa: E731
    headers = split(lines[start])
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append(split(line))
    return {r[0]: dict(zip(headers, r)) for r in rows}


def headings(md: str) -> list[str]:
    return [l for l in md.splitlines() if l.startswith("#")]


def test_one_section_list_in_order(results):
    results["variants"] += [gguf_record("gguf-fast", 130.0)]
    results["variants"][2]["perplexity"]["value"] = 30.0  # gptq worse than rtn: a check fails
    parts = sections(results, variant_rows(results))
    assert [(s.heading, s.kind) for s in parts] == [
        (None, "callout"), (None, "variants"), ("GGUF files", "table"), ("Checks", "list"), ("Decode speed", "list"),
        ("Plots", "plots"), ("Where the figures come from", "sections")]
    assert parts[2].id == "gguf" and parts[3].label == "Warning"
    assert [len(p.marks) for p in parts[5].content] == [3, 3, 2 * 4]  # accuracy vs size/speed, recovery bars
    assert [s.heading for s in parts[-1].content][:2] == ["Model", "Compute"]


def test_both_renderers_walk_the_same_sections(results):
    parts = sections(results, variant_rows(results))
    md, page = render_markdown(title(results), parts), render_html(title(results), parts)
    assert headings(md)[0] == "# Compression report: smollm2-135m (embedded)"
    md_headings = [h.lstrip("# ") for h in headings(md)[1:]]
    html_headings = re.findall(r"<h[23]>([^<]*)</h[23]>", page)
    assert md_headings == [h for h in html_headings if h != "Plots"]  # the Markdown points to report.html for plots
    # a new section is one entry in the list, and both renderers show it
    extra = parts + [Section("Extra", "list", ["one `code`"], label="Hint")]
    assert render_markdown("t", extra).endswith("## Extra\n\n- **Hint:** one `code`\n")
    assert render_html("t", extra).endswith("<h2>Extra</h2>\n<ul><li><b>Hint:</b> one <code>code</code></li></ul>\n"
                                            "</body></html>\n")


def test_markdown_table(results):
    md = render_markdown(title(results), sections(results, variant_rows(results)))
    table = md_table(md)
    assert list(table) == NAMES
    # size in MB from weights_bytes; ratio = baseline weights / variant weights = 538090408 / 173186776
    assert table["baseline"]["size (MB)"] == "538.1" and table["gptq-w4a16"]["size (MB)"] == "173.2"
    assert table["baseline"]["compression (×)"] == "1.00" and table["rtn-w4a16"]["compression (×)"] == "3.11"
    # task scores as percent with one decimal and their stderr; KL with its stderr; recovery with its CI
    assert table["gptq-w4a16"]["hellaswag acc_norm (%)"] == "40.5 ± 2.2"
    assert table["rtn-w4a16"]["arc_easy acc (%)"] == "52.2 ± 2.2"
    assert table["gptq-w4a16"]["KL vs baseline (nats/token)"] == "0.0514 ± 0.0014"
    assert table["gptq-w4a16"]["top-1 agreement (%)"] == "90.5"
    assert table["gptq-w4a16"]["avg recovery (% [95% CI])"] == "98.6 [96.7, 100.4]"
    assert table["gptq-w4a16"]["tok/s (batch 1)"] == "25.2 ⚠ contended" and table["gptq-w4a16"]["TTFT (ms)"] == "79"
    assert table["baseline"]["peak memory (MB)"] == "1232" and table["baseline"]["roofline utilisation (%)"] == "69"
    assert table["gptq-w4a16"]["compress time (s)"] == "100.2" and table["baseline"]["bits"] == "—"
    # the failed variant: dashes for what it never measured, and its error (the pipe in it escaped)
    assert table["awq-w4a16"]["perplexity"] == "—" and table["awq-w4a16"]["size (MB)"] == "—"
    assert table["awq-w4a16"]["status"].startswith("failed: RuntimeError:")
    assert "up_proj \\| down_proj" in table["awq-w4a16"]["status"]


def test_section_tables_in_markdown(results):
    results["variants"][0]["throughput"]["threads"] = 2
    results["variants"] += [gguf_record("gguf-fast", 130.0)]
    md = render_markdown(title(results), sections(results, variant_rows(results)))
    table = md_table(md)
    assert table["baseline"]["decode engine"] == "transformers-eager, 2 threads"
    assert table["gguf-fast"]["decode engine"] == "llama.cpp, 1 thread"
    ratio = "× baseline tok/s [95% interval, interleaved]"
    assert table["gguf-fast"][ratio] == f"{130.0 / 24.6:.2f} [{130.0 / 25:.2f}, {130.0 / 24:.2f}]"
    assert table["gptq-w4a16"][ratio] == "1.02 [0.98, 1.05] no measurable difference ⚠ contended"
    assert table["rtn-w4a16"][ratio] == "0.93 [0.91, 0.95]" and table["baseline"][ratio] == "1 (reference)"
    gguf = md_table(md.split("## GGUF files")[1])
    assert gguf["gguf-fast"]["tensor types stored (count, MB)"] == "Q5_0 × 166 (53.7 MB)"
    speed = md.split("## Decode speed")[1].split("## ")[0]
    assert [l[:2] for l in speed.strip().splitlines()] == ["- ", "- "] and "gguf-fast" in speed


def test_csv_has_raw_numbers(results):
    rows = list(csv.DictReader(io.StringIO(render_csv(variant_rows(results)))))
    assert [r["name"] for r in rows] == NAMES
    gptq = rows[2]
    assert int(gptq["weights_bytes"]) == 173186776
    assert float(gptq["compression_ratio"]) == pytest.approx(538090408 / 173186776)
    assert float(gptq["hellaswag_value"]) == 0.405 and float(gptq["hellaswag_stderr"]) == 0.022
    assert float(gptq["kl_mean"]) == 0.0514 and float(gptq["ttft_s_b1"]) == 0.079
    assert float(gptq["average_score"]) == pytest.approx((0.538 + 0.405 + 0.659) / 3)
    assert float(gptq["recovery_avg_ci95_lo"]) == 96.7 and int(gptq["peak_memory_bytes"]) == 1206910976
    failed = rows[-1]
    assert failed["status"] == "failed" and failed["error"].startswith("RuntimeError") and failed["perplexity"] == ""


def _plot(page: str, title_start: str) -> str:
    return page.split(f'aria-label="{title_start}')[1].split("</svg>")[0]


def test_html_table_and_plots(results):
    page = render_html(title(results), sections(results, variant_rows(results)))
    rows = re.findall(r'<tr class="(ok|failed)" data-name="([^"]+)">', page)
    assert rows == [("ok", "baseline"), ("ok", "rtn-w4a16"), ("ok", "gptq-w4a16"), ("failed", "awq-w4a16")]
    assert 'colspan="22">awq-w4a16 failed: RuntimeError' in page  # the error under the failed row, full width
    assert "<td>98.6<br>[96.7, 100.4]</td>" in page.replace(' class=""', "")  # a CI under its value
    assert page.count("<svg") == 3
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # self-contained: nothing fetched
    # accuracy vs tok/s: baseline (most accurate) and gptq (fastest) are on the front, rtn is beaten by both
    speed = _plot(page, "Accuracy vs decode speed")
    assert re.findall(r'class="front-point" data-name="([^"]+)"', speed) == ["baseline", "gptq-w4a16"]
    assert speed.count('class="pareto-front"') == 1
    bars = _plot(page, "Accuracy recovery vs baseline")
    # rtn and gptq x (3 tasks + average); no baseline, no failed
    assert re.findall(r'class="bar" data-name="([^"]+)"', bars) == ["rtn-w4a16"] * 4 + ["gptq-w4a16"] * 4
    assert "<title>gptq-w4a16, hellaswag: 98.3% [94.4, 102.2]</title>" in bars and 'class="reference"' in bars
    (skipped,) = re.findall(r'<p class="note">Not plotted \(failed, or no recovery figures\): ([^<]*)</p>', page)
    assert skipped == "awq-w4a16."


def test_missing_data_gives_notes_not_empty_plots(results):
    for rec in results["variants"]:
        for key in ("tasks", "recovery", "throughput", "roofline", "perplexity", "kl"):
            rec.pop(key, None)
    del results["bandwidth"], results["evaluation"]
    parts = sections(results, variant_rows(results))
    page = render_html(title(results), parts)
    assert page.count("<svg") == 0 and page.count("nothing to plot") == 3
    md = render_markdown(title(results), parts)
    assert md_table(md)["gptq-w4a16"]["compression (×)"] == "3.11"
    assert [h for h in headings(md) if h.startswith("## ")] == ["## Where the figures come from"]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


def test_html_renders_in_a_headless_browser(tmp_path, results):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI installs it")
    url = write_report(results, tmp_path / "out")["html"].resolve().as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 3
    for plot_title in ("Accuracy vs size on disk", "Accuracy vs decode speed (batch 1)",
                       "Accuracy recovery vs baseline, per task"):
        assert f'aria-label="{plot_title}"' in dom.stdout
    for name in NAMES:
        assert f'<tr class="{"failed" if name == "awq-w4a16" else "ok"}" data-name="{name}">' in dom.stdout
    assert "Where the figures come from" in dom.stdout

    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,2400", url)
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000


def auto_record(name: str, key: str) -> dict:
    units = ["layers.0.qkv_proj", "layers.0.down_proj", "layers.1.qkv_proj", "layers.1.down_proj"]
    return {"name": name, "method": "auto", "scheme": "mixed", "status": "ok", "run": None,
            "auto": {"target": {"effective_bits": 6}, "granularity": "linear", "algorithm": "gptq",
                     "formats": ["W4A16-g64", "W8A16-g64", "unquantized"], "effective_bits": 5.9,
                     "units": [{"unit": u, "format": f, "weights": 100}
                               for u, f in zip(units, ["W4A16-g64", "W8A16-g64", "unquantized", "W4A16-g64"])],
                     "counts": {"W4A16-g64": 2, "W8A16-g64": 1, "unquantized": 1},
                     "predicted": {"score": "kl", "value": 0.2}, "next_point": None, "frontier": [[5.9, 0.2]],
                     "sensitivity": {"key": key, "score": "kl", "windows": 4, "seq_len": 256, "seconds": 9.0,
                                     "units": units, "formats": ["W4A16-g64", "W8A16-g64", "unquantized"],
                                     "costs": [[0.02, 0.0001, 0.0], [0.3, None, 0.0], [0.05, 0.001, 0.0],
                                               [0.01, 0.00001, 0.0]]}}}


def test_auto_heat_maps(results):
    """The format map is coloured by format and the sensitivity table by damage (log scale) in the HTML; the
    Markdown keeps the text; two auto variants of one analysis show it once."""
    results["variants"] += [auto_record("auto-a", "k1"), auto_record("auto-b", "k1")]
    s = sections(results, variant_rows(results))
    page = render_html(title(results), s)
    md = render_markdown(title(results), s)
    sens = page.split('id="auto-sensitivity"')[1].split("</table>")[0]
    assert "<th class=\"\">down_proj W8A16-g64</th>" in sens and sens.count("<tr>") == 3  # 2 layers, one analysis
    assert 'style="background:rgba(225,87,89,1.00)">0.3<' in sens  # the largest damage the darkest
    assert 'style="background:rgba(225,87,89,0.00)">1e-05<' in sens  # the smallest white
    fmt = page.split('id="auto-map"')[1].split("</table>")[0]
    colours = set(re.findall(r'style="background:(#[0-9a-f]{8})">W4A16-g64<', fmt))
    assert len(colours) == 1 and len(set(re.findall(r'style="background:(#[0-9a-f]{8})"', fmt))) == 3
    assert "## Auto-choose: sensitivity per unit" in md and "background" not in md
