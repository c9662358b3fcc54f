"""The section tables and notes that follow the main table: KV cache, GGUF files, distillation, checks, speed.

Each table is a Table (headers, rows of cell text, caption) or None when the run has nothing for it, so a report
of a plain quantization run has no empty KV, GGUF or distillation sections. The cells are final text; the
renderers (render.py) only escape them for Markdown or HTML.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from compress.backends.auto import UNQUANTIZED
from compress.backends.unchanged import REFERENCE
from compress.record import STAGES
from compress.report.rows import CONTENDED, DASH, MB, _fmt, _get, _pm, baselines, engine_text

# What the edge recipes aim for on a CPU: a 4-bit GGUF file that decodes at least this much faster than the
# baseline, and at this share of the memory-bandwidth bound (what decode speed can reach at all).
EDGE_SPEEDUP = 2
EDGE_UTILISATION = 0.5


class Table(NamedTuple):
    """A section table: headers, rows of cell text (the first cell names the variant), and the caption under it.

    `shade` makes the HTML table a heat map (the Markdown stays text): "category" colours each cell by its text (one
    colour per distinct value), "scale" by its number on a log scale (darker = larger). The first column and the
    dashes stay plain."""
    headers: list[str]
    rows: list[list[str]]
    caption: str
    shade: str = ""


def _ok(variants: list[dict]) -> list[dict]:
    return [r for r in variants if r.get("status", "ok") == "ok"]


def _quality(r: dict) -> list[str]:
    """KL (± stderr) and perplexity cells, as in the main table."""
    return [_pm(_get(r, "kl", "mean"), _get(r, "kl", "stderr"), ".4f"), _fmt(_get(r, "perplexity", "value"), ".2f")]


def calibration_warnings(variants: list[dict]) -> list[str]:
    """Flag every calibrated variant that came out worse than a variant of the same scheme (the same label: format,
    group size, zero points, rotation, KV cache) built without calibration text, when the run has one.

    GPTQ/AWQ spend minutes on calibration to beat plain rounding; when they do not, the usual cause is the
    calibration text (off-domain for what is evaluated, or too few tokens), which the model card names. Compared on
    perplexity and KL to the baseline, the two figures measured on identical tokens for every variant.
    """
    def fmt(r: dict) -> tuple:
        return r.get("scheme"), r.get("run")

    ok = [r for r in variants if r.get("status") == "ok"]
    out = []
    for v in ok:
        if not v.get("calibration"):
            continue
        for rtn in [r for r in ok if not r.get("calibration") and r.get("method") != REFERENCE and fmt(r) == fmt(v)]:
            worse = [f"{label} {_get(v, *key):.4g} vs {_get(rtn, *key):.4g}"
                     for label, key in (("perplexity", ("perplexity", "value")), ("KL", ("kl", "mean")))
                     if _get(v, *key) is not None and _get(rtn, *key) is not None and _get(v, *key) > _get(rtn, *key)]
            if worse:
                cal = v.get("calibration") or {}
                data = (f"{cal.get('samples')} x {cal.get('seq_len')} tokens of {cal.get('source')}" if cal
                        else "its calibration data")
                out.append(f"{v['name']} ({v['method']}) is worse than plain rounding ({rtn['name']}) on "
                           f"{' and '.join(worse)}. Likely cause: the calibration text ({data}) is unlike the "
                           f"evaluation text or too short; try in-domain text or more samples.")
    return out


def kv_table(variants: list[dict]) -> Table | None:
    """The KV-cache table, or None when no variant changes the KV cache.

    Per variant: its KV format, bytes per token, the cache at the planner's context x batch, and per planner GPU
    how many sequences of that context fit beside its weights, with the gain over a 16-bit cache in brackets."""
    ok = [r for r in _ok(variants) if r.get("kv_memory")]
    if not any(r.get("kv_cache") for r in ok):
        return None
    gpus = list(ok[0]["kv_memory"]["gpus"])
    headers = ["variant", "KV format", "KV bytes/token", "vs 16-bit (×)", "KV at context × batch (MB)",
               "KL vs baseline", "perplexity"] + [f"{g}: sequences (+ vs 16-bit KV)" for g in gpus]
    rows = []
    for r in ok:
        m = r["kv_memory"]
        rows.append([r["name"], m["format"], f"{m['bytes_per_token']:,.0f}", f"{m['ratio_vs_16bit']:.2f}",
                     f"{m['bytes_at_context_batch'] / MB:,.1f}", *_quality(r)]
                    + [f"{g['max_sequences']:,} (+{g['extra_sequences']:,})" for g in m["gpus"].values()])
    m0 = ok[0]["kv_memory"]
    caption = (f"Context {m0['context']:,} tokens × batch {m0['batch']} (the recipe's evaluation.planner); sequences "
               f"= how many {m0['context']:,}-token sequences fit in memory × (1 − {m0['headroom']:g}) after the "
               f"variant's weights (estimated from the config at serving precision: 16-bit unless quantized), "
               f"with the gain over a 16-bit KV cache. Integer formats count a 16-bit scale and minimum per group. "
               f"fp8 KV uses the checkpoint's calibrated scales as compressed-tensors applies them on load; int8/int4 "
               f"are quantized and dequantized as each key/value enters the cache (eval/kvcache.py), the "
               f"channel (KIVI) format quantizing every key, including the last few that KIVI keeps in 16 bits.")
    return Table(headers, rows, caption)


def gguf_table(variants: list[dict]) -> Table | None:
    """What each GGUF file really holds: the requested llama.cpp type, the tensor types the quantizer chose, bits
    per weight, sizes, and the two engines' agreement on it. None without GGUF rows."""
    rows = []
    for r in _ok(variants):
        g = r.get("gguf")
        if not g:
            continue
        check = r.get("selfcheck") or {}
        types = ", ".join(f"{t} × {e['tensors']} ({e['bytes'] / MB:.1f} MB)" for t, e in g["types"].items())
        rows.append([r["name"], g["type_requested"] + (" + imatrix" if g.get("imatrix") else ""), types,
                     f"{g['bits_per_weight']:.2f}", f"{g['tensor_bytes'] / MB:.1f}", f"{g['file_bytes'] / MB:.1f}",
                     _fmt(check.get("engines_kl_mean"), ".2g")])
    if not rows:
        return None
    headers = ["variant", "requested type", "tensor types stored (count, MB)", "bits/weight", "tensors (MB)",
               "file (MB)", "llama.cpp vs transformers KL (self-check)"]
    caption = ("Read back from each file with gguf-py. llama.cpp's quantizer picks each tensor's type: the _M/_S "
               "mixtures give some tensors more bits, norms stay F32, and a K-quant (Q4_K, Q6_K) needs rows that "
               "are a multiple of 256 weights, so tensors with shorter or odd rows (576-wide on SmolLM2) fall back "
               "to a 32-block type (Q4_K → Q5_0, Q6_K → Q8_0). bits/weight = 8 × tensor bytes / parameters. The "
               "self-check KL is between llama.cpp's and transformers' next-token distributions for the same file "
               "on the self-check prompts.")
    return Table(headers, rows, caption)


