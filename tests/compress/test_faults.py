"""Fault injection on the real CLI (a subprocess) with the tiny model: each row is a fault, where it lands, what the
run does, and what the user keeps. Read FAULTS and DISK_FULL as the table; the tests assert every column.

The reference is one clean run of the same recipe. After a fault, running the same command again must give the
same weight hashes and the same figures as the reference, reuse what was finished before the fault, and leave no
staging behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compress import cli, ownership
from conftest import ROOT, perplexity_data, write_recipe

VARIANTS = [{"name": "baseline", "method": "baseline"},
            {"name": "rtn", "method": "rtn", "bits": 4, "group_size": 32},
            {"name": "gptq", "method": "gptq", "bits": 4, "group_size": 32}]

# fault point | stage | what happens | what the user keeps (asserted below: `built` = checkpoints finished before)
FAULTS = [
    ("kill:load", "load (3rd variant)", "kill -9 while loading the model", ["baseline", "rtn"]),
    ("kill:calibrate", "calibrate (gptq)", "kill -9 as GPTQ starts", ["baseline", "rtn"]),
    ("kill:save", "save (gptq)", "kill -9 with the weights half saved in staging", ["baseline", "rtn"]),
    ("kill:self-check", "self-check (gptq)", "kill -9 while reloading from staging", ["baseline", "rtn"]),
    ("kill:manifest", "finalize (gptq)", "kill -9 before the manifest and the rename", ["baseline", "rtn"]),
    ("kill:evaluate", "evaluate (rtn)", "kill -9 while measuring the 2nd variant", ["baseline", "rtn", "gptq"]),
    ("kill:eval-cache", "evaluate (rtn)", "kill -9 before its eval cache is written", ["baseline", "rtn", "gptq"]),
    ("kill:report", "report", "kill -9 between report files", ["baseline", "rtn", "gptq"]),
]
EVALUATED_BEFORE = {"kill:evaluate": ["baseline"], "kill:eval-cache": ["baseline"],
                    "kill:report": ["baseline", "rtn", "gptq"]}


def _recipe(tmp: Path, tiny_model, calib_file, output: Path) -> Path:
    _, evaluation = perplexity_data(tmp)
    return write_recipe(tmp, tiny_model, calib_file, VARIANTS, output=str(output),
                        evaluation={**evaluation, "selfcheck_prompts": ["The quick brown fox", "def add(a, b):"]})


def _fault(fault: str, recipe: Path, disk: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAULT_DISK": str(disk or "")}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "compress" / "fault_cli.py"), fault, "run", str(recipe)],
                          capture_output=True, text=True, env=env, timeout=600)


def _hashes(out: Path) -> dict[str, str]:
    return {p.name: json.loads((p / "manifest.json").read_text())["files"]["model.safetensors"]["sha256"]
            for p in out.iterdir() if (p / "manifest.json").is_file()}


def _figures(out: Path) -> dict[str, tuple]:
    records = json.loads((out / "results.json").read_text())["variants"]
    return {r["name"]: (r["status"], r.get("perplexity", {}).get("value"), r.get("kl", {}).get("mean"))
            for r in records}


def _staging(out: Path) -> list[str]:
    return [str(p) for p in out.rglob(f"{ownership.STAGING_PREFIX}*")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, calib_file):
    tmp = tmp_path_factory.mktemp("reference")
    recipe = _recipe(tmp, tiny_model, calib_file, tmp / "run")
    assert cli.main(["run", str(recipe)]) == 0
    return _hashes(tmp / "run"), _figures(tmp / "run")


@pytest.mark.parametrize("fault,stage,what,built", FAULTS, ids=[f[0] for f in FAULTS])
def test_kill_at_each_stage_then_rerun(tmp_path, tiny_model, calib_file, reference, fault, stage, what, built):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_model, calib_file, out)
    killed = _fault(fault, recipe)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(_hashes(out)) == sorted(built)  # what was finished before the kill is complete on disk
    for name in built:
        assert _hashes(out)[name] == reference[0][name]
    eval_before = {n: (out / "eval" / f"{n}.json").stat().st_mtime_ns for n in EVALUATED_BEFORE.get(fault, [])}

    assert cli.main(["run", str(recipe)]) == 0
    assert _hashes(out) == reference[0]
    assert _figures(out) == reference[1]
    records = {r["name"]: r for r in json.loads((out / "results.json").read_text())["variants"]}
    assert sorted(n for n, r in records.items() if r.get("cached")) == sorted(built)  # finished work reused
    assert {n: (out / "eval" / f"{n}.json").stat().st_mtime_ns for n in eval_before} == eval_before
    assert _staging(out) == []
    assert {"report.md", "report.html", "results.csv"} <= {p.name for p in out.iterdir()}


# write that meets a full disk | what the run does | what the user keeps
DISK_FULL = [
    ("full:save", "gptq fails (exit 1), one line naming gptq/", "baseline, rtn complete; no gptq/"),
    ("full:manifest", "gptq fails (exit 1), one line", "baseline, rtn complete; no gptq/"),
    ("full:results", "the run stops (exit 1), one line naming results.json",
     "a whole results.json: the previous one, rewritten marked stopped once the space is back"),
    ("full:eval-cache", "evaluation fails (exit 1), one line naming eval/rtn.json", "every checkpoint; baseline eval"),
    ("full:report", "the run stops (exit 1), one line naming report.html", "every checkpoint and measurement"),
]


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs of our own (root only): a real filesystem that really fills."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); CI runs as root and can")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("fault,effect,kept", DISK_FULL, ids=[f[0] for f in DISK_FULL])
def test_disk_full_at_each_write(tmp_path, tiny_model, calib_file, reference, small_disk, fault, effect, kept):
    out = small_disk / "run"
    recipe = _recipe(tmp_path, tiny_model, calib_file, out)
    proc = _fault(fault, recipe, disk=small_disk)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "disk full writing" in line]
    assert errors, proc.stderr[-3000:]
    assert "GB free there now" in errors[0]
    if fault in ("full:save", "full:manifest"):
        assert sorted(_hashes(out)) == ["baseline", "rtn"]
        record = {r["name"]: r for r in json.loads((out / "results.json").read_text())["variants"]}["gptq"]
        assert record["status"] == "failed" and record["error"].startswith("disk full writing")
    elif fault == "full:results":  # the fault frees the space after the failed write: the stop rewrites it whole
        assert sorted(_hashes(out)) == ["baseline", "rtn"]
        results = json.loads((out / "results.json").read_text())
        assert [r["name"] for r in results["variants"]] == ["baseline", "rtn"]
        assert results["progress"]["state"] == "stopped" and "disk full" in results["progress"]["reason"]
    else:
        assert sorted(_hashes(out)) == ["baseline", "gptq", "rtn"]
    assert (out / "eval" / "rtn.json").exists() == (fault in ("full:save", "full:manifest", "full:report"))
    assert _staging(out) == []
    assert not (small_disk / "ballast.bin").exists()
    # with the space back, the same command completes and equals the clean run
    assert cli.main(["run", str(recipe)]) == 0
    assert _hashes(out) == reference[0] and _figures(out) == reference[1]


def test_a_run_that_cannot_fit_is_refused_before_any_work(tmp_path, tiny_model, calib_file, small_disk, capfd):
    """Up front: the estimate of what the variants write is compared with the free space; exit 2, nothing
    written."""
    ballast = small_disk / "ballast.bin"
    free = shutil.disk_usage(small_disk).free
    with open(ballast, "wb") as f:
        f.write(b"\0" * (free - 200_000))  # ~200 kB left: less than one fp32 checkpoint of the tiny model
    out = small_disk / "run"
    recipe = _recipe(tmp_path, tiny_model, calib_file, out)
    assert cli.main(["run", str(recipe)]) == 2
    err = capfd.readouterr().err
    assert "not enough disk space" in err and "GB free" in err and "baseline" in err
    assert not out.exists()


def test_output_holding_foreign_files_is_refused_and_kept(tmp_path, tiny_model, calib_file, capfd):
    out = tmp_path / "run"
    (out / "rtn").mkdir(parents=True)
    (out / "rtn" / "notes.txt").write_text("mine")
    (out / "report.md").write_text("my report")
    recipe = _recipe(tmp_path, tiny_model, calib_file, out)
    assert cli.main(["run", str(recipe)]) == 2
    err = capfd.readouterr().err
    assert f"{out / 'rtn'}/ is in the way" in err and f"{out / 'report.md'} is in the way" in err
    assert "choose another `output:`" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["report.md", "rtn", "rtn/notes.txt"]
    assert (out / "rtn" / "notes.txt").read_text() == "mine" and (out / "report.md").read_text() == "my report"


def test_two_concurrent_runs_into_one_output(tmp_path, tiny_model, calib_file, reference):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_model, calib_file, out)
    cmd = [sys.executable, "-m", "compress", "run", str(recipe)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    # on a failure, each run's error lines (the tail alone cut the cause off once, under load) and its last lines
    assert [p.returncode for p in procs] == [0, 0], [
        [ln for ln in e.splitlines() if " ERROR " in ln or "FAILED" in ln or "Error" in ln][-8:] + [e[-800:]]
        for _, e in results]
    assert _hashes(out) == reference[0] and _figures(out) == reference[1]
    assert _staging(out) == []


def test_corrupted_checkpoint_and_eval_cache_are_rebuilt(tmp_path, tiny_model, calib_file, reference):
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_model, calib_file, out)
    assert cli.main(["run", str(recipe)]) == 0
    weights = out / "rtn" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in a finished checkpoint
    weights.write_bytes(bytes(raw))
    (out / "eval" / "gptq.json").write_text('{"eval_key": "trunc')  # a cut eval cache file
    assert cli.main(["run", str(recipe)]) == 0
    records = {r["name"]: r for r in json.loads((out / "results.json").read_text())["variants"]}
    assert [records[n].get("cached", False) for n in ("baseline", "rtn", "gptq")] == [True, False, True]
    assert _hashes(out) == reference[0] and _figures(out) == reference[1]
