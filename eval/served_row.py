"""One row's vLLM figures, taken from its running server (the stage, eval/served.py, starts and stops it): what
vLLM computed, agreement with transformers, perplexity from prompt logprobs, the serving sweep (eval/serving.py),
batch-1 decode against the roofline, the interleaved ratio to the baseline, and optionally lm-eval's tasks.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from pathlib import Path

from compress import stop
from eval import contention
from eval.served_setup import ppl_windows, quantization, row_label, runs_tasks, served_dtype
from eval.serving import sweep

log = logging.getLogger("compress")

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": None}


def served_weight_bytes(folder: Path, dtype: str) -> int:
    """Bytes of the checkpoint's tensors as vLLM holds them: integer and fp8 tensors as stored, float tensors at
    the served dtype (read from the safetensors headers; no tensor is loaded)."""
    size = _DTYPE_BYTES.get(dtype)
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(t["shape"]) if t["shape"] else 1
            stored = (t["data_offsets"][1] - t["data_offsets"][0])
            if size and t["dtype"] in ("F32", "BF16", "F16"):
                total += n * size
            else:
                total += stored
    return total


def _floor_source(s) -> str:
    """Where the probe's floor came from, as the report says it."""
    if s.min_tok_per_sec is not None:
        return "evaluation.vllm.min_tok_per_sec"
    return f"half the SLO's per-user pace, slo_tpot_ms {s.slo_tpot_ms:g}"


def perplexity(server, ids: list[int], ppl, windows: int | None) -> dict:
    """Perplexity from vLLM's prompt logprobs on the first `windows` of eval/perplexity.py's windows of `ids`."""
    from eval.perplexity import window_spans

    spans = window_spans(len(ids), ppl.context, ppl.stride, windows)
    nll, count = 0.0, 0
    for begin, end, first in spans:
        lps = server.prompt_logprobs(ids[begin:end])
        scored = lps[first - begin:end - begin]
        nll -= sum(scored)
        count += len(scored)
        stop.tick()
    return {"value": math.exp(nll / count), "tokens": count, "windows": len(spans), "context": ppl.context,
            "stride": ppl.stride}


