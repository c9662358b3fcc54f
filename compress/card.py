"""The model card (README.md) of each checkpoint: what was done, with which data, what was measured, how to serve."""

from __future__ import annotations

from pathlib import Path


def serve_command(folder: Path, saved_dtype: str, kv_fp8: bool = False) -> str:
    cmd = f"vllm serve {folder.resolve()}"
    if saved_dtype == "float32":
        # vLLM's quantized kernels (Marlin, CUTLASS FP8/INT8) run with 16-bit activations; say so explicitly.
        cmd += " --dtype bfloat16"
    if kv_fp8:  # vLLM keeps a 16-bit cache unless told; with this flag it uses the checkpoint's k_scale/v_scale
        cmd += " --kv-cache-dtype fp8"
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
        *_kv_lines(record),
        "",
        "## Measured",
        "",
        "| figure | value |",
        "|---|---|",
        f"| weights on disk | {record['weights_bytes'] / 1e6:.1f} MB |",
        f"| compress time | {record['compress_seconds']:.1f} s |",
        *([f"| peak memory while compressing ({record['compress_peak_memory_kind']}) | "
           f"{record['compress_peak_memory_bytes'] / 1e6:.0f} MB |"] if record.get("compress_peak_memory_bytes")
          else []),
        f"| self-check: max abs logit diff, reloaded vs in-memory ({record['selfcheck_prompts']} prompts) | "
        f"{record['selfcheck_max_abs_diff']:.3g} |",
        *_evaluation_rows(record),
        "",
        "The run's report.md / report.html next to this folder compares every variant side by side.",
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


def _evaluation_rows(record: dict) -> list[str]:
    """Table rows for the figures the evaluation stage measured on this checkpoint (none before it has run)."""
    rows = []
    if p := record.get("perplexity"):
        rows.append(f"| perplexity, `{Path(p['file']).name}` ({p['windows']} windows x {p['context']} tokens, stride "
                    f"{p['stride']}, {p['tokens']:,} tokens) | {p['value']:.3f} |")
    if (kl := record.get("kl")) and record["method"] != "baseline":
        rows.append(f"| KL divergence from the baseline, same tokens (nats/token) | {kl['mean']:.4f} "
                    f"± {kl['stderr']:.4f} |")
        rows.append(f"| top-1 agreement with the baseline | {100 * kl['top1_agreement']:.1f} % |")
    for task, t in (record.get("tasks") or {}).items():
        score = f"{t['value']:.4g}" if t["metric"] == "word_perplexity" else f"{100 * t['value']:.1f} %"
        err = "" if t.get("stderr") is None else (f" ± {100 * t['stderr']:.1f}" if t["metric"] != "word_perplexity"
                                                   else f" ± {t['stderr']:.3g}")
        rows.append(f"| {task} {t['metric']} (lm-eval, {t['num_fewshot']}-shot, n = {t['n']}) | {score}{err} |")
    if avg := (record.get("recovery") or {}).get("average"):
        ci = avg.get("ci95")
        ci_text = f" [{ci[0]:.1f}, {ci[1]:.1f}] (95% CI, paired bootstrap)" if ci else ""
        rows.append(f"| average recovery of the baseline's task scores | {avg['pct']:.1f} %{ci_text} |")
    if th := record.get("throughput"):
        one = th["batches"].get("1")
        if one:
            rows.append(f"| decode, batch 1 ({th['engine']}, {th['device']}, {th['dtype']}) | "
                        f"{one['tok_per_sec']:.1f} tok/s, TTFT {1000 * one['ttft_s']:.0f} ms |")
        rows.append(f"| peak memory ({th['memory_kind']}) | {th['peak_memory_bytes'] / 1e6:.0f} MB |")
    return rows


def _kv_lines(record: dict) -> list[str]:
    """What the KV-cache setting of this variant means for whoever serves it."""
    kv = record.get("kv_cache")
    if not kv:
        return []
    if record.get("kv_in_checkpoint"):
        where = ("per KV head (vLLM reads per-head scales with its FlashAttention-3 backend; other backends need "
                 "per-tensor)" if kv["granularity"] == "head" else "per tensor")
        lines = [f"- KV cache: fp8 e4m3 with static scales {where}, calibrated on the calibration data above and "
                 f"saved as `model.layers.N.self_attn.k_scale` / `v_scale` (`kv_cache_scheme` in config.json); "
                 f"serve with `--kv-cache-dtype fp8`, as the line below does"]
    else:
        lines = [f"- KV cache: `{kv['dtype']}`"
                 + (f", granularity `{kv['granularity']}`" if kv.get("granularity") else "")
                 + (f", group {kv['group_size']}" if kv.get("group_size") else "")
                 + ", applied at evaluation time as each key/value enters the cache. It is not stored in this "
                 "checkpoint: vLLM has no such cache format and serves these weights with a 16-bit cache. Engines "
                 "that do: llama.cpp `--cache-type-k/-v q8_0|q4_0` (per-token blocks of 32), transformers' "
                 "QuantizedCache (KIVI-style)"]
    if mem := record.get("kv_memory"):
        lines.append(f"- KV bytes per token: {mem['bytes_per_token']:,.0f} (16-bit: {mem['bytes_per_token_16bit']:,.0f},"
                     f" {mem['ratio_vs_16bit']:.2f}x smaller)")
    return lines
