"""What compress may replace or delete: only what it can prove it wrote.

Users point `output:` at folders that hold other things (`.`, `~/models`, a shared volume), so a name collision must
never cost them a file. Three kinds of proof, one per kind of thing compress writes:

- **A checkpoint folder** is compress's when its `manifest.json` (written last, with the cache key) lists every file
  in it. A folder with any other entry, or without a manifest, belongs to someone else, even if it has the variant's
  name.
- **A loose file** (results.json, the report files, eval/<variant>.json) is compress's when the output's ledger,
  `.compress-files.json`, records that compress wrote that path (with the sha256 it wrote, for the record). As for a
  file listed in a checkpoint's manifest, a later change to its content (a flipped byte, a hand edit of a generated
  report) does not make it someone else's. Output folders written before the ledger existed are recognised by the
  files' own shape (see `_legacy_signature`).
- **Staging** (half-written checkpoints, temporary files) carries the prefix `.tmp-compress-` and the host, PID and
  process start time of its writer in its name. It is stale, and deleted, only when that process no longer runs
  on this host; a second run into the same output never deletes the staging of a run still in progress.

Anything else in the way is an `InputError` (exit 2) raised before any work, naming the path and how to proceed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
from pathlib import Path

from compress.options import InputError

log = logging.getLogger("compress")

STAGING_PREFIX = ".tmp-compress-"
LEDGER = ".compress-files.json"
MANIFEST = "manifest.json"
HOW_TO_PROCEED = ("compress never replaces or deletes what it did not write: choose another `output:`, rename the "
                  "variant, or move the path away yourself")


class ForeignPathError(InputError):
    """Something compress did not write stands where it would write. Exit code 2."""


# ------------------------------------------------------------------------------------------------ staging names


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the PID it names one
    process, even after the PID is reused. None when the process does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{_host_tag()}-{pid}-{_start_ticks(pid) or 0}"


def staging_name(label: str) -> str:
    """A fresh name for something half-written: prefix, owner (host-pid-start), label, random suffix."""
    return f"{STAGING_PREFIX}{_owner_tag()}-{label}-{secrets.token_hex(4)}"


def new_staging_dir(parent: Path, label: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / staging_name(label)
    path.mkdir(mode=0o755)  # readable by a server's user, like the finished checkpoint
    return path


def _stale(name: str) -> bool:
    """Whether a staging entry's writer is gone. Another host's staging (a shared filesystem) is never stale here:
    this host cannot see that process."""
    parts = name[len(STAGING_PREFIX):].split("-", 3)
    if len(parts) < 4 or not parts[1].isdigit():
        return False  # not a name this version writes: leave it alone
    host, pid, start = parts[0], int(parts[1]), parts[2]
    if host != _host_tag():
        return False
    return _start_ticks(pid) != start


def remove_stale_staging(folder: Path) -> list[str]:
    """Delete the staging that runs of compress on this host left behind when they were killed; returns the names.
    Staging of a run still in progress, of another host, or in an older naming scheme is left in place."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(STAGING_PREFIX) and _stale(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        log.info("removed %d half-written item(s) that a killed run left in %s", len(removed), folder)
    return removed


# ------------------------------------------------------------------------------------------- checkpoint folders


def checkpoint_entries_not_listed(folder: Path) -> list[str] | None:
    """None if `folder` is a compress checkpoint (its manifest lists every entry); else the entries that prove it is
    not (all of them when there is no readable manifest)."""
    entries = sorted(p.name for p in folder.iterdir())
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = set(manifest["files"])
        manifest["cache_key"]
    except (OSError, ValueError, KeyError, TypeError):
        return entries or ["(no manifest.json)"]
    foreign = [n for n in entries if n != MANIFEST and n not in listed and not n.startswith(STAGING_PREFIX)]
    foreign += [n for n in listed if (folder / n).is_dir()]  # a checkpoint holds files only
    return foreign or None


def check_checkpoint_dest(dest: Path) -> None:
    """Raise ForeignPathError if `dest` exists and is not a compress checkpoint."""
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_symlink() or not dest.is_dir():
        raise ForeignPathError(f"{dest} is in the way: a file where compress would write the checkpoint folder "
                               f"{dest.name}/. {HOW_TO_PROCEED}")
    foreign = checkpoint_entries_not_listed(dest)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ForeignPathError(f"{dest}/ is in the way: compress did not write it (it holds {shown}, which no "
                               f"compress manifest lists). {HOW_TO_PROCEED}")


