"""The model card (README.md) of each checkpoint: what was done, with which data, what was measured, how to serve."""

from __future__ import annotations

from pathlib import Path

from compress.options import REFERENCE


def serve_command(folder: Path, saved_dtype: str, kv_fp8: bool = False, bitsandbytes: bool = False) -> str:
    cmd = f"vllm serve {folder.resolve()}"
    if bitsandbytes:  # vLLM infers it from quantization_config too; explicit is what its docs show for the server
        cmd += " --quantization bitsandbytes"
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
                f"`{cal['source']}` (field `{cal['text_field']}`, shuffled with seed {cal['seed']})"
                + (f", llm-compressor's `{cal['pipeline']}` pipeline" if cal.get("pipeline") else ""))
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
        *_method_lines(record),
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
        *_selfcheck_rows(record),
        *_evaluation_rows(record),
        "",
        "The run's report.md / report.html next to this folder compares every variant side by side.",
        "",
        *(_gguf_serve_lines(record, folder) if record.get("gguf") else _serve_lines(record)),
    ]
    return "\n".join(lines)


def _method_lines(record: dict) -> list[str]:
    """How the weights were made, by which library."""
    env = record["environment"]
    if g := record.get("gguf"):
        imatrix = (f", weighted by an importance matrix of {g['imatrix_tensors']} tensors (mean squared input "
                   f"activation per column, observed on the calibration data below)" if g["imatrix"] else
                   ", no importance matrix")
        via = (f"{g['converter']} to {g['intermediate']}, then {g['quantizer']} to {g['type_requested']}{imatrix}"
               if g["intermediate"] else f"{g['converter']} straight to {g['type_requested']}")
        return [f"- method: `gguf`, file type `{g['type_requested']}`: {via}",
                f"- tensor types actually stored: {_types_text(g['types'])}; {g['bits_per_weight']:.2f} bits per "
                f"weight over {g['params']:,} parameters. llama.cpp picks each tensor's type: a K-quant needs rows "
                f"that are a multiple of 256 weights, and tensors whose rows are not fall back to a 32-block type",
                f"- file: `{g['file']}`, {g['file_bytes'] / 1e6:.1f} MB ({g['tensor_bytes'] / 1e6:.1f} MB of tensors; "
                f"the rest is metadata and the tokenizer{', ' + g['tokenizer'] if g.get('tokenizer') else ''})"]
    if b := record.get("bnb"):
        extra = (f"blocks of {b['block_size']}, double quantization {'on' if b['double_quant'] else 'off'}, "
                 f"compute dtype {b['compute_dtype']}" if "block_size" in b
                 else f"int8 rows, activation outliers above {b['outlier_threshold']:g} computed in 16 bits")
        return [f"- method: `{record['method']}`, {b['format']} via bitsandbytes {b['bitsandbytes']} ({extra}), "
                f"quantized as transformers {env['transformers']} loaded the full-precision weights",
                f"- layers kept unquantized: {', '.join(b['skip_modules']) or 'none'}"]
    lines = [f"- method: `{record['method']}`, scheme `{record['scheme']}`, via llm-compressor "
             f"{env['llmcompressor']} (compressed-tensors {env['compressed_tensors']})",
             f"- ignored layers (kept in {record['saved_dtype']}): {', '.join(record['ignore']) or 'none'}"]
    if f := record.get("format"):  # from compress/backends/llmcompressor.py's tables
        rotation = f", after a {f['rotate']} Hadamard rotation" if f.get("rotate") else ""
        lines[1:1] = [f"- {f['method']}{rotation}",
                      f"- format: compressed-tensors preset `{f['preset']}`; weights {f['weights']}, activations "
                      f"{f['activations']}; {f['bits_per_weight']:g} bits per weight including scales",
                      f"- served by (reference, read from vLLM 0.32's source, not measured here): {f['vllm_reference']}"]
    if a := record.get("auto"):  # compress/backends/auto.py
        lines[1:1] = _auto_lines(a)
    return lines


