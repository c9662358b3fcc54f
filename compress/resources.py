"""Disk and memory, checked before a run starts and named in one sentence when they still run out.

Before any weights are loaded, `check_disk` compares what the variants still to build will write (weights at their
target format from the config alone, the tokenizer, the intermediate files of their backend, a student's training
state) with the free space of each filesystem they write to, and `check_memory` compares the run's expected peak
resident memory with what the kernel says is available. Either refuses with `InputError` (exit 2) and the numbers.

The estimates are upper bounds on purpose: a refused run costs the user a minute, a run that fills the disk at
variant 5 of 7 costs them the whole sweep. When space or memory still runs out mid-run (another process wrote to the
disk, the estimate was wrong), `one_line` turns the exception into the sentence the log and the variant's record
get: what ran out, where, how much the variant needed and how much is there.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from compress.ownership import STAGING_PREFIX
from compress.options import InputError, VariantBase

GB = 1e9
MARGIN = 1.10  # on every estimate: safetensors headers, config and card files, allocator slack
RUNTIME_BYTES = 0.5 * GB  # torch, transformers, llm-compressor and lm-eval resident before any model is loaded
# Peak resident memory of a CPU run in units of the model's full-precision weights: building a variant holds the
# loaded model, the copy the self-check reloads and the calibration activations; the evaluation stage holds the
# variant being measured (the baseline's log-probabilities, the KL reference, are read from a file). Measured on
# SmolLM2-135M: the largest per-variant peak of the lab's compress stage (AWQ) was about 3 copies of its fp32 weights
# plus the libraries (benchmarks/results/compress_memory_release.md, after release_session).
PEAK_WEIGHT_COPIES = 3.0


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing ancestor: where a file not yet written would land."""
    p = Path(path).expanduser().resolve()
    while not p.exists():
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would hold it)."""
    return shutil.disk_usage(_existing(path)).free


def available_memory_bytes() -> int | None:
    """MemAvailable + SwapFree from /proc/meminfo (what the kernel can give without killing anything), or None."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree") if k in fields)
    except (OSError, ValueError, KeyError):
        return None


def params(config) -> int:
    """Parameters of a Llama-family model from its config."""
    from compress.planner import parameters

    return parameters(config)


def variant_write_bytes(v: VariantBase, config, dtype_bytes: int, tokenizer_bytes: int) -> int:
    """Upper bound of the bytes `v` writes while it is built: its checkpoint at the target format (the backend's
    `checkpoint_bytes`, which counts what exists beside it at the peak, e.g. llama.cpp's F16 intermediate) plus the
    tokenizer, with a margin."""
    return int(v.checkpoint_bytes(config, dtype_bytes) * MARGIN) + tokenizer_bytes


def student_write_bytes(config, dtype_bytes: int) -> int:
    """A student's folder at its peak: the training state (weights + AdamW's two moments), written to a temporary
    name beside the previous one, plus the finished student. Bounded by the teacher's size."""
    return int(params(config) * dtype_bytes * 7 * MARGIN)


def check_disk(needs: dict[Path, list[tuple[str, int]]], where_else: str = "point `output:` at another "
                                                                          "filesystem") -> None:
    """`needs`: folder -> [(what, bytes)] to be written there. Raise InputError naming each filesystem that lacks
    the space, with the need per item and the free space; `where_else` says where the user could write instead."""
    by_fs: dict[int, tuple[Path, list[tuple[str, int]]]] = {}
    for folder, items in needs.items():
        dev = os.stat(_existing(folder)).st_dev
        by_fs.setdefault(dev, (Path(folder), []))[1].extend(items)
    errors = []
    for folder, items in by_fs.values():
        total, have = sum(b for _, b in items), free_bytes(folder)
        if total > have:
            parts = ", ".join(f"{what} {b / GB:.3g} GB" for what, b in items[:8])
            more = f" and {len(items) - 8} more" if len(items) > 8 else ""
            errors.append(f"{folder}: not enough disk space: this run writes about {total / GB:.3g} GB there "
                          f"({parts}{more}) and the filesystem has {have / GB:.3g} GB free; free some space or "
                          f"{where_else}")
    if errors:
        raise InputError("\n".join(errors))