def distill_table(variants: list[dict]) -> Table | None:
    """The distillation table: how each student was made and what it scored, or None without students.

    Rows: the teacher (baseline) and every variant built from a student, so the pruned-untrained row, the
    distilled row and the distilled + quantized row sit together."""
    students = [r for r in _ok(variants) if r.get("distill")]
    if not students:
        return None
    teacher = next((r for r in variants if r.get("method") == REFERENCE and r.get("run") == students[0].get("run")),
                   None)
    headers = ["variant", "layers", "dropped layers (chosen by)", "steps", "tokens trained (epochs)", "train time (s)",
               "KD loss first → last", "size (MB)", "perplexity", "KL vs teacher", "tok/s (batch 1)"]

    def common(r: dict) -> list[str]:
        kl, ppl = _quality(r)
        return [_fmt(r.get("weights_bytes"), ".1f", 1 / MB), ppl, kl,
                _fmt(_get(r, "throughput", "batches", "1", "tok_per_sec"), ".1f")]

    rows = []
    if teacher:
        n = students[0]["distill"]["teacher_layers"]
        rows.append([f"{teacher['name']} (teacher)", str(n), DASH, DASH, DASH, DASH, DASH] + common(teacher))
    for r in students:
        d = r["distill"]
        losses = (f"{d['first_loss']:.3f} → {d['final_loss']:.3f}" if d.get("final_loss") is not None else DASH)
        rows.append([r["name"], f"{d['student_layers']} of {d['teacher_layers']}",
                     f"{d['dropped_layers']} ({d['chosen_by']})", str(d["steps"]),
                     f"{d['tokens_trained']:,} ({d['epochs']:g})" if d["steps"] else "0",
                     _fmt(d.get("train_seconds"), ".0f") if d["steps"] else DASH, losses] + common(r))
    d0 = students[0]["distill"]
    caption = (f"Students are the teacher with its lowest block-influence layers removed (BI = 1 − cos(layer input, "
               f"layer output), mean over {d0['importance_windows']} windows of the training text), then trained "
               f"by logit distillation (KL at temperature {d0['settings']['temperature']:g}"
               + (f", + {d0['settings']['ce_weight']:g} × cross-entropy" if d0['settings']['ce_weight'] else "")
               + f") on `{d0['data']}`, never an evaluation file. A student shared by several variants was trained "
               f"once; its train time is that run's. KL is measured against the teacher on the perplexity tokens.")
    return Table(headers, rows, caption)