def _auto_lines(a: dict) -> list[str]:
    """Method auto: the target, what was chosen, what was predicted, and the format of every unit."""
    (kind, value), = a["target"].items()
    s = a["sensitivity"]
    counts = ", ".join(f"{f}: {n} units" for f, n in a["counts"].items())
    lines = [f"- target {kind} {value:g}: chosen from {', '.join(a['formats'])} per {a['granularity']} unit, "
             f"{a['effective_bits']:.3f} bits per weight ({counts}), "
             f"calibrated by {a['algorithm']}",
             f"- predicted {a['predicted']['score']} damage {a['predicted']['value']:.4g} (summed one-unit "
             f"{s['score']} on {s['windows']} x {s['seq_len']} calibration tokens; the evaluation below measures it)",
             *(f"- {f} served by (reference, read from vLLM 0.32's source, not measured here): {ref}"
               for f, ref in (a.get("vllm_reference") or {}).items()),
             "- format per unit:", "", "| unit | format | weights |", "|---|---|---|"]
    lines += [f"| {u['unit']} | {u['format']} | {u['weights']:,} |" for u in a["units"]]
    return lines + [""]


def _selfcheck_rows(record: dict) -> list[str]:
    n = record["selfcheck_prompts"]
    if c := record.get("selfcheck"):  # GGUF: two engines reading the same file, and the file vs its source
        return [f"| self-check: llama.cpp vs transformers reading this file, mean KL ({n} prompts, {c['positions']} "
                f"positions) | {c['engines_kl_mean']:.2g} nats, top-1 agreement {100 * c['engines_top1_agreement']:.0f} % |",
                f"| this file (llama.cpp) vs the full-precision weights it was made from, mean KL | "
                f"{c['source_kl_mean']:.3g} nats, top-1 agreement {100 * c['source_top1_agreement']:.0f} % |",
                f"| llama.cpp's tokenizer gives the HF tokenizer's ids on the self-check prompts | "
                f"{'yes' if c.get('tokenizer_agrees') else 'NO: text tokenized by llama.cpp differs'} |"]
    return [f"| self-check: max abs logit diff, reloaded vs in-memory ({n} prompts) | "
            f"{record['selfcheck_max_abs_diff']:.3g} |"]


def _types_text(types: dict) -> str:
    return ", ".join(f"{name} × {e['tensors']} ({e['bytes'] / 1e6:.1f} MB)" for name, e in types.items())


def _serve_lines(record: dict) -> list[str]:
    v = record.get("vllm") or {}
    tested = ([f"Tested: this line served the checkpoint in vLLM {v['engine'].get('vllm')} ({v['engine'].get('build')}"
               f" build, with {' '.join(v.get('harness_flags') or []) or 'no other flag'} and an address added) for "
               "the vLLM figures above.", ""] if v.get("status") == "ok" and v.get("engine") else [])
    groups = (v.get("compute_path") or {}).get("groups") or []
    if any("W4A16" in g["gemm"] for g in groups) and (v.get("env_vars") or {}).get("VLLM_CPU_INT4_W4A8") == "0":
        tested += ["On a CPU, serve it with `VLLM_CPU_INT4_W4A8=0` in the environment, as the figures above were: "
                   "vLLM's CPU build otherwise runs a W4A16 checkpoint as W4A8 (activations quantized to uint8 per "
                   "token) on CPUs with AMX tiles.", ""]
    return [
        "## Serve",
        "",
        "```",
        record["serve"],
        "```",
        "",
        *tested,
        "or load with transformers: `AutoModelForCausalLM.from_pretrained(\"<this folder>\")`.",
        "",
        "Files: `compress-recipe.yaml` is the compress recipe for this variant; `recipe.yaml` (quantized variants) is",
        "llm-compressor's own recipe; `manifest.json` lists the sha256 and size of every file.",
        "",
    ]


