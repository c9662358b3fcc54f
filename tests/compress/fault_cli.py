"""`python tests/compress/fault_cli.py FAULT compress-args...`: the real CLI with one fault injected
(tests/compress/test_faults.py).

Faults:
- `kill:<point>`: the process SIGKILLs itself at that point, as `kill -9` from outside would: no cleanup, no
  finally blocks, no atexit.
- `full:<point>`: the disk of the output folder is filled (a ballast file takes every free byte) just before that
  write, so the write meets a real ENOSPC from the operating system; the ballast is removed after the write failed,
  as when another process frees its space again.

The points wrap compress's own functions, so the fault lands exactly where the table in test_faults.py says.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _kill():
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _fill(folder: Path) -> Path:
    """Take every free byte of the filesystem of `folder` (unbuffered writes, so nothing is left to flush)."""
    ballast = folder / "ballast.bin"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return ballast


def main() -> int:
    fault, args = sys.argv[1], sys.argv[2:]
    kind, point = fault.split(":", 1)
    from compress import build, checkpoint, cli, ownership
    from compress.backends import llmcompressor as quantize
    from eval import perplexity

    calls: dict[str, int] = {}

    def wrap(owner, name: str, when):
        real = getattr(owner, name)

        def wrapper(*a, **kw):
            calls[name] = calls.get(name, 0) + 1
            if not when(calls[name], *a, **kw):
                return real(*a, **kw)
            if kind == "kill":
                _kill()
            ballast = _fill(Path(os.environ["FAULT_DISK"]))
            try:
                return real(*a, **kw)
            finally:
                ballast.unlink()

        setattr(owner, name, wrapper)

    third_variant = "gptq"
    if point == "load":  # the third model load is the third variant's
        wrap(build, "load_model", lambda n, *a, **kw: n == 3)
    elif point == "calibrate":
        wrap(quantize, "compress_model", lambda n, model, v, *a, **kw: v.name == third_variant)
    elif point == "save":
        if kind == "kill":  # after the weights are on disk, before the tokenizer and the manifest
            real_save = checkpoint.save_model

            def save_then_die(model, tok, staging, quantized):
                if third_variant in staging.name:
                    model.save_pretrained(staging, save_compressed=quantized) if quantized else \
                        model.save_pretrained(staging)
                    _kill()
                return real_save(model, tok, staging, quantized)

            checkpoint.save_model = save_then_die
        else:
            wrap(checkpoint, "save_model", lambda n, model, tok, staging, *a, **kw: third_variant in staging.name)
    elif point == "self-check":
        wrap(checkpoint, "selfcheck", lambda n, folder, *a, **kw: third_variant in folder.name)
    elif point == "manifest":
        wrap(checkpoint, "finalize", lambda n, staging, dest, *a, **kw: dest.name == third_variant)
    elif point == "results":
        wrap(ownership, "write_owned", lambda n, root, rel, data: rel == "results.json" and n == 2)
    elif point == "evaluate":  # the second variant measured (the baseline is first)
        wrap(perplexity, "evaluate_tokens", lambda n, *a, **kw: n == 2)
    elif point == "eval-cache":
        wrap(ownership, "write_owned", lambda n, root, rel, data: rel == "eval/rtn.json")
    elif point == "report":  # the run's last report: report.md and results.csv written, report.html not yet (the
        # partial reports written after each measured row say "Partial run")
        wrap(ownership, "write_owned", lambda n, root, rel, data: rel == "report.html" and "Partial run" not in data)
    else:
        raise SystemExit(f"unknown fault point {point!r}")
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