def speed_summary(variants: list[dict]) -> list[str]:
    """The decode-speed note: the fastest 4-bit GGUF row against its run's baseline (the interleaved ratio with its
    interval, both engines, share of its memory-bandwidth bound), and whether that meets the edge targets. Empty
    without such a row.

    4-bit GGUF on llama.cpp is the edge recipes' answer to "how fast can this model decode on a CPU", so it is the
    row quoted; an 8-bit file may be faster on some CPUs but is not what the targets are about. A target is met
    only when the whole interval clears it, missed only when the whole interval falls short."""
    base_of = baselines(variants)
    best = None
    for r in _ok(variants):
        base = base_of.get(r.get("run"))
        ratio = _get(r, "speed_ratio", "ratio")
        if ratio is None or base is None or r is base:
            continue
        if r.get("gguf") and r.get("bits") == 4 and (best is None or ratio > best[1]):
            best = (r, ratio, base)
    if not best:
        return []
    r, ratio, base = best
    sr = r["speed_ratio"]
    lo, hi = sr["ratio_lo"], sr["ratio_hi"]
    rf = r.get("roofline") or {}
    util = rf.get("utilisation")
    bound = (f"; it reaches {100 * util:.0f}% of its memory-bandwidth bound ({rf['bound_tok_per_sec']:.0f} tok/s = "
             f"{rf['bandwidth_bytes_per_sec'] / 1e9:.1f} GB/s / {rf['bytes_per_token'] / MB:.1f} MB read per token)."
             if util is not None else ".")
    util_met = DASH if util is None else ("met" if util >= EDGE_UTILISATION else "NOT met")
    speed_met = "met" if lo >= EDGE_SPEEDUP else "NOT met" if hi < EDGE_SPEEDUP else "not decided (the interval spans it)"
    flag = (f" {CONTENDED} (other processes used the cores during its timed rounds)"
            if _get(r, "speed_ratio", "contention", "contended") else "")
    return [f"Fastest 4-bit GGUF row: {r['name']} ({r['scheme']}) decodes at {sr['tok_per_sec']:.1f} tok/s with "
            f"{engine_text(r['throughput'])}, {ratio:.2f}× [{lo:.2f}, {hi:.2f}] the baseline's "
            f"{sr['baseline_tok_per_sec']:.1f} tok/s ({engine_text(base['throughput'])}, "
            f"{_get(base, 'throughput', 'dtype') or 'fp32'}) over {sr['rounds']} interleaved rounds, same prompt and "
            f"lengths, batch 1" + flag + bound,
            f"Edge targets: ≥ {EDGE_SPEEDUP}× the baseline's tok/s — {speed_met}; ≥ {100 * EDGE_UTILISATION:.0f}% of "
            f"the bandwidth bound — {util_met}."]