def expected_peak_memory_bytes(config, dtype_bytes: int, offload_gb: float | None, analysis_bytes: int = 0) -> int:
    """PEAK_WEIGHT_COPIES of the weights held in memory, or the whole model plus a variant's analysis (method auto's
    sensitivity pass, which runs on the model in memory before it is quantized) when that is more, plus the
    libraries."""
    held = offload_gb * GB if offload_gb else params(config) * dtype_bytes
    analysis = params(config) * dtype_bytes + analysis_bytes if analysis_bytes else 0
    return int(max(held * PEAK_WEIGHT_COPIES, analysis) + RUNTIME_BYTES)


def check_memory(config, dtype_bytes: int, dtype_name: str, offload_gb: float | None, analysis_bytes: int = 0) -> int:
    """Raise InputError when the run's expected peak memory exceeds what is available; returns the estimate."""
    need = expected_peak_memory_bytes(config, dtype_bytes, offload_gb, analysis_bytes)
    have = available_memory_bytes()
    if have is not None and need > have:
        weights = params(config) * dtype_bytes
        what = (f"the model plus {analysis_bytes / GB:.3g} GB for method auto's sensitivity pass"
                if need > expected_peak_memory_bytes(config, dtype_bytes, offload_gb) else
                f"{PEAK_WEIGHT_COPIES:g} copies of the weights")
        raise InputError(f"model: not enough memory: the model's weights are {weights / GB:.3g} GB in {dtype_name}, "
                         f"a run holds about {need / GB:.3g} GB at its peak ({what} plus "
                         f"{RUNTIME_BYTES / GB:.3g} GB of libraries) and {have / GB:.3g} GB is "
                         f"available; set model.offload: {{max_cpu_memory_gb: N}}, model.dtype: bfloat16, or use a "
                         f"larger machine")
    return need


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException) -> bool:
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(x)
        if "No space left on device" in text or "StorageFull" in text or "file write failed" in text:
            return True  # safetensors (Rust) and torch.save report ENOSPC in their own words
    return False


def is_out_of_memory(e: BaseException) -> bool:
    for x in _chain(e):
        if isinstance(x, MemoryError) or type(x).__name__ == "OutOfMemoryError":
            return True
        if "can't allocate memory" in str(x) or "out of memory" in str(x).lower():
            return True
    return False


def one_line(e: BaseException, where: Path, need_bytes: int | None = None) -> str:
    """The sentence a user sees for an exception: disk full and out of memory are named with the file or folder,
    the need and what is left; anything else is its type and its message on one line."""
    need = f"; it needs about {need_bytes / GB:.3g} GB" if need_bytes else ""
    if is_disk_full(e):
        path = next((x.filename for x in _chain(e) if isinstance(x, OSError) and x.filename), None)
        if path is None or STAGING_PREFIX in str(path):  # a half-written folder that is gone: name its destination
            path = where
        return (f"disk full writing {path}{need}; {free_bytes(Path(path)) / GB:.3g} GB free there now. Nothing of "
                f"it was marked complete; free space and run the same command again")
    if is_out_of_memory(e):
        have = available_memory_bytes()
        return (f"out of memory while building or measuring {where}; {(have or 0) / GB:.3g} GB available now. "
                f"Nothing of it was marked complete; set model.offload or use a smaller dtype, then run again")
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:2000]


def kl_reference_bytes(ev, config) -> int:
    """An upper bound on the size of the baseline's log-probabilities for KL (eval/perplexity.ReferenceFile):
    scored tokens x vocabulary x 4 bytes; the scored tokens are at most max_windows x context, or the text's
    length at ~3 bytes per token when the windows are not capped."""
    p = ev.perplexity
    if p is None:
        return 0
    if p.max_windows:
        tokens = p.max_windows * p.context
    else:
        tokens = (Path(ev.data_dir).expanduser() / p.file).stat().st_size // 3
    return int(tokens * config.vocab_size * 4)
