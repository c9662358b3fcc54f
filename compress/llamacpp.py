"""llama.cpp, through llama-cpp-python: GGUF export, loading and logits. The only module that imports
llama_cpp (an optional extra, `pip install -e '.[edge]'`, built from source: several minutes on 2 cores).

Why llama.cpp: on a CPU, transformers runs any quantized checkpoint by decompressing it to fp32, so decode reads
fp32 weights whatever the format. llama.cpp's kernels read the quantized blocks directly (a Q4_0 block is 32
weights in 18 bytes) and multiply them with 8-bit-quantized activations, so a 4-bit file moves ~7x fewer bytes per
token than fp32, and decode, which is bound by memory bandwidth, speeds up accordingly.

Export uses llama.cpp's own tools, so the file is what llama.cpp, Ollama and LM Studio expect:
1. `convert_hf_to_gguf.py` (the converter llama.cpp ships; fetched once from the llama-cpp-python sdist of the
   installed version, see `converter_dir`) turns the HF folder into an F16 (or F32/BF16) GGUF file;
2. `llama_model_quantize` (llama.cpp's quantizer, through its C API) turns that into the requested file type,
   optionally weighting each rounding error by an importance matrix (compress/backends/imatrix.py).

`GGUFModel.window_logits` gives llama.cpp's logits for a token window: the GGUF backend's self-check
(compress/backends/gguf.py) and the llama.cpp engine's perplexity and decode benchmark (eval/engines/llamacpp.py)
both read files through here.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger("compress")

INSTALL_HINT = ("install the optional extra: pip install -e '.[edge]' (builds llama-cpp-python from source, "
                "several minutes on 2 cores)")
CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
# file type name -> llama.cpp's enum llama_ftype member; F32/F16/BF16 are written by the converter itself
FTYPE_ENUM = {"F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16", "BF16": "LLAMA_FTYPE_MOSTLY_BF16"}
CONVERTER_OUTTYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


def require():
    """llama_cpp, or an ImportError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"GGUF variants need llama-cpp-python ({e}); {INSTALL_HINT}") from None
    return llama_cpp


def version() -> str | None:
    from compress.environment import installed_version

    return installed_version("llama-cpp-python")


def ftype(gguf_type: str) -> int:
    """llama.cpp's llama_ftype value for a file type name such as 'Q4_K_M'."""
    llama_cpp = require()
    return getattr(llama_cpp, FTYPE_ENUM.get(gguf_type, f"LLAMA_FTYPE_MOSTLY_{gguf_type}"))


# ----------------------------------------------------------------------------------------------- converter


def converter_dir(fetch: bool = True) -> Path | None:
    """The folder holding llama.cpp's convert_hf_to_gguf.py with its `conversion` and `gguf-py` packages.

    Looked for in this order: $COMPRESS_LLAMA_CPP_DIR (a llama.cpp checkout), then the cache (one folder per
    llama-cpp-python version), then fetched into the cache: `pip download --no-binary :all:` of the installed
    llama-cpp-python version, whose sdist vendors the llama.cpp tree it was built from, so converter and quantizer
    always come from the same llama.cpp. Only the converter's files are kept (~2 MB). None when not found and
    `fetch` is False.
    """
    env = os.environ.get("COMPRESS_LLAMA_CPP_DIR")
    if env:
        folder = Path(env).expanduser()
        if not (folder / CONVERTER).is_file():
            raise FileNotFoundError(f"COMPRESS_LLAMA_CPP_DIR={env} has no {CONVERTER}")
        return folder
    from compress.load import cache_dir

    ver = version()
    if ver is None:
        require()
    folder = cache_dir() / f"llama.cpp-converter-{ver}"
    if (folder / CONVERTER).is_file():
        return folder
    if not fetch:
        return None
    if folder.exists():
        raise FileNotFoundError(f"{folder} exists but has no {CONVERTER}, and compress only ever puts a complete "
                                f"converter there; move it away, or set COMPRESS_LLAMA_CPP_DIR to a llama.cpp checkout")
    log.info("fetching llama.cpp's converter from the llama-cpp-python %s sdist with pip (once; cached in %s)",
             ver, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"llama-cpp-python=={ver}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise RuntimeError(f"could not fetch llama.cpp's converter with `{' '.join(cmd[2:])}`: "
                               f"{proc.stderr.strip()[-500:]}; or set COMPRESS_LLAMA_CPP_DIR to a llama.cpp checkout")
        staging = Path(tmp) / "converter"
        _extract_converter(archives[0], staging)
        try:
            os.replace(staging, folder)
        except OSError:  # a concurrent run put its identical copy there first
            if not (folder / CONVERTER).is_file():
                raise
    return folder


