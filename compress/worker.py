"""One step in a fresh Python process: JSON arguments in, JSON result out (the last line of its stdout).

Three things run this way, each for its own reason:
- a decode benchmark (eval/engines/*): a process's peak RSS never goes down, so in-process every later variant
  would inherit the largest earlier one; one process per checkpoint makes the peak that checkpoint's own;
- a distilled student (`python -m distill`): distill/ depends on compress/, never the other way round, so the run
  asks for a student the way it asks llama.cpp's converter for a GGUF file, through a command;
- anything else that must not share the run's memory.

The child dies with its parent (PR_SET_PDEATHSIG), so a killed run leaves no orphan computing on; a rerun resumes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this (child) process when its parent exits; a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_worker(module: str, args: dict, what: str, *, show_log: bool = False) -> dict:
    """`python -m module 'JSON args'` in a fresh process; returns the JSON of its last stdout line. `show_log`
    passes the child's stderr (its progress log) through to ours instead of keeping it for the error message."""
    cmd = [sys.executable, "-m", module, json.dumps(args)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if show_log else subprocess.PIPE, text=True,
                          preexec_fn=_die_with_parent)
    if proc.returncode != 0:
        detail = "see its log above" if show_log else proc.stderr.strip()[-2000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {detail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve(fn) -> None:
    """The child's side of `run_worker`: CPU threads as the run sets them, the run's log format on stderr,
    `fn(**json args)`, its JSON last on stdout."""
    import logging

    from compress.environment import configure_cpu

    logging.basicConfig(level=logging.INFO, format="%(asctime)s compress %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    configure_cpu()
    print(json.dumps(fn(**json.loads(sys.argv[1]))))
