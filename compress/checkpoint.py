"""Ready-to-serve checkpoints: written to a temporary folder, checked, then renamed into place.

A checkpoint directory that exists under its final name is complete: weights (compressed-tensors safetensors for
quantized variants), config.json with `quantization_config`, tokenizer, generation config, llm-compressor's
recipe.yaml, the compress recipe for this variant, a model card, and last `manifest.json` with the sha256 and size
of every other file. The rename is atomic on one filesystem, so a run killed at any point leaves either the old
complete checkpoint or none, plus a `.tmp-compress-*` folder that the next run deletes (compress/ownership.py: only
staging whose writer is gone, and never a folder compress did not write).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from compress import ownership

MANIFEST = "manifest.json"


def new_staging_dir(output: Path, name: str) -> Path:
    return ownership.new_staging_dir(output, name)


def remove_stale_staging(output: Path) -> None:
    """Delete what an interrupted run of compress left half written (never another process's staging)."""
    ownership.remove_stale_staging(output)


def save_model(model, tokenizer, staging: Path, quantized: bool) -> None:
    # save_compressed=True packs int4 weights 8 per int32 and stores scales; llm-compressor patches
    # save_pretrained to write the compressed-tensors quantization_config into config.json.
    if quantized:
        model.save_pretrained(staging, save_compressed=True)
    else:
        model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None and not (staging / "generation_config.json").exists():
        model.generation_config.save_pretrained(staging)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary name, then rename: a reader sees the old file or the new one, never half of one."""
    ownership.write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def finalize(staging: Path, dest: Path, cache_key: str, record: dict) -> dict:
    """Write the manifest last, then rename staging -> dest. Sets record["size_bytes"] (all files but the manifest)
    and stores the record in the manifest, so results.json can be rebuilt from the checkpoints alone."""
    files = {p.name: {"size_bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(staging.iterdir()) if p.is_file() and p.name != MANIFEST}
    record["size_bytes"] = sum(f["size_bytes"] for f in files.values())
    manifest = {"cache_key": cache_key, "complete": True, "files": files, "size_bytes": record["size_bytes"],
                "record": record}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    ownership.replace_checkpoint(staging, dest)  # an older compress checkpoint is replaced, nothing else
    return manifest


def refresh_card(folder: Path, text: str) -> int:
    """Replace a complete checkpoint's README.md (e.g. with measured figures) and its manifest entry; returns the
    checkpoint's size in bytes (all files but the manifest).

    Each file is replaced atomically. If the process dies between the two, the manifest no longer matches the card,
    `verify` fails and the next run rebuilds the variant: slow, never wrong.
    """
    card = folder / "README.md"
    manifest = json.loads((folder / MANIFEST).read_text())
    if card.is_file() and card.read_text() == text:
        return manifest["size_bytes"]
    ownership.write_atomic(card, text.encode())
    manifest["files"]["README.md"] = {"size_bytes": card.stat().st_size, "sha256": sha256_file(card)}
    manifest["size_bytes"] = manifest["record"]["size_bytes"] = sum(f["size_bytes"]
                                                                    for f in manifest["files"].values())
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest["size_bytes"]


def weights_size_bytes(folder: Path) -> int:
    """Bytes of the weight files on disk (what a server reads), excluding tokenizer and cards."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def manifest_key(folder: Path) -> str | None:
    """The cache key a checkpoint folder's manifest names (no hashing: the cheap test of "already built")."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("cache_key")
    except (OSError, ValueError, AttributeError):
        return None


def verify(dest: Path, cache_key: str) -> dict | None:
    """The manifest if `dest` is a complete checkpoint for `cache_key` whose files are intact, else None."""
    try:
        manifest = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("cache_key") != cache_key or not manifest.get("complete"):
        return None
    for name, meta in manifest["files"].items():
        p = dest / name
        if not p.is_file() or p.stat().st_size != meta["size_bytes"] or sha256_file(p) != meta["sha256"]:
            return None
    return manifest


def reference_logits(model, tokenizer, prompts: list[str]) -> list:
    """Logits of the in-memory model on each prompt (kept on CPU in fp32 for the comparison)."""
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").to(model.device)
            out.append(model(**ids).logits.float().cpu())
    return out


def selfcheck(folder: Path, prompts: list[str], reference: list, device: str, dtype, load=None) -> float:
    """Reload the checkpoint from disk with plain transformers; max |logit difference| against `reference`.

    This is the check a user's `from_pretrained` would do: if compression, packing or the config were wrong, the
    reloaded model would disagree with the model we evaluated in memory. `load(folder)` replaces the plain
    from_pretrained, e.g. to reload an offloaded model within the same memory budget.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if load is not None:
        model = load(folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    got = reference_logits(model, tokenizer, prompts)
    del model
    return max(float((a - b).abs().max()) for a, b in zip(got, reference, strict=True))


def kl_per_token(ref_logp, other_logp):
    """KL(P_ref || P_other) at each position, from log-probabilities [positions, vocab]: the divergence every KL
    figure of compress is (perplexity's KL to the baseline, the GGUF self-check's engine agreement)."""
    return (ref_logp.exp() * (ref_logp - other_logp)).sum(-1)


def divergence(reference: list, other: list) -> dict:
    """Mean KL(P_reference || P_other) over every position of every prompt, top-1 agreement, max |logit diff|."""
    import torch

    ref = torch.cat(reference).double().log_softmax(-1)
    oth = torch.cat(other).double().log_softmax(-1)
    kl = kl_per_token(ref, oth)
    return {"kl_mean": float(kl.mean()), "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).double().mean()),
            "max_abs_diff": float((torch.cat(reference) - torch.cat(other)).abs().max()), "positions": len(kl)}