def _vllm_ratio(v: dict) -> str:
    sr = v.get("speed_ratio") or {}
    if sr.get("ratio") is None:
        return DASH
    text = f"{sr['ratio']:.2f} [{sr['ratio_lo']:.2f}, {sr['ratio_hi']:.2f}]"
    if sr.get("verdict") == "no measurable difference":
        text += " no measurable difference"
    return text + (f" {CONTENDED}" if (sr.get("contention") or {}).get("contended") else "")


FLAG = "⚑"  # a served row whose agreement with transformers at the same precision failed a check


def served_rows(r: dict) -> list[tuple[str, dict]]:
    """A variant's vLLM rows: (label, figures) for its own scheme, then each runtime variant ("gptq [w4a8]")."""
    out = [(r["name"], r["vllm"])] if r.get("vllm") else []
    return out + [(f"{r['name']} [{rt}]", v) for rt, v in (r.get("vllm_runtime") or {}).items()]


def _path(v: dict) -> str:
    """What vLLM computed for a row's quantized layers, and whether it is the checkpoint's own scheme."""
    cp = v.get("compute_path")
    if not cp:
        return DASH + " (no probe in this environment)"
    quantized = [g for g in cp["groups"] if g["quantized"]]
    gemms = "; ".join(dict.fromkeys(g["gemm"] for g in (quantized or cp["groups"])))
    own = "" if cp["own_scheme"] else " — NOT the checkpoint's scheme"
    # a mixed checkpoint (method auto) also leaves decoder layers unquantized (numbered: the probe's pattern holds
    # ".*."; the embedding and the head do not): their GEMM is its other kernel
    kept = [g for g in cp["groups"] if not g["quantized"] and ".*." in g["layers"]]
    if quantized and kept:
        def n(gs):
            return sum(g.get("count") or 0 for g in gs)
        kept_gemms = "; ".join(dict.fromkeys(g["gemm"] for g in kept))
        return (f"{cp['label']}: {gemms} ({n(quantized)} layers){own}; unquantized, {cp['dtype']} "
                f"({n(kept)} layers): {kept_gemms}")
    return f"{cp['label']}: {gemms}{own}"


def _agreement(v: dict) -> str:
    a, floor = v.get("agreement") or {}, v.get("noise_floor") or {}
    if not a:
        return DASH
    text = f"{sum(a['matched_tokens'])}/{a['prompts'] * a['tokens_per_prompt']}"
    if floor:
        text += f" (floor {sum(floor['matched_tokens'])})"
    return text


def _served_ppl(v: dict) -> str:
    p = v.get("perplexity") or {}
    if not p:
        return DASH
    text = f"{p['value']:.3f} / {_fmt(p.get('transformers_value'), '.3f')}"
    if p.get("gap") is not None:
        text += f" ({100 * p['gap']:+.2f}%)"
    if p.get("transformers_float32_value") is not None:
        text += f"; fp32 {p['transformers_float32_value']:.3f}"
    return text


def _vllm_reference(record: dict) -> str | None:
    """Where the variant's format runs, read from vLLM's source (the formats table), per chosen format of an auto
    variant (whose formats may differ in where they run: W8A16 has no CPU kernel, W4A16 has)."""
    if ref := (record.get("format") or {}).get("vllm_reference"):
        return ref
    a = record.get("auto") or {}
    return "; ".join(f"{f} ({a['counts'][f]} units): {ref}" for f, ref in (a.get("vllm_reference") or {}).items()) \
        or None


