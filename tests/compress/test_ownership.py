"""compress replaces or deletes only what it can prove it wrote: one test per path that removes or replaces files."""

import json
import os
import subprocess
import sys
import time

import pytest

from compress import ownership
from compress.ownership import ForeignPathError


def _checkpoint(folder, files=("model.safetensors", "config.json")):
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).write_text(f)
    manifest = {"cache_key": "k", "complete": True, "files": {f: {"size_bytes": 1, "sha256": "x"} for f in files}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_checkpoint_whose_manifest_lists_every_file_is_replaced(tmp_path):
    dest = _checkpoint(tmp_path / "rtn")
    staging = ownership.new_staging_dir(tmp_path, "rtn")
    (staging / "new.txt").write_text("new")
    ownership.replace_checkpoint(staging, dest)
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["rtn"]  # the old one is gone, no staging left


@pytest.mark.parametrize("case", ["user folder", "extra file in a checkpoint", "subfolder listed", "a file"])
def test_anything_else_at_a_checkpoint_path_is_refused_and_kept(tmp_path, case):
    dest = tmp_path / "rtn"
    if case == "user folder":
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
    elif case == "extra file in a checkpoint":
        _checkpoint(dest)
        (dest / "notes.txt").write_text("mine")
    elif case == "subfolder listed":
        _checkpoint(dest, files=("model.safetensors",))
        (dest / "model.safetensors").unlink()
        (dest / "model.safetensors").mkdir()
        (dest / "model.safetensors" / "x").write_text("mine")
    else:
        dest.write_text("mine")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    staging = ownership.new_staging_dir(tmp_path, "rtn")
    with pytest.raises(ForeignPathError, match=str(dest)):
        ownership.replace_checkpoint(staging, dest)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p != staging) == before


def test_loose_files_are_written_only_where_the_ledger_or_their_shape_proves_ownership(tmp_path):
    ownership.write_owned(tmp_path, "results.json", "{}")
    ownership.write_owned(tmp_path, "results.json", '{"a": 1}')  # ours: replaced
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    (tmp_path / "report.md").write_text("my own notes")
    with pytest.raises(ForeignPathError, match="report.md"):
        ownership.write_owned(tmp_path, "report.md", "# Compression report: x")
    assert (tmp_path / "report.md").read_text() == "my own notes"
    # an output written before the ledger existed: recognised by the file's shape
    (tmp_path / "results.csv").write_text("name,run,method,scheme,bits\n")
    ownership.write_owned(tmp_path, "results.csv", "name,run,method,scheme,bits\nx\n")
    assert ownership.check_files(tmp_path, ["results.json", "report.md", "results.csv", "absent.json"]) == [
        ownership.foreign_file_message(tmp_path / "report.md")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(ownership.STAGING_PREFIX)]


def test_ledger_keeps_every_entry_under_concurrent_writers(tmp_path):
    code = ("import sys; from pathlib import Path; from compress import ownership\n"
            "for i in range(40): ownership.write_owned(Path(sys.argv[1]), f'eval/{sys.argv[2]}-{i}.json', '{}')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), tag]) for tag in ("a", "b")]
    assert [p.wait() for p in procs] == [0, 0]
    files = json.loads((tmp_path / ownership.LEDGER).read_text())["files"]
    assert len(files) == 80


def test_stale_staging_is_removed_only_when_its_writer_is_gone(tmp_path):
    mine = ownership.new_staging_dir(tmp_path, "alive")  # this process: still running
    dead = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from compress import "
                           "ownership; print(ownership.new_staging_dir(Path(sys.argv[1]), 'dead'))", str(tmp_path)],
                          capture_output=True, text=True, check=True).stdout.strip()
    other_host = tmp_path / f"{ownership.STAGING_PREFIX}00000000-1-1-x-ab12cd34"
    other_host.mkdir()
    old_scheme = tmp_path / ".tmp-rtn-abc"  # an older version's name, or a user's: not provably ours
    old_scheme.mkdir()
    users = tmp_path / ".tmp-compress-notes"
    users.write_text("mine")
    removed = ownership.remove_stale_staging(tmp_path)
    assert removed == [os.path.basename(dead)]
    assert mine.is_dir() and other_host.is_dir() and old_scheme.is_dir() and users.is_file()


def test_a_long_running_writer_keeps_its_staging_from_a_second_run(tmp_path):
    """A second run starting while the first is still writing never deletes the first one's staging."""
    code = ("import sys, time; from pathlib import Path; from compress import ownership\n"
            "print(ownership.new_staging_dir(Path(sys.argv[1]), 'slow'), flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        staging = proc.stdout.readline().strip()
        assert ownership.remove_stale_staging(tmp_path) == []
        assert os.path.isdir(staging)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.1)
    assert ownership.remove_stale_staging(tmp_path) == [os.path.basename(staging)]


def test_report_out_never_overwrites_a_users_report(tmp_path, capsys):
    from compress.cli import main

    from conftest import ROOT

    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    assert main(["report", str(ROOT / "tests" / "fixtures" / "run"), "--out", str(out)]) == 2
    assert "report.md is in the way" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]  # nothing written, not even the other two
    assert main(["report", str(ROOT / "tests" / "fixtures" / "run"), "--out", str(tmp_path / "new")]) == 0
    assert main(["report", str(ROOT / "tests" / "fixtures" / "run"), "--out", str(tmp_path / "new")]) == 0  # ours now
