"""CPU settings that hold on any machine, and the environment block every result carries.

On a 2-core CPU, thread oversubscription is the main cause of slow compression: PyTorch's intra-op pool, its
inter-op pool, the tokenizer's Rust threads and a BLAS pool can each start one thread per core. A GPTQ job that took
~87 s on a quiet machine took 5-10x longer when another process held the second core. So: intra-op threads = the
cores this process may actually use, one inter-op thread, no tokenizer parallelism, and a warning when the machine
is already busy.
"""

from __future__ import annotations

import logging
import os
import platform

log = logging.getLogger("compress")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def configure_cpu() -> int:
    """Set thread pools before any torch work. Returns the intra-op thread count."""
    cores = available_cores()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(cores))
    import torch

    threads = int(os.environ.get("COMPRESS_THREADS", cores))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process (e.g. tests)
        pass
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load1 > 0.5 * cores:
        log.warning("the machine is busy (1-min load %.1f on %d cores): CPU compression can be several times "
                    "slower; fewer threads (COMPRESS_THREADS=1) can help", load1, cores)
    return threads


def environment(device: str, dtype) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or
                                                                                platform.machine()),
        "dtype": str(dtype).removeprefix("torch."),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "compress": version("compress"),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "llmcompressor": version("llmcompressor"),
        "compressed_tensors": version("compressed-tensors"),
        "lm_eval": version("lm-eval"),
    }
    for key, dist in (("bitsandbytes", "bitsandbytes"), ("llama_cpp_python", "llama-cpp-python"), ("auto_round", "auto-round")):
        try:  # the optional backends (the `edge` extra), by their installed metadata: nothing heavy is imported
            env[key] = version(dist)
        except PackageNotFoundError:
            pass
    if device == "cpu":
        env["device_name"] = _cpu_model() or env["device_name"]
    return env


# the /proc/cpuinfo flags that decide which CPU kernels vLLM and PyTorch take (AMX tiles, bf16 and int8 dot products)
DECIDING_CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "avx512f", "avx512_bf16", "avx512_fp16",
                      "avx512_vnni", "avx_vnni")


def cpu_features() -> dict:
    """The CPU model, its deciding flags (DECIDING_CPU_FLAGS present), and cores vs threads per core: what a figure
    that depends on the CPU's kernels must say it came from."""
    flags, threads_per_core = set(), None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        siblings = cores = None
        for line in open("/proc/cpuinfo"):
            if line.startswith("siblings"):
                siblings = int(line.split(":")[1])
            elif line.startswith("cpu cores"):
                cores = int(line.split(":")[1])
            if siblings and cores:
                threads_per_core = siblings // cores
                break
    except OSError:
        pass
    return {"model": _cpu_model(), "flags": [f for f in DECIDING_CPU_FLAGS if f in flags],
            "logical_cpus": available_cores(), "threads_per_core": threads_per_core}


def _cpu_model() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def proc_status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status ("VmRSS", "VmHWM") in bytes, or None where /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB = KiB
    except OSError:
        pass
    return None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim), between variants: glibc keeps
    freed memory in its arenas, so without it each variant would start from the previous one's high-water mark."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window: the process's RSS high-water mark (Linux: write 5 to /proc/self/clear_refs)
    or the GPU allocator's peak. Without it, a later variant would report the largest peak of any earlier one."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: str) -> tuple[int | None, str]:
    """(peak bytes since reset_peak_memory, what was measured)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return proc_status_bytes("VmHWM"), "rss"


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, from its metadata (nothing is imported), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
