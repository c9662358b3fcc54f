"""Cache and resume: a second run is a no-op, a killed run continues, a changed variant is rebuilt, and a
checkpoint that does not reload identically fails loudly and is never put in place."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from compress import checkpoint, ownership
from compress import build as build_mod
from compress import run as run_mod
from compress.recipe import load_recipe
from conftest import write_recipe

VARIANTS = [{"name": "baseline", "method": "baseline"},
            {"name": "rtn", "method": "rtn", "bits": 4, "group_size": 32},
            {"name": "gptq", "method": "gptq", "bits": 4, "group_size": 32},
            {"name": "fp8", "method": "fp8"}]


def _results(out: Path) -> dict:
    return {r["name"]: r for r in json.loads((out / "results.json").read_text())["variants"]}


def _run(recipe_path: Path) -> int:
    return run_mod.run(load_recipe(recipe_path), recipe_path)


def test_interrupted_run_resumes_and_second_run_is_noop(tmp_path, tiny_model, calib_file, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_model, calib_file, VARIANTS)
    out = tmp_path / "run"
    real_finalize = checkpoint.finalize
    calls = []

    def killed_on_third(staging, dest, key, record):
        calls.append(dest.name)
        if len(calls) == 3:  # the process dies while the third checkpoint is still in its staging folder
            raise KeyboardInterrupt
        return real_finalize(staging, dest, key, record)

    monkeypatch.setattr(checkpoint, "finalize", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(recipe)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "baseline", "report.html", "report.md", "results.csv", "results.json", "rtn"]
    stopped = json.loads((out / "results.json").read_text())["progress"]
    assert stopped["state"] == "stopped" and stopped["reason"] == "interrupted (Ctrl-C)"
    assert "Partial run: stopped (interrupted (Ctrl-C))" in (out / "report.md").read_text()
    # what a SIGKILL mid-save leaves behind: staging named for a process of this host that no longer runs
    killed = out / f"{ownership.STAGING_PREFIX}{ownership._host_tag()}-999999999-1-gptq-dead"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(checkpoint, "finalize", real_finalize)

    built = []
    real_build = build_mod.build
    monkeypatch.setattr(build_mod, "build", lambda job, v: built.append(v.name) or real_build(job, v))
    assert _run(recipe) == 0
    assert built == ["gptq", "fp8"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    records = _results(out)
    assert [records[n].get("cached", False) for n in ("baseline", "rtn", "gptq", "fp8")] == [True, True, False, False]

    built.clear()
    assert _run(recipe) == 0
    assert built == []  # second run: nothing rebuilt
    assert all(r["status"] == "ok" and r["cached"] for r in _results(out).values())


def test_sigkilled_process_resumes(tmp_path, tiny_model, calib_file):
    """A real kill: SIGKILL the CLI as soon as its first checkpoint is in place, then run it again."""
    recipe = write_recipe(tmp_path, tiny_model, calib_file, VARIANTS)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "compress", "run", str(recipe)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "baseline" / "manifest.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in out.iterdir() if (p / "manifest.json").exists()}
    assert "baseline" in done_before

    assert subprocess.run(cmd, capture_output=True).returncode == 0
    records = _results(out)
    assert [r["status"] for r in records.values()] == ["ok"] * 4
    assert {n for n, r in records.items() if r.get("cached")} == done_before
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_changed_variant_or_corrupted_checkpoint_is_rebuilt(tmp_path, tiny_model, calib_file, monkeypatch):
    recipe = write_recipe(tmp_path, tiny_model, calib_file, VARIANTS[:3])
    assert _run(recipe) == 0
    built = []
    real_build = build_mod.build
    monkeypatch.setattr(build_mod, "build", lambda job, v: built.append(v.name) or real_build(job, v))

    (tmp_path / "run" / "rtn" / "tokenizer.json").write_text("{}")  # corrupt one file: sha256 no longer matches
    recipe = write_recipe(tmp_path, tiny_model, calib_file,
                          [VARIANTS[0], VARIANTS[1], {**VARIANTS[2], "dampening_frac": 0.05}])
    assert _run(recipe) == 0
    assert built == ["rtn", "gptq"]
    assert _results(tmp_path / "run")["baseline"]["cached"] is True


def test_selfcheck_mismatch_fails_variant_loudly(tmp_path, tiny_model, calib_file, monkeypatch):
    real_save = checkpoint.save_model

    def save_then_corrupt(model, tokenizer, staging, quantized):
        real_save(model, tokenizer, staging, quantized)
        tensors = load_file(staging / "model.safetensors")
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5  # silently wrong weights on disk
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(checkpoint, "save_model", save_then_corrupt)
    recipe = write_recipe(tmp_path, tiny_model, calib_file, VARIANTS[:2])
    assert _run(recipe) == 1
    records = _results(tmp_path / "run")
    assert records["rtn"]["status"] == "failed" and "disagrees" in records["rtn"]["error"]
    assert not (tmp_path / "run" / "rtn").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp")]


def test_manifest_lists_every_file_with_sha256(tmp_path, tiny_model, calib_file):
    recipe = write_recipe(tmp_path, tiny_model, calib_file, VARIANTS[:2])
    assert _run(recipe) == 0
    folder = tmp_path / "run" / "rtn"
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert manifest["size_bytes"] == sum((folder / f).stat().st_size for f in on_disk)
    assert checkpoint.verify(folder, manifest["cache_key"]) is not None
    assert checkpoint.verify(folder, "another-key") is None


def test_calibration_windows_are_packed_exactly(tiny_model, calib_file):
    from transformers import AutoTokenizer

    from compress.calibration import load_texts, pack_token_windows
    from compress.recipe import Calibration

    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = load_texts(Calibration(source=str(calib_file)))
    windows = pack_token_windows(texts, tok, samples=3, seq_len=16, seed=0)
    assert [len(w) for w in windows] == [16, 16, 16]
    assert windows == pack_token_windows(texts, tok, samples=3, seq_len=16, seed=0)
    assert windows != pack_token_windows(texts, tok, samples=3, seq_len=16, seed=1)
    with pytest.raises(Exception, match="fewer than samples x seq_len"):
        pack_token_windows(texts, tok, samples=10_000, seq_len=64, seed=0)