def vllm_table(variants: list[dict]) -> Table | None:
    """Each variant as vLLM served it, and each runtime variant of it as its own row: what vLLM computed (activation
    precision and GEMM of the quantized layers, from vLLM's resolved layer attributes), the kernel it named, greedy
    agreement and perplexity against transformers at the served precision (the noise floor beside), batch-1 decode
    against the bandwidth bound and the server's own inter-token latency, the ratio to the baseline. None when no
    variant went through vLLM."""
    served = [(r, label, v) for r in _ok(variants) for label, v in served_rows(r)]
    if not served:
        return None
    rows = []
    for r, label, v in served:
        if v["status"] != "ok":
            what = ("served, not measured" if v["status"] == "too slow" else
                    "not measured" if v.get("runtime") else f"not served ({v['status']})")
            # where the format does run, from the formats table (a reference read from vLLM's source)
            ref = _vllm_reference(r)
            rows.append([label, f"{what}: {v.get('reason') or DASH}",
                         f"reference, not measured: {ref}" if ref else DASH] + [DASH] * 6)
            continue
        d = v.get("decode") or {}
        decode = (f"{d['tok_per_sec']:.1f} ({100 * d['utilisation']:.0f}% of {d['bound_tok_per_sec']:.0f})"
                  if d else DASH)
        if d.get("server_tok_per_sec"):
            decode += f"; server {d['server_tok_per_sec']:.1f}"
        # the switches that decide the arithmetic (all of them are in results.json and the provenance)
        switches = " ".join(f"{k}={val}" for k, val in (v.get("env_vars") or {}).items()
                            if k.startswith("VLLM_CPU_INT"))
        flag = f" {FLAG} " + "; ".join(v["checks"]) if v.get("checks") else ""
        rows.append([label + flag, _path(v), "; ".join(v.get("kernels") or []) or "unquantized GEMM",
                     _fmt(v.get("load_s"), ".0f"), _agreement(v), _served_ppl(v), decode, _vllm_ratio(v),
                     "`" + " ".join(v["serve_command"].split()[:2] + ["…"] + v["serve_command"].split()[3:]) + "`"
                     + (f" with {switches}" if switches else "")])
    first = next(v for _, _, v in served if v.get("engine"))
    e, cpu = first.get("engine") or {}, next((v["cpu"] for _, _, v in served if v.get("cpu")), {})
    flags = next((v.get("harness_flags") for _, _, v in served if v.get("harness_flags") is not None), [])
    bind = next((v["binding"] for _, _, v in served if v.get("binding")), None)
    headers = ["variant", "what vLLM computed (quantized layers: activations, GEMM)", "kernel vLLM named (its log)",
               "load (s)", "greedy tokens = transformers, served dtype (noise floor)",
               "perplexity vLLM / transformers, served dtype (gap; fp32)",
               "decode tok/s, batch 1 (% of bound; server ITL)",
               "× baseline tok/s in transformers [95% interval, interleaved]", "served as (model card)"]
    caption = (f"vLLM {e.get('vllm', '?')} ({e.get('build', '?')} build, torch {e.get('torch', '?')}"
               + (f", CPU ISA {e['torch_cpu_capability']}" if e.get("torch_cpu_capability") else "")
               + f") on {cpu.get('model') or 'this machine'}"
               + (f" (flags that decide vLLM's CPU paths: {', '.join(cpu['flags']) or 'none'}; "
                  f"{cpu.get('logical_cpus')} logical CPUs, {cpu.get('threads_per_core')} thread(s) per core)"
                  if cpu else "")
               + (f"; vLLM's thread binding: {bind}" if bind else "")
               + f". Its OpenAI server runs in a subprocess, each checkpoint served with its model card's `vllm "
               f"serve` line plus {' '.join(flags) or 'nothing'} and the address; on a CPU compress sets "
               f"VLLM_CPU_INT4_W4A8=0 so that a row computes the checkpoint's own scheme, and a runtime variant "
               f"(evaluation.vllm.runtime_variants, the row named `variant [path]`) sets that path's switches. What "
               f"vLLM computed comes from vLLM's own layer attributes after loading (compress's probe plugin). "
               f"Agreement is with transformers running the same checkpoint in the served dtype: greedy tokens matched "
               f"before the first divergence on the self-check prompts (EOS ignored), next to the noise floor "
               f"(transformers in the served dtype against transformers fp32 on the same prompts: what rounding "
               f"alone does), and perplexity on the same first windows of the perplexity text (at most "
               f"`perplexity_windows`, so it can differ from the main table's figure), fp32 beside. {FLAG} marks a row "
               f"more than 1% from transformers' perplexity or below half the noise floor. Decode: 1 / TPOT p50 at "
               f"concurrency 1 (server: vLLM's own mean inter-token latency from /metrics); the bound is the read "
               f"bandwidth / the bytes vLLM holds (float tensors at the served dtype, and the KV cache). The ratio: "
               f"batch-1 streamed decode in vLLM interleaved A B / B A with the run's baseline decoding in "
               f"transformers (the main table's reference), short decodes after the benchmark prompt.")
    return Table(headers, rows, caption)