def replace_checkpoint(staging: Path, dest: Path) -> None:
    """Rename the complete `staging` folder to `dest`. An older compress checkpoint at `dest` is replaced (renamed
    aside, then deleted); anything else there stops the replacement with ForeignPathError."""
    check_checkpoint_dest(dest)
    if dest.exists():
        old = dest.parent / staging_name(f"old-{dest.name}")
        os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dest)


# ------------------------------------------------------------------------------------------------- loose files


@contextlib.contextmanager
def _ledger(root: Path):
    """The ledger of `root`, read and written under an exclusive lock, so concurrent runs keep every entry."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)  # the lock is on the folder itself: no lock file to leave behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        files = _read_ledger(root)
        before = dict(files)
        yield files
        if files != before:
            write_atomic(root / LEDGER, (json.dumps({"written_by": "compress", "files": files}, indent=1,
                                                    sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)  # closing releases the lock


def _read_ledger(root: Path) -> dict:
    try:
        data = json.loads((root / LEDGER).read_text())
    except (OSError, ValueError):
        return {}
    return data["files"] if isinstance(data, dict) and isinstance(data.get("files"), dict) else {}


def _legacy_signature(path: Path) -> bool:
    """Files that compress wrote before it kept a ledger, recognised by their shape: a results.json with its four
    top-level keys, an eval/<variant>.json with its evaluation key, the report files with their title or header."""
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if path.parent.name == "eval":
                return isinstance(data, dict) and "eval_key" in data
            return isinstance(data, dict) and {"recipe", "model", "environment", "variants"} <= set(data)
        head = path.read_text(errors="replace")[:4096]
    except (OSError, ValueError):
        return False
    if path.name == "report.md":
        return head.startswith("# Compression report: ")
    if path.name == "report.html":
        return "<title>Compression report: " in head
    if path.name == "results.csv":
        return head.startswith("name,run,method,scheme,")
    return False


def _owned(path: Path, rel: str, files: dict) -> bool:
    if not path.exists() and not path.is_symlink():
        return True
    if path.is_symlink() or not path.is_file():
        return False
    return rel in files or _legacy_signature(path)


def foreign_file_message(path: Path) -> str:
    return (f"{path} is in the way: compress did not write it (its ledger {LEDGER} has no entry for it). "
            f"{HOW_TO_PROCEED}")


def check_files(root: Path, rels: list[str]) -> list[str]:
    """The messages for each of `rels` (paths relative to `root`) that exists and is not provably compress's."""
    if not root.is_dir():
        return []
    files = _read_ledger(root)  # read only: a refused run writes nothing, not even a lock file
    return [foreign_file_message(root / rel) for rel in rels if not _owned(root / rel, rel, files)]


def write_owned(root: Path, rel: str, data: bytes | str) -> Path:
    """Write `root/rel` atomically (temporary name, then rename) if the file there is absent or provably
    compress's, and record its sha256 in the ledger; else raise ForeignPathError and write nothing."""
    path = root / rel
    raw = data.encode() if isinstance(data, str) else data
    with _ledger(root) as files:
        if not _owned(path, rel, files):
            raise ForeignPathError(foreign_file_message(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, raw)
        files[rel] = hashlib.sha256(raw).hexdigest()
    return path


@contextlib.contextmanager
def owned_stream(root: Path, rel: str):
    """`write_owned` for a file too large to hold in memory: yields `write(bytes)`, which appends to a temporary
    file beside `root/rel`; when the block ends without error the file replaces `root/rel` (if absent or provably
    compress's, else ForeignPathError) and the ledger records its sha256. On error nothing is left behind."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(staging_name(path.name))
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            def write(raw: bytes) -> None:
                digest.update(raw)
                f.write(raw)

            yield write
        with _ledger(root) as files:
            if not _owned(path, rel, files):
                raise ForeignPathError(foreign_file_message(path))
            os.replace(tmp, path)
            files[rel] = digest.hexdigest()
    finally:
        tmp.unlink(missing_ok=True)


def remove_owned(root: Path, rel: str) -> bool:
    """Delete `root/rel` if the ledger says compress wrote it (and forget it); returns whether it was deleted."""
    path = root / rel
    with _ledger(root) as files:
        if rel not in files or path.is_symlink() or not path.is_file():
            return False
        path.unlink()
        del files[rel]
    return True


def write_atomic(path: Path, raw: bytes) -> None:
    """A reader sees the old file or the new one, never half of one; a failed write leaves no temporary file."""
    tmp = path.with_name(staging_name(path.name))
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except OSError as e:  # name the file the user knows, not the temporary one
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
