"""runs.py: loading one run's results.json and merging several runs into one table."""

import json
import re
import shutil
from pathlib import Path

import pytest

from compress.recipe import InputError
from compress.report import load_results, merge_runs
from compress.report.runs import _run_labels

FIXTURE_RUN = Path(__file__).resolve().parents[2] / "fixtures" / "run"


def two_runs(tmp_path: Path) -> list[Path]:
    """The fixture run twice; the second has one more variant and was made with another torch."""
    for name in ("lab-a", "lab-b"):
        shutil.copytree(FIXTURE_RUN, tmp_path / name)
    data = json.loads((tmp_path / "lab-b" / "results.json").read_text())
    data["variants"].append({**data["variants"][1], "name": "rtn-w8a16", "scheme": "W8A16-g64", "bits": 8})
    data["environment"]["torch"] = "2.12.0+cpu"  # run b was made with another torch; its variants (cached) were not
    (tmp_path / "lab-b" / "results.json").write_text(json.dumps(data))
    return [tmp_path / "lab-a", tmp_path / "lab-b"]


def test_merge_runs_prefixes_clashing_names(tmp_path):
    a, b = two_runs(tmp_path)
    merged = merge_runs([a, b])
    names = [r["name"] for r in merged["variants"]]
    assert names[:4] == ["lab-a/baseline", "lab-a/rtn-w4a16", "lab-a/gptq-w4a16", "lab-a/awq-w4a16"]
    assert names[4:] == ["lab-b/baseline", "lab-b/rtn-w4a16", "lab-b/gptq-w4a16", "lab-b/awq-w4a16", "rtn-w8a16"]
    assert [r["run"] for r in merged["variants"]] == [str(a)] * 4 + [str(b)] * 5
    assert [(r["dir"], r["label"]) for r in merged["runs"]] == [(str(a), "lab-a"), (str(b), "lab-b")]
    assert merged["runs"][1]["environment"]["torch"] == "2.12.0+cpu" and "variants" not in merged["runs"][1]
    assert merged["recipe"] == merged["runs"][0]["recipe"]  # the top level is the first run's


def test_one_run_keeps_its_names():
    merged = merge_runs([FIXTURE_RUN])
    assert [r["name"] for r in merged["variants"]] == ["baseline", "rtn-w4a16", "gptq-w4a16", "awq-w4a16"]
    assert {r["run"] for r in merged["variants"]} == {str(FIXTURE_RUN)}


def test_run_labels_number_runs_that_share_a_name(tmp_path):
    dirs = [tmp_path / "a" / "out", tmp_path / "b" / "out", tmp_path / "c"]
    assert _run_labels(dirs) == ["out#1", "out#2", "c"]


def test_bad_results_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "empty" / "results.json"))):
        merge_runs([FIXTURE_RUN, tmp_path / "empty"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_results(tmp_path / "broken")
    (tmp_path / "broken" / "results.json").write_text("[]")
    with pytest.raises(InputError, match="`variants` list"):
        load_results(tmp_path / "broken")
    with pytest.raises(InputError):
        merge_runs([])