def vllm_tasks_table(variants: list[dict]) -> Table | None:
    """The lm-eval tasks run through a variant's vLLM server beside the transformers pass on the same checkpoint:
    both scores with their stderr, the gap in combined standard errors, and the items scored alike."""
    rows = []
    for r in _ok(variants):
        served = _get(r, "vllm", "tasks") or {}
        for i, (task, sv) in enumerate(served.items()):
            local = (r.get("tasks") or {}).get(task)
            gap = DASH
            if (local and sv.get("stderr") is not None and local.get("stderr") is not None
                    and (se := math.hypot(sv["stderr"], local["stderr"])) > 0):
                gap = f"{abs(sv['value'] - local['value']) / se:.2f}"
            alike = f"{sv['same_items']}/{sv['n']}" if sv.get("same_items") is not None else DASH
            rows.append([r["name"], f"{task} ({sv['metric']})", _pm(sv["value"], sv.get("stderr"), ".1f", 100),
                         _pm(local["value"], local.get("stderr"), ".1f", 100) if local else DASH, gap, alike,
                         _fmt(r["vllm"].get("tasks_seconds"), ".0f") if i == 0 else ""])
    if not rows:
        return None
    headers = ["variant", "task (metric)", "vLLM (%)", "transformers (%)", "gap / combined stderr",
               "items scored alike", "vLLM pass (s)"]
    caption = ("evaluation.vllm.tasks: the same local task files, documents and shots through lm-eval's "
               "`local-completions` model against the variant's vLLM server (prompt logprobs; "
               "evaluation.vllm.tasks_concurrency requests in flight of tasks_batch_size prompts each), beside the "
               "main table's transformers pass on the same checkpoint. A gap under 1 combined standard error is "
               "agreement within the error bars (the gap is the absolute difference); the items column counts "
               "documents the two engines scored alike.")
    return Table(headers, rows, caption)


def vllm_sweep_table(variants: list[dict]) -> Table | None:
    """The serving sweep per variant and concurrency: TTFT and TPOT p50/p99, output tok/s, requests/s, goodput."""
    rows = []
    slo = None
    for r in _ok(variants):
        for label, lv in [(label, lv) for label, v in served_rows(r) for lv in (v.get("sweep") or [])]:
            slo = lv.get("slo") or slo
            flag = f" {CONTENDED}" if (lv.get("contention") or {}).get("contended") else ""
            itl = f" (server {1000 * lv['server_itl_s_mean']:.1f})" if lv.get("server_itl_s_mean") else ""
            rows.append([label, str(lv["concurrency"]),
                         f"{lv['requests']}" + (" (time cap)" if lv.get("capped") else ""),
                         f"{1000 * lv['ttft_s_p50']:.0f} / {1000 * lv['ttft_s_p99']:.0f}",
                         f"{1000 * lv['tpot_s_p50']:.1f} / {1000 * lv['tpot_s_p99']:.1f}{itl}",
                         f"{lv['output_tok_per_sec']:.1f}{flag}", f"{lv['requests_per_sec']:.2f}",
                         f"{lv['goodput_requests_per_sec']:.2f} ({100 * lv['slo_met_share']:.0f}%)"])
    if not rows:
        return None
    ttft = f"{1000 * slo['ttft_s']:.0f} ms" if slo and slo.get("ttft_s") else "none"
    tpot = f"{1000 * slo['tpot_s']:.0f} ms" if slo and slo.get("tpot_s") else "none"
    headers = ["variant", "concurrency", "requests", "TTFT p50 / p99 (ms)",
               "TPOT p50 / p99 (ms) (server's mean inter-token latency)", "output tok/s",
               "requests/s", "goodput req/s (share within SLO)"]
    caption = (f"In the style of `vllm bench serve`: per level, requests of random token ids (no prefix-cache "
               f"hits) with exactly the set output length, streamed, at most `concurrency` in flight, after one "
               f"warm-up request per slot. TTFT = first streamed token; TPOT = (latency − TTFT) / (tokens − 1); "
               f"p99 of a few requests is near their maximum. Goodput counts requests with TTFT ≤ {ttft} and "
               f"TPOT ≤ {tpot} (the recipe's SLO). A level is bracketed by the contention check with the server's "
               f"processes counted as ours; a contended level is run again, then flagged {CONTENDED}.")
    return Table(headers, rows, caption)


