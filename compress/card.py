"""The model card (README.md) of each checkpoint: what was done, with which data, what was measured, how to serve."""

from __future__ import annotations

from pathlib import Path


def serve_command(folder: Path, saved_dtype: str) -> str:
    cmd = f"vllm serve {folder.resolve()}"
    if saved_dtype == "float32":
        # vLLM's quantized kernels (Marlin, CUTLASS FP8/INT8) run with 16-bit activations; say so explicitly.
        cmd += " --dtype bfloat16"
    return cmd


def model_card(record: dict, source: dict, folder: Path) -> str:
    cal = record.get("calibration")
    if cal:
        data = (f"{cal['samples']} windows x {cal['seq_len']} tokens = {cal['tokens']:,} tokens packed from "
                f"`{cal['source']}` (field `{cal['text_field']}`, shuffled with seed {cal['seed']})")
    else:
        data = "none (this method needs no calibration data)"
    lines = [
        f"# {record['name']}: {record['scheme']} ({record['method']})",
        "",
        f"Base model: {source['description']}.",
    ]
    if source.get("note"):
        lines += ["", f"**Note:** {source['note']}."]
    lines += [
        "",
        "## What was done",
        "",
        f"- method: `{record['method']}`, scheme `{record['scheme']}`, via llm-compressor "
        f"{record['environment']['llmcompressor']} (compressed-tensors {record['environment']['compressed_tensors']})",
        f"- ignored layers (kept in {record['saved_dtype']}): {', '.join(record['ignore']) or 'none'}",
        f"- calibration data: {data}",
        f"- computed on {record['environment']['device']} ({record['environment']['device_name']}) in "
        f"{record['environment']['dtype']}",
        "",
        "## Measured",
        "",
        "| figure | value |",
        "|---|---|",
        f"| weights on disk | {record['weights_bytes'] / 1e6:.1f} MB |",
        f"| compress time | {record['compress_seconds']:.1f} s |",
        f"| self-check: max abs logit diff, reloaded vs in-memory ({record['selfcheck_prompts']} prompts) | "
        f"{record['selfcheck_max_abs_diff']:.3g} |",
        "",
        "Accuracy, perplexity and throughput are in the run's report (results.json next to this folder).",
        "",
        "## Serve",
        "",
        "```",
        record["serve"],
        "```",
        "",
        "or load with transformers: `AutoModelForCausalLM.from_pretrained(\"<this folder>\")`.",
        "",
        "Files: `compress-recipe.yaml` is the compress recipe for this variant; `recipe.yaml` (quantized variants) is",
        "llm-compressor's own recipe; `manifest.json` lists the sha256 and size of every file.",
        "",
    ]
    return "\n".join(lines)