def _extract_converter(archive: Path, dest: Path) -> None:
    """Copy vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/, gguf-py/, LICENSE} out of the sdist."""
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            parts = member.name.split("/")
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not member.isfile():
                continue
            rel = "/".join(parts[3:])
            if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in CONVERTER_PARTS):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tf.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if not (dest / CONVERTER).is_file():
        raise RuntimeError(f"{archive.name} has no vendor/llama.cpp/{CONVERTER}")


def convert(hf_folder: Path, out_file: Path, outtype: str = "F16") -> None:
    """llama.cpp's converter: HF folder -> GGUF at `outtype` (F32, F16 or BF16), in its own process."""
    converter = converter_dir() / CONVERTER
    cmd = [sys.executable, str(converter), str(hf_folder), "--outfile", str(out_file),
           "--outtype", CONVERTER_OUTTYPE[outtype]]
    # the converter puts its own gguf-py (the one it was written against) first on sys.path
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        raise RuntimeError(f"llama.cpp's converter failed on {hf_folder}: {proc.stderr.strip()[-3000:]}")


# ----------------------------------------------------------------------------------------------- quantizer


def quantize(src: Path, dst: Path, gguf_type: str, *, imatrix: dict | None = None, threads: int = 0) -> None:
    """llama.cpp's quantizer (llama_model_quantize): `src` (an F16/F32 GGUF) -> `dst` of file type `gguf_type`.

    `imatrix` maps GGUF tensor names to float32 arrays of the tensor's input width (compress/backends/imatrix.py); llama.cpp
    then minimises sum_j imatrix[j] * (w_j - q_j)^2 per block instead of the plain squared error. The quantizer
    chooses each tensor's type (the file type's mixture, and a fallback where a row length does not fit the block
    size); gguf_file.summarize reads back what it chose.
    """
    import numpy as np

    llama_cpp = require()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(gguf_type)
    params.nthread = threads
    keep = []  # the arrays the C side reads must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            if not np.isfinite(arr).all():
                raise ValueError(f"importance matrix for {name} has non-finite values")
            keep += [arr, name.encode()]
            entries[i].name = keep[-1]
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # the list ends at a null name
        params.imatrix = entries
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama_model_quantize({src.name} -> {gguf_type}) failed with code {rc}")


def export(hf_folder: Path, dest_file: Path, gguf_type: str, *, imatrix_fn=None, threads: int = 0,
           tokenizer_from: Path | None = None) -> dict:
    """HF folder -> one GGUF file of `gguf_type`. Returns {"intermediate": "F16" or None, "imatrix_tensors": n}.

    Quantized types go through an F16 file first (llama.cpp's usual path: convert, then quantize), written next
    to `dest_file` and deleted after. `imatrix_fn(f16_path)`, if given, returns the importance matrix; it gets the
    F16 file so it can key the matrix by the file's own tensor names. `tokenizer_from`: a GGUF file whose
    tokenizer replaces the converter's (gguf_file.replace_tokenizer says why)."""
    from compress import gguf_file

    if gguf_type in CONVERTER_OUTTYPE:
        convert(hf_folder, dest_file, gguf_type)
        if tokenizer_from:
            gguf_file.replace_tokenizer(dest_file, tokenizer_from)
        return {"intermediate": None, "imatrix_tensors": 0}
    f16 = dest_file.with_name(dest_file.stem + ".F16.tmp.gguf")
    try:
        convert(hf_folder, f16, "F16")
        if tokenizer_from:
            gguf_file.replace_tokenizer(f16, tokenizer_from)
        imatrix = imatrix_fn(f16) if imatrix_fn else None
        quantize(f16, dest_file, gguf_type, imatrix=imatrix, threads=threads)
    finally:
        f16.unlink(missing_ok=True)
    return {"intermediate": "F16", "imatrix_tensors": len(imatrix or {})}