def stage_table(variants: list[dict]) -> Table | None:
    """Where the run's time went: wall minutes per row and stage (compress/record.STAGES), with a total per row and
    per stage. None when no row has stage times (a run from before they were recorded)."""
    timed = [r for r in _ok(variants) if r.get("stage_seconds")]
    if not timed:
        return None
    stages = [s for s in STAGES if any(s in r["stage_seconds"] for r in timed)]

    def minutes(seconds: float | None) -> str:
        return DASH if seconds is None else f"{seconds / 60:.1f}"

    rows = [[r["name"], *(minutes(r["stage_seconds"].get(s)) for s in stages),
             minutes(sum(r["stage_seconds"].values()))] for r in timed]
    totals = [sum(r["stage_seconds"].get(s, 0.0) for r in timed) for s in stages]
    rows.append(["all rows", *map(minutes, totals), minutes(sum(totals))])
    headers = ["variant", *(_STAGE_NAMES[s] for s in stages), "total"]
    caption = ("Wall minutes per stage, each taken when its figure was made: a row or figure reused from the cache "
               "keeps the time it cost in the run that measured it, so this is what the whole table costs from an "
               "empty cache, not what this run spent. load: the checkpoint read into transformers; vLLM: every "
               "served row of the checkpoint, server start included. Not counted: the model's fetch, vLLM's "
               "environment, the report.")
    return Table(headers, rows, caption)


_STAGE_NAMES = {"compress": "compress", "load": "load", "perplexity": "perplexity + KL", "tasks": "tasks (lm-eval)",
                "throughput": "throughput", "speed_ratio": "speed ratio", "vllm": "vLLM"}


def auto_table(variants: list[dict]) -> Table | None:
    """Method `auto`: what each target chose, what the sensitivities predicted and what the evaluation measured on
    held-out text, beside the uniform rows of the run; None when no variant is `auto`.

    Bits per weight are the stored bits of the quantizable Linears, scales included (the uniform rows' figure from
    their format's table). The predicted KL is the sum of the one-unit damages on calibration windows; the measured
    KL is the main table's, on the perplexity file. A max_kl target is met when the measured KL is at most it; with
    verify strict the points the search built on the way are listed (compress/verify.py)."""
    ok = _ok(variants)
    autos = [r for r in ok if r.get("auto")]
    if not autos:
        return None
    headers = ["variant", "target", "bits/weight", "formats chosen", "predicted KL", "KL vs baseline", "perplexity",
               "target met (measured)", "next frontier point", "analysis (s)"]
    rows = []
    for r in autos:
        a = r["auto"]
        (kind, value), = a["target"].items()
        measured = _get(r, "kl", "mean")
        met = DASH
        if kind == "max_kl" and measured is not None:
            met = f"yes ({measured:.4f} ≤ {value:g})" if measured <= value else f"no: {measured - value:+.4f} over"
        elif kind == "effective_bits":
            met = "yes" if a["effective_bits"] <= value else f"no: {a['effective_bits'] - value:+.3f} bits over"
        elif kind == "max_size_gb" and r.get("weights_bytes") is not None:
            met = "yes" if r["weights_bytes"] <= value * 1e9 else f"no: {r['weights_bytes'] / 1e9 - value:+.4f} GB over"
        elif kind == "min_recovery" and (got := _get(r, "recovery", "average", "pct")) is not None:
            met = f"yes ({got:.1f}% ≥ {value:g}%)" if got >= value else f"no: {got - value:+.1f} points"
        if len(steps := (a.get("verify") or {}).get("steps", [])) > 1:  # verify strict built other points
            met += " (verify strict: " + " → ".join(_verify_step(p) for p in steps) + ")"
        nxt = a.get("next_point")
        s = a["sensitivity"]
        rows.append([r["name"], f"{kind} {value:g}", f"{a['effective_bits']:.3f}",
                     ", ".join(f"{f} ×{n}" for f, n in a["counts"].items()), f"{a['predicted']['value']:.4f}",
                     *_quality(r), met,
                     f"{nxt['effective_bits']:.3f} bits, predicted {nxt['predicted']:.4f}" if nxt else DASH,
                     f"{s['seconds']:.0f}" + (" (cached)" if s.get("cached") else "")])
    for r in ok:
        if r.get("auto") or r.get("method") == REFERENCE or not _get(r, "format", "bits_per_weight"):
            continue
        rows.append([r["name"], "uniform", f"{r['format']['bits_per_weight']:.3f}", r.get("scheme", DASH), DASH,
                     *_quality(r), DASH, DASH, DASH])
    first = autos[0]["auto"]["sensitivity"]
    caption = (f"Predicted: summed one-unit {first['score']} damage on {first['windows']} × {first['seq_len']} "
               f"calibration tokens. Measured: the main table's KL and perplexity on held-out text. "
               f"Uniform rows (same model, same run) for comparison.")
    return Table(headers, rows, caption)