def _gguf_serve_lines(record: dict, folder: Path) -> list[str]:
    name = record["gguf"]["file"]
    path = (folder / name).resolve()
    return [
        "## Run",
        "",
        "```",
        f"{record['serve']}                                  # llama.cpp's server",
        f"printf 'FROM {path}\\n' > Modelfile && ollama create {record['name']} -f Modelfile   # Ollama",
        f"lms import {path}                                             # LM Studio",
        "```",
        "",
        f"or in Python: `llama_cpp.Llama(model_path=\"{name}\")`; transformers reads it too, dequantized to full "
        f"precision: `AutoModelForCausalLM.from_pretrained(\"<this folder>\", gguf_file=\"{name}\")`.",
        "",
        "Files: the GGUF file (weights, tokenizer and chat template inside); the HF tokenizer files it was made "
        "with; `compress-recipe.yaml`, this variant's compress recipe; `manifest.json`, the sha256 and size of "
        "every file.",
        "",
    ]


def _evaluation_rows(record: dict) -> list[str]:
    """Table rows for the figures the evaluation stage measured on this checkpoint (none before it has run)."""
    rows = []
    # the dtypes transformers computed the figures in (evaluation.dtype), where the row records them
    measured_in = record.get("measured_dtype") or {}
    ppl_in, tasks_in = (f", in {measured_in[k]}" if measured_in.get(k) else "" for k in ("perplexity", "tasks"))
    if p := record.get("perplexity"):
        rows.append(f"| perplexity, `{Path(p['file']).name}` ({p['windows']} windows x {p['context']} tokens, stride "
                    f"{p['stride']}, {p['tokens']:,} tokens{ppl_in}) | {p['value']:.3f} |")
    if (kl := record.get("kl")) and record["method"] != REFERENCE:
        rows.append(f"| KL divergence from the baseline, same tokens (nats/token) | {kl['mean']:.4f} "
                    f"± {kl['stderr']:.4f} |")
        rows.append(f"| top-1 agreement with the baseline | {100 * kl['top1_agreement']:.1f} % |")
    for task, t in (record.get("tasks") or {}).items():
        score = f"{t['value']:.4g}" if t["metric"] == "word_perplexity" else f"{100 * t['value']:.1f} %"
        err = "" if t.get("stderr") is None else (f" ± {100 * t['stderr']:.1f}" if t["metric"] != "word_perplexity"
                                                   else f" ± {t['stderr']:.3g}")
        rows.append(f"| {task} {t['metric']} (lm-eval, {t['num_fewshot']}-shot, n = {t['n']}{tasks_in}) | "
                    f"{score}{err} |")
    if avg := (record.get("recovery") or {}).get("average"):
        ci = avg.get("ci95")
        ci_text = f" [{ci[0]:.1f}, {ci[1]:.1f}] (95% CI, paired bootstrap)" if ci else ""
        rows.append(f"| average recovery of the baseline's task scores | {avg['pct']:.1f} %{ci_text} |")
    if th := record.get("throughput"):
        one = th["batches"].get("1")
        threads = f", {th['threads']} thread{'s' if th['threads'] != 1 else ''}" if th.get("threads") else ""
        if one:
            busy = (" (⚠ timed while other processes used the CPU)"
                    if (one.get("contention") or {}).get("contended") else "")
            rows.append(f"| decode, batch 1 ({th['engine']}{threads}, {th['device']}, {th['dtype']}) | "
                        f"{one['tok_per_sec']:.1f} tok/s, TTFT {1000 * one['ttft_s']:.0f} ms{busy} |")
        if (sr := record.get("speed_ratio")) and sr.get("ratio") is not None:
            verdict = " (no measurable difference)" if sr["verdict"] == "no measurable difference" else ""
            rows.append(f"| decode speed ÷ the baseline's ({sr['rounds']} interleaved rounds, batch 1) | "
                        f"{sr['ratio']:.2f} [{sr['ratio_lo']:.2f}, {sr['ratio_hi']:.2f}]{verdict} |")
        if rf := record.get("roofline"):
            rows.append(f"| roofline: {rf['bytes_per_token'] / 1e6:.1f} MB read per token, bound "
                        f"{rf['bound_tok_per_sec']:.0f} tok/s | {100 * rf['utilisation']:.0f} % of the bound |")
        rows.append(f"| peak memory ({th['memory_kind']}) | {th['peak_memory_bytes'] / 1e6:.0f} MB |")
    return rows + _vllm_rows(record)