# ----------------------------------------------------------------------------------------------- inference


def system_info() -> str:
    """llama.cpp's own line of the CPU features it was built for ('AVX2 = 1 | ... | AMX_INT8 = 1 | ...')."""
    return require().llama_print_system_info().decode().strip()


def weight_repacking() -> bool:
    """Whether to let llama.cpp move weights into its "extra" buffer types at load (CPU_REPACK: interleaved blocks
    for the AVX2/AVX512 kernels; AMX: tiles for Intel AMX).

    Off for a build with AMX: ggml's AMX matmul segfaults on the first quantized matmul on this class of machine
    (Sapphire Rapids under a hypervisor; llama.cpp issue #20824, open). Turning extra buffers off keeps the plain
    AVX512/AVX2 kernels, which read the same blocks. A build without AMX (see README) keeps CPU_REPACK on.
    COMPRESS_LLAMA_CPP_REPACK=0/1 overrides the choice."""
    env = os.environ.get("COMPRESS_LLAMA_CPP_REPACK")
    if env in ("0", "1"):
        return env == "1"
    return "AMX_INT8 = 1" not in system_info()


@contextlib.contextmanager
def _model_params(**fields):
    """llama_cpp.Llama builds its llama_model_params from llama_model_default_params() and has no argument for some
    fields (use_extra_bufts): set them on the defaults for the duration of one constructor call."""
    llama_cpp = require()
    import llama_cpp.llama as high_level

    original = high_level.llama_cpp.llama_model_default_params

    def defaults():
        params = original()
        for k, v in fields.items():
            setattr(params, k, v)
        return params

    high_level.llama_cpp.llama_model_default_params = defaults
    try:
        yield llama_cpp
    finally:
        high_level.llama_cpp.llama_model_default_params = original


# llama.cpp's own tools (llama-cli, llama-server, llama-bench) default to `--flash-attn auto`, which is on for the
# CPU backend; llama-cpp-python's `Llama(flash_attn=False)` default turns it off. Rows are measured as llama.cpp
# serves by default. On SmolLM2-135M, Q4_0 decoded faster with the fused attention than without it
# (benchmarks/results/edge_speed_epyc_fa_smollm2_run*.txt, with it, against edge_speed_epyc_series*.txt, before).
FLASH_ATTENTION = True


def load(path: Path, *, n_ctx: int, threads: int | None = None, logits_all: bool = False):
    """A llama_cpp.Llama on one GGUF file, quiet, CPU only, flash attention as FLASH_ATTENTION says. `threads`
    None: every core this process may use."""
    from compress.environment import available_cores

    threads = threads or available_cores()
    with _model_params(use_extra_bufts=weight_repacking()) as llama_cpp:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                               n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, verbose=False,
                               flash_attn=FLASH_ATTENTION)


class GGUFModel:
    """llama.cpp's logits for token windows, in the shape eval/perplexity.py reads: `window_logits(ids)` ->
    torch tensor [len(ids), n_vocab]. Each window starts from an empty KV cache, as a transformers forward does."""

    device = "cpu"

    def __init__(self, path: Path, context: int, threads: int | None = None):
        self.path = Path(path)
        self.llm = load(self.path, n_ctx=context, threads=threads, logits_all=True)

    def window_logits(self, ids: list[int]):
        import torch

        self.llm.reset()
        self.llm.eval(list(ids))
        return torch.from_numpy(self.llm.scores[: len(ids)].copy())

    def close(self) -> None:
        self.llm.close()


def last_logits(llm):
    """The logits of the last position llama.cpp evaluated, as a numpy view (no copy)."""
    import numpy as np

    llama_cpp = require()
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


if __name__ == "__main__":  # `python -m compress.llamacpp fetch-converter`: what CI runs once after installing
    if sys.argv[1:] != ["fetch-converter"]:
        sys.exit("usage: python -m compress.llamacpp fetch-converter")
    print(converter_dir(fetch=True))