def _verify_step(p: dict) -> str:
    """One point a verify strict search built: its bits and what was measured."""
    kl = f" KL {p['measured_kl']:.4f}" if p.get("measured_kl") is not None else ""
    rec = f" recovery {p['recovery_pct']:.1f}%" if p.get("recovery_pct") is not None else ""
    return f"{p['effective_bits']:.3f} bits{kl}{rec}"


def auto_map_table(variants: list[dict]) -> Table | None:
    """The format each `auto` variant chose per decoder layer (rows) and unit (columns): the heat map as text."""
    autos = [r for r in _ok(variants) if r.get("auto")]
    if not autos:
        return None
    kinds: list[str] = []
    layers: list[str] = []
    cells: dict[tuple[str, str, str], str] = {}
    for r in autos:
        for u in r["auto"]["units"]:
            layer, kind = _layer_and_kind(u["unit"])
            kinds += [kind] if kind not in kinds else []
            layers += [layer] if layer not in layers else []
            cells[(r["name"], layer, kind)] = u["format"]
    headers = ["layer"] + [f"{r['name']}: {k}" for r in autos for k in kinds]
    rows = [[layer] + [cells.get((r["name"], layer, k), DASH) for r in autos for k in kinds] for layer in layers]
    return Table(headers, rows, "Format per unit (vLLM's fused matrices: qkv, o, gate_up, down), per auto variant.",
                 shade="category")


def _layer_and_kind(unit: str) -> tuple[str, str]:
    """'layers.3.qkv_proj' -> ('layers.3', 'qkv_proj'); a whole decoder layer 'layers.3' -> ('layers.3', 'layer')."""
    layer, _, kind = unit.rpartition(".") if unit.count(".") > 1 else (unit, "", "layer")
    return layer, kind


def auto_sensitivity_table(variants: list[dict]) -> Table | None:
    """The sensitivity pass itself: each unit's damage alone in each format, per decoder layer (rows) and unit
    (columns), for every distinct analysis of the run (auto variants with the same key share one)."""
    seen: dict[str, dict] = {}
    for r in _ok(variants):
        if (s := _get(r, "auto", "sensitivity")) and s.get("key") not in seen:
            seen[s.get("key")] = s
    if not seen:
        return None
    headers, columns = ["layer"], []
    layers: list[str] = []
    cells: dict[tuple, str] = {}
    for n, s in enumerate(seen.values()):
        tag = f"analysis {n + 1}, " if len(seen) > 1 else ""
        for unit, costs in zip(s["units"], s["costs"]):
            layer, kind = _layer_and_kind(unit)
            layers += [layer] if layer not in layers else []
            for fmt, cost in zip(s["formats"], costs):
                if fmt == UNQUANTIZED:
                    continue
                col = f"{tag}{kind} {fmt}"
                if col not in columns:
                    columns.append(col)
                cells[(layer, col)] = DASH if cost is None else f"{cost:.2g}"
    headers += columns
    rows = [[layer] + [cells.get((layer, c), DASH) for c in columns] for layer in layers]
    first = next(iter(seen.values()))
    return Table(headers, rows, f"One unit at a time in each format, the rest of the model unquantized: the "
                                f"{first['score']} damage (nats per token) on {first['windows']} × {first['seq_len']} "
                                f"calibration tokens; {DASH} where the format's groups do not divide the unit. "
                                f"What the choice sums; the evaluation measures the whole checkpoint.", shade="scale")
