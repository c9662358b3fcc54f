"""The comparison report, built from a fixture run (tests/fixtures/run/results.json): no model, no torch."""

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from compress.recipe import InputError
from compress.report import main_report, merge_runs, pareto_front, write_report

FIXTURE_RUN = Path(__file__).resolve().parent / "fixtures" / "run"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def results() -> dict:
    return json.loads((FIXTURE_RUN / "results.json").read_text())


@pytest.fixture
def report(tmp_path, results) -> dict[str, Path]:
    return write_report(results, tmp_path / "out")


def _md_rows(md: str) -> dict[str, list[str]]:
    """variant name -> its Markdown table cells (split on unescaped pipes)."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| variant"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0]] = cells
    return rows


def _header(md: str) -> list[str]:
    line = next(l for l in md.splitlines() if l.startswith("| variant"))
    return [c.strip() for c in line.split("|")[1:-1]]


def test_writes_three_files_atomically(report, tmp_path):
    assert set(report) == {"md", "csv", "html"}
    # the three files, and the ledger that records compress wrote them (compress/ownership.py)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.md", "results.csv", "report.html",
                                                              ".compress-files.json"}


def test_markdown_table(report):
    md = report["md"].read_text()
    header, rows = _header(md), _md_rows(md)
    assert list(rows) == ["baseline", "rtn-w4a16", "gptq-w4a16", "awq-w4a16"]
    cell = lambda name, col: rows[name][header.index(col)]  # noqa: E731
    # size in MB from weights_bytes; ratio = baseline weights / variant weights = 538090408 / 173186776
    assert cell("baseline", "size (MB)") == "538.1" and cell("gptq-w4a16", "size (MB)") == "173.2"
    assert cell("baseline", "compression (×)") == "1.00" and cell("rtn-w4a16", "compression (×)") == "3.11"
    # task scores as percent with one decimal and their stderr; KL with its stderr; recovery with its CI
    assert cell("gptq-w4a16", "hellaswag acc_norm (%)") == "40.5 ± 2.2"
    assert cell("rtn-w4a16", "arc_easy acc (%)") == "52.2 ± 2.2"
    assert cell("gptq-w4a16", "KL vs baseline (nats/token)") == "0.0514 ± 0.0014"
    assert cell("gptq-w4a16", "top-1 agreement (%)") == "90.5"
    assert cell("gptq-w4a16", "avg recovery (% [95% CI])") == "98.6 [96.7, 100.4]"
    assert cell("gptq-w4a16", "tok/s (batch 1)") == "25.2" and cell("gptq-w4a16", "TTFT (ms)") == "79"
    assert cell("baseline", "peak memory (MB)") == "1232" and cell("baseline", "roofline utilisation (%)") == "69"
    assert cell("gptq-w4a16", "compress time (s)") == "100.2" and cell("baseline", "bits") == "—"
    # the failed variant: dashes for what it never measured, and its error (the pipe in it escaped)
    assert cell("awq-w4a16", "perplexity") == "—" and cell("awq-w4a16", "size (MB)") == "—"
    assert cell("awq-w4a16", "status").startswith("failed: RuntimeError: AWQ smoothing produced non-finite")
    assert "up_proj \\| down_proj" in md


def test_markdown_says_where_every_figure_comes_from(report):
    md = report["md"].read_text()
    prov = md.split("## Where the figures come from", 1)[1]
    for needle in ["device cpu (Intel(R) Xeon(R) Processor)", "dtype float32", "torch 2.13.0+cpu",
                   "transformers 5.17.0", "llmcompressor 0.14.0.1", "lm_eval 0.4.9",
                   "`../shared/data/wikitext2_raw_test_docs.jsonl`: windows of 512 tokens with stride 256",
                   "1,120 windows, 286,720 scored tokens",
                   "hellaswag: acc_norm on `../shared/data/hellaswag_validation.jsonl`, n = 500 samples (limit 500), "
                   "0-shot", "engine transformers-eager on cpu", "median tok/s of 5 repeats",
                   "peak resident set size", "memory bandwidth 19.6 GB/s, measured by numpy copy",
                   "Q4_1-derived fp weights"]:
        assert needle in prov, needle


def test_csv_has_raw_numbers(report):
    rows = list(csv.DictReader(report["csv"].open()))
    assert [r["name"] for r in rows] == ["baseline", "rtn-w4a16", "gptq-w4a16", "awq-w4a16"]
    gptq = {r["name"]: r for r in rows}["gptq-w4a16"]
    assert int(gptq["weights_bytes"]) == 173186776
    assert float(gptq["compression_ratio"]) == pytest.approx(538090408 / 173186776)
    assert float(gptq["hellaswag_value"]) == 0.405 and float(gptq["hellaswag_stderr"]) == 0.022
    assert float(gptq["kl_mean"]) == 0.0514 and float(gptq["ttft_s_b1"]) == 0.079
    assert float(gptq["average_score"]) == pytest.approx((0.538 + 0.405 + 0.659) / 3)
    assert float(gptq["recovery_avg_ci95_lo"]) == 96.7 and int(gptq["peak_memory_bytes"]) == 1206910976
    failed = rows[-1]
    assert failed["status"] == "failed" and failed["error"].startswith("RuntimeError") and failed["perplexity"] == ""


def test_pareto_front():
    points = [("a", 10.0, 0.50), ("b", 20.0, 0.45), ("c", 15.0, 0.40),  # c is beaten by b on both axes
              ("d", 30.0, 0.30), ("e", 30.0, 0.25),  # e ties d on speed but is less accurate
              ("f", 5.0, 0.50)]  # f ties a on accuracy but is slower
    assert pareto_front(points) == ["a", "b", "d"]
    assert pareto_front([("x", 1.0, 1.0), ("y", 1.0, 1.0)]) == ["x", "y"]  # equal points both stay
    assert pareto_front([]) == []


def test_html_plots_and_front(report):
    page = report["html"].read_text()
    assert page.count("<svg") == 3
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # self-contained: nothing fetched
    # accuracy vs tok/s: baseline (most accurate) and gptq (fastest) are on the front, rtn is beaten by both
    speed_plot = page.split('aria-label="Accuracy vs decode speed')[1].split("</svg>")[0]
    assert speed_plot.count('class="front-point"') == 2 and 'class="pareto-front"' in speed_plot
    bars = page.split('aria-label="Accuracy recovery vs baseline')[1].split("</svg>")[0]
    assert bars.count('class="bar"') == 2 * 4  # rtn and gptq x (3 tasks + average); no baseline, no failed
    assert 'class="reference"' in bars
    assert "Not plotted (failed, or no recovery figures): awq-w4a16." in page


def test_missing_data_gives_notes_not_empty_plots(tmp_path, results):
    for rec in results["variants"]:
        for key in ("tasks", "recovery", "throughput", "roofline", "perplexity", "kl"):
            rec.pop(key, None)
    del results["bandwidth"], results["evaluation"]
    paths = write_report(results, tmp_path)
    page = paths["html"].read_text()
    assert page.count("<svg") == 0 and page.count("nothing to plot") == 3
    md = paths["md"].read_text()
    assert _md_rows(md)["gptq-w4a16"][_header(md).index("compression (×)")] == "3.11"
    assert "memory bandwidth: not measured" in md


def test_merge_runs_prefixes_clashing_names(tmp_path):
    for name in ("lab-a", "lab-b"):
        shutil.copytree(FIXTURE_RUN, tmp_path / name)
    data = json.loads((tmp_path / "lab-b" / "results.json").read_text())
    data["variants"].append({**data["variants"][1], "name": "rtn-w8a16", "scheme": "W8A16-g64", "bits": 8})
    data["environment"]["torch"] = "2.12.0+cpu"  # run b was made with another torch; its variants (cached) were not
    (tmp_path / "lab-b" / "results.json").write_text(json.dumps(data))

    merged = merge_runs([tmp_path / "lab-a", tmp_path / "lab-b"])
    names = [r["name"] for r in merged["variants"]]
    assert names[:4] == ["lab-a/baseline", "lab-a/rtn-w4a16", "lab-a/gptq-w4a16", "lab-a/awq-w4a16"]
    assert names[4:] == ["lab-b/baseline", "lab-b/rtn-w4a16", "lab-b/gptq-w4a16", "lab-b/awq-w4a16", "rtn-w8a16"]
    assert [r["run"] for r in merged["variants"]] == [str(tmp_path / "lab-a")] * 4 + [str(tmp_path / "lab-b")] * 5
    assert [r["dir"] for r in merged["runs"]] == [str(tmp_path / "lab-a"), str(tmp_path / "lab-b")]

    out = tmp_path / "merged"
    assert main_report([tmp_path / "lab-a", tmp_path / "lab-b"], out) == 0
    rows = {r["name"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert float(rows["lab-b/gptq-w4a16"]["compression_ratio"]) == pytest.approx(538090408 / 173186776)
    md = (out / "report.md").read_text()
    # what both runs share is said once; what differs is said per run, and per variant where it differs from its run
    assert md.count("NOTE: SmolLM2-135M-Instruct") == 1
    assert f"run `{tmp_path / 'lab-b'}`: library versions: python 3.11.7, compress 0.1.0, torch 2.12.0+cpu" in md
    assert "lab-b/gptq-w4a16 was built with torch 2.13.0+cpu" in md and "lab-a/gptq-w4a16 was built" not in md


def test_merge_runs_missing_results_names_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "empty" / "results.json"))):
        merge_runs([FIXTURE_RUN, tmp_path / "empty"])


def test_main_report_defaults_and_bad_input(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE_RUN, run)
    assert main_report([run], None) == 0
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    assert main_report([run, run], None) == 2
    assert "--out" in capsys.readouterr().err
    assert main_report([tmp_path / "nowhere"], tmp_path / "out") == 2
    assert "results.json: not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


def test_html_renders_in_a_headless_browser(report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI installs it")
    url = report["html"].resolve().as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == 3
    for title in ("Accuracy vs size on disk", "Accuracy vs decode speed (batch 1)",
                  "Accuracy recovery vs baseline, per task"):
        assert title in dom.stdout
    for name in ("baseline", "rtn-w4a16", "gptq-w4a16", "awq-w4a16"):
        assert f'<tr class="{"failed" if name == "awq-w4a16" else "ok"}" data-name="{name}">' in dom.stdout
    assert "Where the figures come from" in dom.stdout

    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,2400", url)
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_calibrated_variant_worse_than_rtn_is_flagged():
    from compress.report import calibration_warnings

    rtn = {"name": "rtn", "method": "rtn", "status": "ok", "bits": 4, "group_size": 64,
           "perplexity": {"value": 40.5}, "kl": {"mean": 0.44}}
    gptq = {"name": "gptq", "method": "gptq", "status": "ok", "bits": 4, "group_size": 64,
            "perplexity": {"value": 41.7}, "kl": {"mean": 0.34},
            "calibration": {"samples": 64, "seq_len": 512, "source": "c4.jsonl"}}
    awq = {**gptq, "name": "awq", "method": "awq", "perplexity": {"value": 34.8}, "kl": {"mean": 0.18}}
    other_group = {**gptq, "name": "g128", "group_size": 128}
    (warning,) = calibration_warnings([rtn, gptq, awq, other_group])
    assert warning.startswith("gptq (gptq) is worse than plain rounding (rtn) on perplexity 41.7 vs 40.5")
    assert "KL" not in warning and "64 x 512 tokens of c4.jsonl" in warning
    assert calibration_warnings([rtn, awq]) == []
    # zero points are a different format: an asymmetric AWQ is judged against asymmetric rounding only
    awq_asym = {**awq, "name": "awq-asym", "symmetric": False, "perplexity": {"value": 45.0}}
    assert calibration_warnings([rtn, awq_asym]) == []
    rtn_asym = {**rtn, "name": "rtn-asym", "symmetric": False}
    (warning,) = calibration_warnings([rtn, rtn_asym, awq_asym])
    assert warning.startswith("awq-asym (awq) is worse than plain rounding (rtn-asym) on perplexity 45 vs 40.5")


def _gguf_record(name: str, tok: float, bits: int = 4) -> dict:
    types = {"Q5_0": {"tensors": 166, "params": 95_000_000, "bytes": 53_700_000},
             "Q8_0": {"tensors": 15, "params": 29_800_000, "bytes": 31_700_000}}
    return {"name": name, "method": "gguf", "scheme": "GGUF Q4_K_M", "bits": bits, "status": "ok",
            "weights_bytes": 103_668_480, "run": None,
            "gguf": {"file": "model-Q4_K_M.gguf", "type_requested": "Q4_K_M", "imatrix": False, "types": types,
                     "bits_per_weight": 6.17, "tensor_bytes": 103_668_480, "file_bytes": 105_453_984},
            "selfcheck": {"engines_kl_mean": 0.015},
            "perplexity": {"value": 33.0, "engine": "llama.cpp", "file": "w.raw", "context": 512, "stride": 512,
                           "windows": 40, "tokens": 20440},
            "throughput": {"engine": "llama.cpp", "threads": 1, "device": "cpu", "batches": {"1": {
                "tok_per_sec": tok, "ttft_s": 0.05}}, "repeats": 5, "prompt_tokens": 128, "new_tokens": 64,
                "memory_kind": "rss", "engine_version": "llama-cpp-python 0.3.36", "weight_repacking": False,
                "flash_attention": True},
            "roofline": {"bytes_per_token": 104_000_000, "weight_bytes": 103_668_480, "bound_tok_per_sec": 240.0,
                         "bandwidth_bytes_per_sec": 25e9, "utilisation": tok / 240.0}}


def test_engine_column_gguf_table_and_speed_note(tmp_path, results):
    results["variants"][0]["throughput"]["threads"] = 2
    results["variants"] += [_gguf_record("gguf-fast", 130.0), _gguf_record("gguf-slow", 90.0),
                            {**_gguf_record("gguf-q8", 150.0), "bits": 8}]
    md = write_report(results, tmp_path)["md"].read_text()
    main_table = md.split("`—` = not measured")[0]
    header, rows = _header(main_table), _md_rows(main_table)
    cell = lambda name, col: rows[name][header.index(col)]  # noqa: E731
    assert cell("baseline", "decode engine") == "transformers-eager, 2 threads"
    assert cell("gguf-fast", "decode engine") == "llama.cpp, 1 thread"
    assert cell("gguf-fast", "× baseline tok/s") == f"{130.0 / 24.6:.2f}" and cell("baseline", "× baseline tok/s") == "1.00"
    assert cell("gguf-fast", "read per token (MB)") == "104.0" and cell("gguf-fast", "roofline utilisation (%)") == "54"
    gguf = md.split("## GGUF files")[1].split("## ")[0]
    assert "| gguf-fast | Q4_K_M | Q5_0 × 166 (53.7 MB), Q8_0 × 15 (31.7 MB) | 6.17 | 103.7 | 105.5 | 0.015 |" in gguf
    speed = md.split("## Decode speed")[1].split("## ")[0]
    # the fastest 4-bit GGUF row is quoted (the faster Q8_0 row is not 4-bit)
    assert f"Fastest 4-bit GGUF row: gguf-fast (GGUF Q4_K_M) decodes at 130.0 tok/s with llama.cpp, 1 thread, " \
           f"{130 / 24.6:.2f}× the baseline's 24.6 tok/s (transformers-eager, 2 threads" in speed
    assert "54% of its memory-bandwidth bound (240 tok/s = 25.0 GB/s / 104.0 MB read per token)" in speed
    assert "≥ 2× the baseline's tok/s — met; ≥ 50% of the bandwidth bound — met." in speed
    assert "perplexity and KL of gguf-fast, gguf-slow, gguf-q8 come from llama.cpp's logits" in md
    assert "engine llama.cpp (llama-cpp-python 0.3.36) on cpu, 1 thread, weight repacking off (AMX build), flash attention on:" in md
