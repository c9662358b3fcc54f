"""write.py: write_report (the end of a pipeline run) and `compress report` (main_report)."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from compress.report import main_report, write_report

FIXTURE_RUN = Path(__file__).resolve().parents[2] / "fixtures" / "run"


def test_writes_three_files_atomically(tmp_path):
    paths = write_report(json.loads((FIXTURE_RUN / "results.json").read_text()), tmp_path / "out")
    assert {k: p.name for k, p in paths.items()} == {"md": "report.md", "csv": "results.csv", "html": "report.html"}
    # the three files, and the ledger that records compress wrote them (compress/ownership.py)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.md", "results.csv", "report.html",
                                                              ".compress-files.json"}


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


def test_main_report_merges_runs(tmp_path):
    for name in ("lab-a", "lab-b"):
        shutil.copytree(FIXTURE_RUN, tmp_path / name)
    out = tmp_path / "merged"
    assert main_report([tmp_path / "lab-a", tmp_path / "lab-b"], out) == 0
    rows = {r["name"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert len(rows) == 8 and rows["lab-b/gptq-w4a16"]["run"] == str(tmp_path / "lab-b")
    assert float(rows["lab-b/gptq-w4a16"]["compression_ratio"]) == pytest.approx(538090408 / 173186776)


def test_a_file_compress_did_not_write_is_never_replaced(tmp_path, capsys):
    (tmp_path / "report.md").write_text("my notes")
    assert main_report([FIXTURE_RUN], tmp_path) == 2
    assert "report.md" in capsys.readouterr().err
    # all three files or none: the report is never half replaced
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"] and (tmp_path / "report.md").read_text() == "my notes"