def _vllm_rows(record: dict) -> list[str]:
    """The figures measured with this checkpoint served by vLLM (eval/served.py), with the command that served it."""
    v = record.get("vllm")
    if not v:
        return []
    e = v.get("engine") or {}
    engine = f"vLLM {e.get('vllm', '?')}, {e.get('build', '?')}"
    if v["status"] != "ok":
        what = "served, not measured" if v["status"] == "too slow" else "not served"
        return [f"| served by {engine} | {what}: {v.get('reason') or v['status']} |"]
    rows = [f"| served by {engine}: kernel | {'; '.join(v.get('kernels') or []) or 'unquantized GEMM'} |"]
    if cp := v.get("compute_path"):
        cpu = v.get("cpu") or {}
        switches = ", ".join(f"{k}={x}" for k, x in (v.get("env_vars") or {}).items() if k.startswith("VLLM_CPU_INT"))
        own = "the checkpoint's own scheme" if cp["own_scheme"] else "NOT the checkpoint's scheme"
        gemms = "; ".join(dict.fromkeys(g["gemm"] for g in cp["groups"] if g["quantized"])) or "plain GEMM"
        rows.append(f"| what vLLM computed (its layer attributes) | {cp['label']}: {gemms} ({own}"
                    f"{'; ' + switches if switches else ''}; CPU {cpu.get('model')}: "
                    f"{', '.join(cpu.get('flags') or []) or 'no AMX/AVX512 flags'}) |")
    if a := v.get("agreement"):
        rows.append(f"| vLLM greedy tokens identical to {a.get('reference', 'transformers')} before the first "
                    f"divergence | {', '.join(map(str, a['matched_tokens']))} of {a['tokens_per_prompt']} per prompt"
                    + (f" (noise floor, transformers across dtypes: "
                       f"{', '.join(map(str, v['noise_floor']['matched_tokens']))})" if v.get("noise_floor") else "")
                    + " |")
    if p := v.get("perplexity"):
        beside = (f" (transformers {p.get('transformers_dtype', '')} on the same {p['windows']} windows: "
                  f"{p['transformers_value']:.3f})" if p.get("transformers_value") is not None else "")
        rows.append(f"| perplexity in vLLM, prompt logprobs, {p['windows']} windows x {p['context']} tokens | "
                    f"{p['value']:.3f}{beside} |")
    if d := v.get("decode"):
        rows.append(f"| vLLM decode, batch 1 ({d['dtype']}) | {d['tok_per_sec']:.1f} tok/s, "
                    f"{100 * d['utilisation']:.0f} % of the {d['bound_tok_per_sec']:.0f} tok/s bound |")
    for lv in v.get("sweep") or []:
        rows.append(f"| vLLM, {lv['concurrency']} concurrent requests ({lv['requests']}) | TTFT p50 "
                    f"{1000 * lv['ttft_s_p50']:.0f} ms, TPOT p50 {1000 * lv['tpot_s_p50']:.1f} ms, "
                    f"{lv['output_tok_per_sec']:.1f} output tok/s |")
    for rt, rv in (record.get("vllm_runtime") or {}).items():
        if rv["status"] != "ok":
            rows.append(f"| vLLM runtime path `{rt}` | not measured: {rv.get('reason') or rv['status']} |")
            continue
        switches = ", ".join(f"{k}={x}" for k, x in (rv.get("env_vars") or {}).items() if k.startswith("VLLM_CPU_INT"))
        p, d = rv.get("perplexity") or {}, rv.get("decode") or {}
        rows.append(f"| vLLM runtime path `{rt}` ({switches}): {(rv.get('compute_path') or {}).get('label', '?')} | "
                    + (f"perplexity {p['value']:.3f} (transformers {p.get('transformers_dtype', '')} "
                       f"{_num(p.get('transformers_value'))}), " if p else "")
                    + (f"{d['tok_per_sec']:.1f} tok/s at batch 1" if d else "no decode figure") + " |")
    return rows


def _num(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "—"


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
