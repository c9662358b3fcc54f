"""Calibration data: read text, pack it into `samples` windows of exactly `seq_len` tokens.

Packing (documents shuffled with a fixed seed, joined with the EOS token, cut into equal windows) means "64 x 512"
is exactly 32,768 observed tokens whatever the document lengths, so compress time and quality are comparable
between runs. Calibration quality depends on the text: GPTQ calibrated on a handful of off-topic documents came out
worse than plain rounding on SmolLM2, so the source is a recipe choice and is recorded in every model card.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from compress.checkpoint import sha256_file
from compress.options import Calibration, InputError


def check_source(cal: Calibration) -> None:
    """Fail early (before loading a model) on a calibration file that does not exist or has the wrong format."""
    path = Path(cal.source).expanduser()
    if _is_hub_name(cal.source, path):
        return
    if not path.is_file():
        raise InputError(f"calibration.source: file not found: {path} (expected a .jsonl, .json or .txt file, "
                         f"or a hub dataset id)")
    if path.suffix not in (".jsonl", ".json", ".txt", ".raw"):
        raise InputError(f"calibration.source: {path}: expected a .jsonl, .json, .txt or .raw (plain text) file")
    if path.suffix in (".jsonl", ".json"):
        first = _read_json_rows(path, limit=1)
        if not first or cal.text_field not in first[0]:
            raise InputError(f"calibration.text_field: {path}: rows have no field {cal.text_field!r} "
                             f"(fields: {sorted(first[0]) if first else 'none, file is empty'})")


def _is_hub_name(source: str, path: Path) -> bool:
    return not path.exists() and source.count("/") == 1 and not source.startswith((".", "/", "~")) \
        and not path.suffix


def _read_json_rows(path: Path, limit: int | None = None) -> list[dict]:
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        return rows[:limit] if limit else rows
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit and len(rows) >= limit:
                    break
    return rows


def load_texts(cal: Calibration) -> list[str]:
    path = Path(cal.source).expanduser()
    if _is_hub_name(cal.source, path):
        try:
            import datasets

            ds = datasets.load_dataset(cal.source, split=cal.split)
        except Exception as e:
            raise InputError(f"calibration.source: cannot load hub dataset {cal.source!r} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return [t for t in ds[cal.text_field] if t and t.strip()]
    if path.suffix in (".txt", ".raw"):
        # Plain text: paragraphs separated by blank lines are the documents.
        return [p for p in path.read_text().split("\n\n") if p.strip()]
    return [r[cal.text_field] for r in _read_json_rows(path) if r.get(cal.text_field, "").strip()]


def pack_token_windows(texts: list[str], tokenizer, samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """Shuffle documents, join them with EOS and cut `samples` windows of `seq_len` tokens."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    need = samples * seq_len
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"] + sep)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise InputError(f"calibration: the source has {len(ids)} tokens, fewer than samples x seq_len = "
                         f"{samples} x {seq_len} = {need}; lower calibration.samples or seq_len")
    return [ids[k * seq_len:(k + 1) * seq_len] for k in range(samples)]


def windows_digest(windows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(windows).encode()).hexdigest()[:16]


def file_digest(cal: Calibration) -> str:
    """Identity of the calibration source for cache keys, without tokenizing it."""
    path = Path(cal.source).expanduser()
    if not path.is_file():
        return f"hub:{cal.source}:{cal.split}"
    return sha256_file(path)[:16]
