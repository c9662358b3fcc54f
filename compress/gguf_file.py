"""What a GGUF file holds, read with gguf-py (llama.cpp's own Python reader; no llama.cpp needed).

A GGUF file is a header of key/value metadata (architecture, shapes, the tokenizer) followed by the tensors, each
stored in its own ggml type. A llama.cpp "file type" such as Q4_K_M is only a request: the quantizer gives some
tensors more bits (the _M mixture keeps half of attn_v/ffn_down at Q6_K), keeps norms in F32, and when a tensor's
row length is not a multiple of the type's block (256 weights for the K-quants) it falls back to a 32-block type
(Q4_K -> Q5_0, Q6_K -> Q8_0). On SmolLM2 (hidden size 576 = 2.25 x 256) that decides most of the file. So the
report never trusts the requested name: `summarize` lists the types the file really holds and their bytes.

The bytes a decode step reads are the tensor bytes (every weight once per token; the embedding table too when it
doubles as the output matrix), not the file size, which also carries the tokenizer (~1.8 MB for SmolLM2).
"""

from __future__ import annotations

from pathlib import Path


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def summarize(path: Path) -> dict:
    """Tensor types, bytes and shapes of one GGUF file.

    Returns {"file_bytes", "tensor_bytes", "params", "bits_per_weight", "types": {type: {"tensors", "params",
    "bytes"}}, "tensor_types": {tensor name: type}, "architecture", "n_layers", "n_heads", "n_kv_heads",
    "head_dim", "n_vocab", "file_type"}. bits_per_weight = 8 x tensor bytes / parameters, over every tensor
    (norms included), which is how llama.cpp prints a model's BPW.
    """
    from gguf import GGUFReader

    path = Path(path)
    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    types: dict[str, dict] = {}
    tensor_types = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        entry = types.setdefault(name, {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["params"] += int(t.n_elements)
        entry["bytes"] += int(t.n_bytes)
        tensor_types[t.name] = name
    tensor_bytes = sum(e["bytes"] for e in types.values())
    params = sum(e["params"] for e in types.values())
    heads = _field(reader, f"{arch}.attention.head_count")
    embd = _field(reader, f"{arch}.embedding_length")
    head_dim = _field(reader, f"{arch}.attention.key_length") or (embd // heads if embd and heads else None)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "file_bytes": path.stat().st_size,
        "tensor_bytes": tensor_bytes,
        "params": params,
        "bits_per_weight": 8 * tensor_bytes / params if params else None,
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
        "tensor_types": tensor_types,
        "architecture": arch,
        "n_layers": _field(reader, f"{arch}.block_count"),
        "n_heads": heads,
        "n_kv_heads": _field(reader, f"{arch}.attention.head_count_kv") or heads,
        "head_dim": head_dim,
        "n_vocab": len(tokens.data) if tokens is not None else _field(reader, f"{arch}.vocab_size"),
        "file_type": _field(reader, "general.file_type"),
    }


def kv_bytes(summary: dict, context_tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of the K and V cache at `context_tokens` for one sequence: llama.cpp keeps it in F16 by default."""
    from compress.planner import kv_cache_bytes

    return int(kv_cache_bytes(summary["n_layers"], summary["n_kv_heads"], summary["head_dim"], context_tokens,
                              dtype_bytes * 8))


def types_text(summary: dict) -> str:
    """'Q5_0 x 150 (62.1 MB), Q8_0 x 1 (30.1 MB), F32 x 61 (0.2 MB)': what the file holds, largest first."""
    return ", ".join(f"{name} × {e['tensors']} ({e['bytes'] / 1e6:.1f} MB)" for name, e in summary["types"].items())


def tokenizer_metadata(path: Path) -> dict:
    """The `tokenizer.*` key/values of a GGUF file: {key: (value, value type, element type or None)}."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    out = {}
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            vtype = field.types[0]
            out[field.name] = (field.contents(), vtype, field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    return out


def replace_tokenizer(path: Path, tokenizer_from: Path) -> None:
    """Rewrite the GGUF file at `path` with every `tokenizer.*` key taken from `tokenizer_from` (in place, via a
    temporary file and a rename; tensors and all other metadata unchanged).

    Why: when the model came as a GGUF file (the embedded SmolLM2), its HF folder was made by transformers, whose
    GGUF tokenizer conversion marks the byte-level BPE vocabulary as byte-fallback and takes the wrong EOS token.
    llama.cpp's converter then writes it as a SentencePiece ("llama") tokenizer with placeholder scores, which
    llama.cpp, Ollama and LM Studio would tokenize text with differently from the model's training. The source
    GGUF's own tokenizer (gpt2/smollm pre-tokenizer, eos <|im_end|>) is the one the model was shipped with.
    """
    import os

    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    path = Path(path)
    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    tmp = path.with_name(f".tmp-{path.name}")
    writer = GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "tokenizer.")) or field.name == "general.architecture":
            continue  # the writer adds the GGUF.* header fields and the architecture itself
        vtype = field.types[0]
        writer.add_key_value(field.name, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for key, (value, vtype, sub_type) in tokenizer_metadata(tokenizer_from).items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    del reader
    os.replace(tmp, path)


def problem(path: Path) -> str | None:
    """Why `path` is not a readable GGUF file (wrong magic, unreadable header, tensor data past the end: a
    truncated download), or None. Reads the header only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if magic != b"GGUF":
        return f"is not a GGUF file (it starts with {magic!r}, expected b'GGUF')"
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on a cut header
        return f"has an unreadable GGUF header ({type(e).__name__}: {str(e)[:200]}); it may be truncated"
    if end > size:
        return f"is truncated: its tensors end at byte {end:,} but the file has {size:,} bytes"
    if not reader.tensors:
        return "holds no tensors"
    return None