def measure(server, *, ev, record: dict, tokenizer, ppl_ids, reference: dict, run_dtype: str,
            bandwidth: dict | None, base_decoder=None, runtime: str | None = None) -> dict:
    """Every vLLM figure of one row from its running `server` (see the module docstring). `reference`: transformers
    on the same checkpoint per dtype (eval/agreement.reference)."""
    from compress.environment import cpu_features
    from eval import agreement, throughput
    from eval.engines.vllm import binding, compute_path, declared_activations, kernels, layer_facts, open_decoder

    s = ev.vllm
    label = row_label(record["name"], runtime)
    log_text = server.log()
    out: dict = {"status": "ok", "load_s": server.load_s, "kernels": kernels(log_text), "cpu": cpu_features(),
                 "binding": binding(log_text)}
    out["compute_path"] = compute_path(layer_facts(log_text), declared_activations(quantization(server.folder)))
    if out["compute_path"]:
        log.info("stage vllm: %s computes %s (%s)", label, out["compute_path"]["label"],
                 "the checkpoint's own scheme" if out["compute_path"]["own_scheme"] else "NOT the checkpoint's scheme")
    if floor := s.probe_floor():
        probe = {"prompt": tokenizer(ev.selfcheck_prompts[0]).input_ids, "max_tokens": 4, "min_tokens": 4,
                 "temperature": 0, "ignore_eos": True}
        kernel = ", ".join(out["kernels"]) or "dense GEMM"

        def too_slow(what: str, below: str, **fields) -> dict:
            out.update(status="too slow", **fields,
                       reason=f"served, but {what} ({below}; its kernel: {kernel}): not measured further")
            log.warning("stage vllm: %s %s", label, out["reason"])
            return out

        # never wait on what is known to be too slow to measure: the first request (which also pays the engine's
        # set-up) gets probe_timeout_s in all; the timed one 4 / floor seconds, past which its rate, prompt
        # included, can only be below the floor (FP8 emulated on a CPU spent 4 minutes on its two probes here)
        try:
            server.stream(probe, timeout_s=s.probe_timeout_s, deadline_s=s.probe_timeout_s)
        except TimeoutError:
            return too_slow(f"a 4-token request did not finish within {s.probe_timeout_s:g} s",
                            f"below {floor:g} tok/s", probe_timeout_s=s.probe_timeout_s)
        deadline_s = min(s.probe_timeout_s, probe["max_tokens"] / floor)
        try:
            sent, times, tokens = server.stream(probe, timeout_s=s.probe_timeout_s, deadline_s=deadline_s)
        except TimeoutError:
            return too_slow(f"a second 4-token request, prompt included, did not finish within {deadline_s:.2g} s: "
                            f"below {floor:g} tok/s", _floor_source(s), probe_tok_per_sec_below=floor)
        # the whole request, prompt included: FP8 emulated on a CPU spent minutes before its first token and then
        # streamed the rest fast, so a decode-only rate let it through to hours of measurement
        probe_tok_per_sec = tokens / (times[-1] - sent) if times and times[-1] > sent else 0.0
        out["probe_tok_per_sec"] = probe_tok_per_sec
        if probe_tok_per_sec < floor:
            return too_slow(f"generates at {probe_tok_per_sec:.2f} tok/s here, prompt included",
                            f"below {floor:g} tok/s, {_floor_source(s)}")
    dtype = served_dtype(server.flags, record.get("saved_dtype"))
    prompts = [tokenizer(p).input_ids for p in ev.selfcheck_prompts]
    got = [server.greedy(p, s.agreement_tokens) for p in prompts]
    served_ppl = perplexity(server, ppl_ids, ev.perplexity, ppl_windows(ev)) \
        if s.perplexity and ppl_ids is not None else None
    out.update(agreement.compare(got, served_ppl, reference, dtype, run_dtype))
    a, floor, p = out["agreement"], out.get("noise_floor"), out.get("perplexity")
    log.info("stage vllm: %s greedy agreement with %s: %s of %d tokens (noise floor %s); perplexity %s "
             "(transformers %s %s)", label, a["reference"], a["matched_tokens"], s.agreement_tokens,
             floor["matched_tokens"] if floor else "—", f"{p['value']:.3f}" if p else "—",
             p.get("transformers_dtype") if p else "", f"{p['transformers_value']:.3f}"
             if p and "transformers_value" in p else "—")
    for check in out["checks"]:
        log.warning("stage vllm: %s flagged: %s", label, check)

    pids = server.pids
    t = ev.throughput
    threshold = t.contention_threshold if t else contention.THRESHOLD
    out["sweep"] = sweep(server, pids, s, len(tokenizer), threshold, label=f"{label}: ")
    one = next((lv for lv in out["sweep"] if lv["concurrency"] == 1), None)
    if one and bandwidth:
        from transformers import AutoConfig

        from compress.planner import kv_bytes

        weight_bytes = served_weight_bytes(Path(record["checkpoint"]), dtype)
        kv_dtype_bytes = 1 if "fp8" in server.flags else (_DTYPE_BYTES.get(dtype) or 2)
        mean_context = s.prompt_tokens + s.output_tokens // 2
        kv = kv_bytes(AutoConfig.from_pretrained(record["checkpoint"]), mean_context, 1, kv_dtype_bytes)
        tok_per_sec = 1 / one["tpot_s_p50"]
        out["decode"] = {"tok_per_sec": tok_per_sec, "ttft_s": one["ttft_s_p50"], "dtype": dtype,
                         **throughput.roofline(weight_bytes, kv, bandwidth["bytes_per_sec"], tok_per_sec),
                         "kv_context_tokens": mean_context,
                         "bytes_note": "the checkpoint's tensors as vLLM holds them (float tensors at the served "
                                       "dtype) + the KV cache at the mean context (served dtype, fp8 with "
                                       "--kv-cache-dtype fp8)"}
        if "server_itl_s_mean" in one:
            out["decode"]["server_tok_per_sec"] = 1 / one["server_itl_s_mean"]
    if base_decoder is not None:
        from eval.interleaved import interleave
        from eval.throughput import PROMPT_SENTENCE, repeat_prompt

        a_run, a_info = base_decoder
        ids = repeat_prompt(tokenizer(PROMPT_SENTENCE, add_special_tokens=False).input_ids, s.prompt_tokens)
        b_run, _, b_info = open_decoder(server, prompt_ids=ids, new_tokens=s.ratio_new_tokens)
        ratio = interleave(a_run, b_run, new_tokens=s.ratio_new_tokens, rounds=s.ratio_rounds,
                           retries=t.retries if t else 0, threshold=threshold, pids=pids)
        out["speed_ratio"] = {**ratio, "baseline_engine": a_info, "engine": b_info,
                              "prompt_tokens": s.prompt_tokens, "new_tokens": s.ratio_new_tokens, "batch": 1}
        log.info("stage vllm: %s %.3fx the baseline in transformers [%.3f, %.3f] (%s)%s", label,
                 ratio["ratio"], ratio["ratio_lo"], ratio["ratio_hi"], ratio["verdict"],
                 ", CONTENDED" if ratio["contention"]["contended"] else "")
    if runs_tasks(ev, record["name"], runtime):
        from eval.accuracy import run_tasks_served

        t0 = time.perf_counter()
        try:
            with stop.stage(f"measuring {label}'s tasks through vLLM (lm-eval)"):
                out["tasks"] = run_tasks_served(f"http://127.0.0.1:{server.port}/v1/completions", server.name,
                                                Path(record["checkpoint"]), ev.tasks,
                                                Path(ev.data_dir).expanduser(), num_fewshot=ev.num_fewshot,
                                                limit=ev.limit, concurrent=s.tasks_concurrency,
                                                batch_size=s.tasks_batch_size)
        except Exception as e:  # the other vLLM figures stand; the tasks say why they are missing
            out["tasks_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            log.warning("stage vllm: %s tasks through vLLM failed: %s", label, out["tasks_error"])
            return out
        out["tasks_seconds"] = time.perf_counter() - t0
        out["tasks_client"] = {"concurrent": s.tasks_concurrency, "batch_size": s.tasks_batch_size}
        log.info("stage vllm: %s tasks through vLLM in %.0f s: %s", label, out["tasks_seconds"],
                 ", ".join(f"{t} {100 * x['value']:.1f}" for t, x in out["tasks"].items()))
    return out
