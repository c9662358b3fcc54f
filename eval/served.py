"""Served = measured: each checkpoint as vLLM serves it (eval/engines/vllm.py), and the figures taken from that
server, the way its users will run it.

Per variant, from one server started with the model card's own `vllm serve` line:
- **kernel**: the kernel vLLM says it picked for the quantized linear layers (its log; none for an unquantized
  model, which runs plain GEMMs);
- **greedy agreement with transformers**: the self-check prompts continued greedily by both engines on the same
  checkpoint, EOS ignored; per prompt, the tokens that match before the first divergence. Different kernels and
  dtypes (the card serves fp32 checkpoints in bf16) round differently, so some divergence is expected; what the
  figure catches is a checkpoint vLLM reads wrongly, which diverges at once;
- **perplexity from vLLM's prompt logprobs** on exactly the windows of eval/perplexity.py (same tokens, same
  scored positions), shown beside the transformers perplexity of the same checkpoint;
- **serving sweep** in the style of `vllm bench serve`: per concurrency level, requests of `prompt_tokens` random
  token ids (distinct, so no prefix-cache hits) and exactly `output_tokens` tokens, streamed; a warm-up request
  per slot first; TTFT and TPOT p50/p99, output tok/s, requests/s and goodput under the recipe's SLO
  (eval/serving.py). Each level is bracketed by eval/contention, the server's processes counted as ours; a
  contended level is run again (`retries`), then flagged;
- **batch-1 decode against the roofline**: 1 / TPOT p50 at concurrency 1 against memory bandwidth / the bytes vLLM
  reads per token (the checkpoint's tensors, float ones at the served dtype);
- **ratio to the baseline**: batch-1 streamed decode interleaved A B / B A with the run's baseline in transformers
  (the main table's reference, so every engine's row is against the same one; eval/interleaved.py), with the same
  interval and contention rules as every other ratio (the server's processes count as ours). Short decodes
  (`ratio_new_tokens`), so that slow rows (FP8, emulated on a CPU) stay affordable.
A variant vLLM cannot serve here is a row with vLLM's reason (the log's last error), never a crash of the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from eval import contention
from eval.serving import request_metrics, summarize_level

log = logging.getLogger("compress")

SERVED_FORMAT = 1  # bump when what a vLLM measurement holds changes
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": None}


def served_dtype(flags: list[str], saved_dtype: str | None) -> str:
    """The dtype vLLM computes in: the card's --dtype, else the checkpoint's own."""
    if "--dtype" in flags:
        return flags[flags.index("--dtype") + 1]
    return saved_dtype or "auto"


def harness_flags(settings) -> list[str]:
    """What the harness adds to the card's serve line (the report lists it apart from the card's flags)."""
    return ["--enforce-eager"] if settings.eager else []


def env_vars(settings, env: dict) -> dict:
    return {"VLLM_CPU_KVCACHE_SPACE": f"{settings.kv_cache_space_gb:g}"} if env.get("build") == "cpu" else {}


def key(ev, record: dict, base: dict | None, env: dict, device: str) -> str:
    """What a variant's vLLM figures depend on: its checkpoint, its serve line, the vLLM environment, the settings,
    the perplexity windows and text, the self-check prompts, the ratio's settings and baseline."""
    from eval.measure import ppl_file_digest

    blob = {"format": SERVED_FORMAT, "checkpoint": record["cache_key"], "serve": record.get("serve"),
            "engine": {k: env.get(k) for k in ("vllm", "torch", "build", "package")}, "device": device,
            # min_tok_per_sec decides whether a row is measured, not its figures: a "too slow" row is measured
            # again when the threshold drops below its probe (serve_all)
            # `tasks` names the rows whose lm-eval pass goes through vLLM: a row's key holds only its own answer,
            # so adding a row to that list measures that row again, not every other one
            "settings": ev.vllm.model_dump(exclude={"min_tok_per_sec", "tasks"}), "prompts": ev.selfcheck_prompts,
            "perplexity": ev.perplexity.model_dump() if ev.perplexity else None, "ppl_file": ppl_file_digest(ev),
            "throughput": ev.throughput.model_dump() if ev.throughput else None,
            "baseline": base["cache_key"] if base else None,
            "tasks": (ev.tasks, ev.num_fewshot, ev.limit) if runs_tasks(ev, record["name"]) else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def runs_tasks(ev, name: str) -> bool:
    """Whether variant `name` also runs evaluation.tasks through its vLLM server (evaluation.vllm.tasks: true for
    every row, or the rows named)."""
    t = ev.vllm.tasks
    return bool(ev.tasks) and (t is True or (isinstance(t, list) and name in t))


def ppl_windows(ev) -> int | None:
    """How many perplexity windows vLLM scores: the evaluation's, capped by vllm.perplexity_windows."""
    caps = [w for w in (ev.perplexity.max_windows, ev.vllm.perplexity_windows) if w]
    return min(caps) if caps else None


def not_served(record: dict) -> str | None:
    """Why a row is not served by vLLM here (None: it is)."""
    if record.get("gguf"):
        return "a GGUF file: served by llama.cpp (its row), not by vLLM"
    kv = record.get("kv_cache")
    if kv and not record.get("kv_in_checkpoint"):
        return f"vLLM has no {kv['dtype']} KV cache (the row's KV format is simulated in transformers)"
    if record.get("bnb"):
        return "bitsandbytes checkpoints are served by vLLM on CUDA only"
    return None


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


def transformers_reference(folder: Path, prompts: list[list[int]], n: int, dtype, device: str, ppl_ids,
                           ppl, windows: int | None) -> tuple[list[list[int]], dict | None]:
    """What vLLM is compared with, from transformers on the same checkpoint: the greedy continuation (EOS ignored:
    argmax every step) of each prompt, and the perplexity on the first `windows` windows of eval/perplexity.py
    (those vLLM scores; None without perplexity)."""
    import torch

    from eval import perplexity as ppl_mod
    from eval.engines import transformers as hf

    model = hf.load_checkpoint(folder, dtype, device)
    reference_ppl = None
    if ppl_ids is not None:
        reference_ppl = ppl_mod.evaluate_tokens(model, torch.tensor(ppl_ids), context=ppl.context, stride=ppl.stride,
                                                max_windows=windows)
    return _greedy(model, prompts, n, device), reference_ppl


def _greedy(model, prompts: list[list[int]], n: int, device: str) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            past, new = None, []
            step = x
            for _ in range(n):
                res = model(step, past_key_values=past, use_cache=True)
                past = res.past_key_values
                tok = int(res.logits[0, -1].argmax())
                new.append(tok)
                step = torch.tensor([[tok]], device=device)
            out.append(new)
    return out


def agreement(reference: list[list[int]], served: list[list[int]]) -> dict:
    """Tokens matched before the first divergence, per prompt, and in all."""
    matched = []
    for ref, got in zip(reference, served, strict=True):
        k = 0
        while k < min(len(ref), len(got)) and ref[k] == got[k]:
            k += 1
        matched.append(k)
    total = sum(len(r) for r in reference)
    return {"matched_tokens": matched, "tokens_per_prompt": len(reference[0]) if reference else 0,
            "prompts": len(reference), "identical": sum(m == len(r) for m, r in zip(matched, reference)),
            "share": sum(matched) / total if total else None}


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
    return {"value": math.exp(nll / count), "tokens": count, "windows": len(spans), "context": ppl.context,
            "stride": ppl.stride}


def _prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    """Random token ids away from the special tokens at either end of the vocabulary (vllm bench's 'random')."""
    lo, hi = min(1000, vocab // 4), max(vocab - 1000, vocab // 2)
    return [rng.randrange(lo, hi) for _ in range(n)]


def run_level(server, pids, *, concurrency: int, settings, vocab: int, seed: int,
              threshold: float = contention.THRESHOLD) -> tuple[dict, dict]:
    """One concurrency level: warm-up, then the measured requests with at most `concurrency` in flight."""
    rng = random.Random(seed)
    payload = {"max_tokens": settings.output_tokens, "min_tokens": settings.output_tokens, "temperature": 0,
               "ignore_eos": True}
    warmup = min(concurrency, 2)
    with ThreadPoolExecutor(warmup) as pool:  # warm-up (batch shapes, allocator), short, not counted
        list(pool.map(lambda p: server.stream({**payload, "prompt": p, "max_tokens": 4, "min_tokens": 4}),
                      [_prompt(rng, vocab, settings.prompt_tokens) for _ in range(warmup)]))
    n = max(settings.requests_min, settings.requests_per_concurrency * concurrency)
    prompts = [_prompt(rng, vocab, settings.prompt_tokens) for _ in range(n)]
    lock, results, capped = threading.Lock(), [], [False]
    deadline = time.perf_counter() + settings.level_max_s

    def worker() -> None:
        while True:
            with lock:
                if not prompts:
                    return
                if time.perf_counter() > deadline:
                    capped[0] = True
                    return
                p = prompts.pop()
            sent, times, tokens = server.stream({**payload, "prompt": p})
            if tokens != settings.output_tokens:
                raise RuntimeError(f"vLLM returned {tokens} tokens, expected {settings.output_tokens}")
            with lock:
                results.append(request_metrics(sent, times, tokens))

    def level() -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(worker) for _ in range(concurrency)]:
                f.result()
        return time.perf_counter() - t0

    wall_s, sample = contention.timed(level, threshold, pids)
    out = summarize_level(results, concurrency=concurrency, wall_s=wall_s, slo_ttft_s=settings.slo_ttft_ms / 1000,
                          slo_tpot_s=settings.slo_tpot_ms / 1000)
    out["requests_planned"] = n
    out["capped"] = capped[0]
    return out, sample


def sweep(server, pids, settings, vocab: int, threshold: float) -> list[dict]:
    """Every concurrency level; a contended level is run again (at most `retries` times), then flagged."""
    levels = []
    for c in settings.concurrency:
        samples, runs = [], []
        while True:
            out, sample = run_level(server, pids, concurrency=c, settings=settings, vocab=vocab,
                                    seed=1000 * c + len(runs), threshold=threshold)
            runs.append(out)
            samples.append(sample)
            if not samples[-1]["contended"] or len(runs) > settings.retries:
                break
        quiet = [i for i, s in enumerate(samples) if not s["contended"]]
        pick = quiet[-1] if quiet else len(runs) - 1
        levels.append({**runs[pick], "attempts": len(runs),
                       "contention": contention.summary(samples, [samples[pick]], retries=settings.retries,
                                                        threshold=threshold)})
        lv = levels[-1]
        log.info("stage vllm: concurrency %d: TTFT p50 %.0f ms p99 %.0f ms, TPOT p50 %.1f ms p99 %.1f ms, "
                 "%.1f output tok/s, goodput %.2f req/s (%d requests)%s", c, 1000 * lv["ttft_s_p50"],
                 1000 * lv["ttft_s_p99"], 1000 * lv["tpot_s_p50"], 1000 * lv["tpot_s_p99"],
                 lv["output_tok_per_sec"], lv["goodput_requests_per_sec"], lv["requests"],
                 ", CONTENDED" if lv["contention"]["contended"] else "")
    return levels


def measure(server, *, ev, record: dict, tokenizer, ppl_ids, reference_greedy: list[list[int]],
            transformers_ppl: dict | None, bandwidth: dict | None, base_decoder=None) -> dict:
    """Every vLLM figure of one variant from its running `server` (see the module docstring)."""
    from eval import throughput
    from eval.engines.vllm import kernels, open_decoder

    s = ev.vllm
    out: dict = {"status": "ok", "load_s": server.load_s}
    out["kernels"] = kernels(server.log())
    if s.min_tok_per_sec:
        probe = {"prompt": tokenizer(ev.selfcheck_prompts[0]).input_ids, "max_tokens": 4, "min_tokens": 4,
                 "temperature": 0, "ignore_eos": True}
        server.stream(probe)  # the first request also pays the engine's lazy set-up
        sent, times, tokens = server.stream(probe)
        # the whole request, prompt included: FP8 emulated on a CPU spent minutes before its first token and then
        # streamed the rest fast, so a decode-only rate let it through to hours of measurement
        probe_tok_per_sec = tokens / (times[-1] - sent) if times and times[-1] > sent else 0.0
        out["probe_tok_per_sec"] = probe_tok_per_sec
        if probe_tok_per_sec < s.min_tok_per_sec:
            out["status"] = "too slow"
            out["reason"] = (f"served, but generates at {probe_tok_per_sec:.2f} tok/s here, prompt included (below min_tok_per_sec "
                             f"{s.min_tok_per_sec:g}; its kernel: {', '.join(out['kernels']) or 'dense GEMM'}): "
                             f"not measured further")
            log.warning("stage vllm: %s %s", record["name"], out["reason"])
            return out
    prompts = [tokenizer(p).input_ids for p in ev.selfcheck_prompts]
    got = [server.greedy(p, s.agreement_tokens) for p in prompts]
    out["agreement"] = {**agreement(reference_greedy, got), "reference": "transformers, same checkpoint, fp32"}
    log.info("stage vllm: %s greedy agreement with transformers: %s of %d tokens before the first divergence",
             record["name"], out["agreement"]["matched_tokens"], s.agreement_tokens)
    if s.perplexity and ppl_ids is not None:
        p = perplexity(server, ppl_ids, ev.perplexity, ppl_windows(ev))
        if transformers_ppl:
            p["transformers_value"] = transformers_ppl["value"]
            p["transformers_tokens"] = transformers_ppl["tokens"]
        out["perplexity"] = p
        log.info("stage vllm: %s perplexity %.3f (transformers %s) over %d tokens", record["name"], p["value"],
                 f"{transformers_ppl['value']:.3f}" if transformers_ppl else "—", p["tokens"])

    pids = server.pids
    t = ev.throughput
    threshold = t.contention_threshold if t else contention.THRESHOLD
    out["sweep"] = sweep(server, pids, s, len(tokenizer), threshold)
    one = next((lv for lv in out["sweep"] if lv["concurrency"] == 1), None)
    dtype = served_dtype(server.flags, record.get("saved_dtype"))
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
        log.info("stage vllm: %s %.3fx the baseline in transformers [%.3f, %.3f] (%s)%s", record["name"],
                 ratio["ratio"], ratio["ratio_lo"], ratio["ratio_hi"], ratio["verdict"],
                 ", CONTENDED" if ratio["contention"]["contended"] else "")
    if runs_tasks(ev, record["name"]):
        from eval.accuracy import run_tasks_served

        t0 = time.perf_counter()
        try:
            out["tasks"] = run_tasks_served(f"http://127.0.0.1:{server.port}/v1/completions", server.name,
                                            Path(record["checkpoint"]), ev.tasks, Path(ev.data_dir).expanduser(),
                                            num_fewshot=ev.num_fewshot, limit=ev.limit)
        except Exception as e:  # the other vLLM figures stand; the tasks say why they are missing
            out["tasks_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            log.warning("stage vllm: %s tasks through vLLM failed: %s", record["name"], out["tasks_error"])
            return out
        out["tasks_seconds"] = time.perf_counter() - t0
        log.info("stage vllm: %s tasks through vLLM in %.0f s: %s", record["name"], out["tasks_seconds"],
                 ", ".join(f"{t} {100 * x['value']:.1f}" for t, x in out["tasks"].items()))
    return out


def serve_all(recipe, output: Path, records: dict[str, dict], measured: dict[str, dict], names: list[str],
              base_name: str | None, device: str, dtype, remeasure: bool = False) -> None:
    """The vLLM stage of eval/measure.evaluate_run: every ok variant served and measured (baseline first), each
    result cached in eval/<variant>.json under its own key (`key`), its server log kept as
    eval/<variant>.vllm.log. The baseline's server stays up while the variants are measured, for the
    interleaved ratios"""
    import shutil
    import tempfile
    import traceback

    from transformers import AutoTokenizer

    from compress import ownership
    from compress.environment import release_freed_memory
    from compress.resources import one_line
    from eval.engines import vllm, vllm_env

    ev = recipe.evaluation
    env = vllm_env.ensure(device)
    engine = {k: v for k, v in env.items() if k not in ("path", "python")}
    base = records.get(base_name) if base_name else None
    todo = []
    for name in names:
        vkey = key(ev, records[name], base, env, device)
        cached = measured[name].get("vllm") or {}
        still_valid = (cached.get("status") != "too slow"
                       or (cached.get("probe_tok_per_sec") or 0) < ev.vllm.min_tok_per_sec)
        if measured[name].get("vllm_key") == vkey and still_valid and not remeasure:
            log.info("stage vllm: %s unchanged, reusing its vLLM figures", name)
            continue
        todo.append((name, vkey))
    if not todo:
        return
    base_decoder, ppl_ids, bandwidth = None, None, None

    def server_for(record: dict, log_name: str):
        flags = vllm.served_flags(record["serve"])
        return vllm.Server(env, Path(record["checkpoint"]), flags, name=record["name"], log_path=tmp / log_name,
                           extra_flags=harness_flags(ev.vllm), env_vars=env_vars(ev.vllm, env),
                           ready_timeout_s=ev.vllm.ready_timeout_s)

    # transformers' side of each row's agreement first, one model at a time, before the baseline's decoder (the
    # ratio's reference) is loaded for the whole stage: never two transformers models in memory at once
    references: dict[str, tuple] = {}  # name: (tokenizer, greedy tokens, perplexity)
    reference_s: dict[str, float] = {}
    for name, _ in todo:
        if not_served(records[name]):
            continue
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(records[name]["checkpoint"])
        if ev.perplexity and ev.vllm.perplexity and ppl_ids is None:
            ppl_ids = tok((Path(ev.data_dir).expanduser() / ev.perplexity.file).read_text()).input_ids
        log.info("stage vllm: %s in transformers (greedy and perplexity, what vLLM is compared with)", name)
        references[name] = tok, *transformers_reference(
            Path(records[name]["checkpoint"]), [tok(p).input_ids for p in ev.selfcheck_prompts],
            ev.vllm.agreement_tokens, dtype, device, ppl_ids if ev.vllm.perplexity else None, ev.perplexity,
            ppl_windows(ev) if ev.perplexity else None)
        release_freed_memory()
        reference_s[name] = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="compress-vllm-"))
    try:
        for name, vkey in todo:
            record = records[name]
            result: dict | None = None
            server = None
            t0 = time.perf_counter()
            if reason := not_served(record):
                log.info("stage vllm: %s not served: %s", name, reason)
                result = {"status": "skipped", "reason": reason}
            else:
                tok, reference, reference_ppl = references[name]
                if bandwidth is None:
                    bandwidth = measured[name].get("bandwidth")
                if bandwidth is None:
                    from eval.throughput import measure_bandwidth

                    bandwidth = measure_bandwidth(device="cpu")
                if base is not None and base_decoder is None:
                    base_decoder = _transformers_decoder(base, ev.vllm, dtype, device)
                server = server_for(record, f"{name}.log")
                log.info("stage vllm: serving %s: %s", name, " ".join(server.command[3:]))
                try:
                    server.start()
                    log.info("stage vllm: %s ready in %.0f s (kernels: %s)", name, server.load_s,
                             ", ".join(vllm.kernels(server.log())) or "plain GEMM")
                    result = measure(server, ev=ev, record=record, tokenizer=tok, ppl_ids=ppl_ids,
                                     reference_greedy=reference, transformers_ppl=reference_ppl,
                                     bandwidth=bandwidth, base_decoder=base_decoder)
                except vllm.ServerFailed as e:
                    log.warning("stage vllm: %s not served: %s", name, e)
                    result = {"status": "failed", "reason": str(e)}
                except Exception as e:  # one variant's failure is its row, never the run's
                    log.warning("stage vllm: %s failed: %s", name, one_line(e, output))
                    log.debug("traceback:\n%s", traceback.format_exc())
                    result = {"status": "failed", "reason": one_line(e, output)}
                finally:  # also on SystemExit (SIGTERM) and KeyboardInterrupt: no server outlives the run
                    server.stop()
                result.update(serve_command=record["serve"], harness_flags=server.extra_flags,
                              env_vars=server.env_vars, log=f"eval/{name}.vllm.log")
                ownership.write_owned(output, f"eval/{name}.vllm.log", server.log())
            result.update(engine=engine,  # the transformers reference's time included
                          measure_seconds=round(time.perf_counter() - t0 + reference_s.get(name, 0.0), 1))
            measured[name] = {**measured[name], "vllm": result, "vllm_key": vkey}
            ownership.write_owned(output, f"eval/{name}.json", json.dumps(measured[name], indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _transformers_decoder(base: dict, s, dtype, device: str):
    """The run's baseline in transformers as a batch-1 decoder (one_run, info) on the benchmark prompt: the reference
    of every vLLM row's interleaved ratio, as it is of the main table's (one reference for every engine)."""
    from eval.engines import transformers as hf

    one_run, _, info = hf.open_decoder(base["checkpoint"], prompt_tokens=s.prompt_tokens, new_tokens=s.ratio_new_tokens,
                                       device=device, dtype=str(dtype).removeprefix("torch."))
    return one_run, info
