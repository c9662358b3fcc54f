"""Serving metrics, engine-neutral: what one concurrency level of streamed requests did, in the terms `vllm bench
serve` and the handbook's benchmarking lab use.

Per request (measured by the client as the tokens stream in):
- TTFT, time to first token: request sent -> first token back; prefill plus any queueing behind other requests;
- TPOT, time per output token: (end-to-end latency - TTFT) / (output tokens - 1), the decode pace that request saw;
- end-to-end latency.
Per level: the p50 and p99 of each (the p99 is what an SLO is written against), output tok/s and requests/s over
the level's wall time (first request sent -> last one done), and goodput: requests/s that met *both* SLO limits
(TTFT and TPOT), with the share that met them. Warm-up requests are made before a level and never counted.

Percentiles are the linear interpolation numpy and vLLM's benchmark use (`numpy.percentile`'s default), so p99 of
a handful of requests is close to their maximum; the sample count is reported beside every figure.

The sweep itself (`sweep`, `run_level`) drives any server with `stream(payload) -> (sent, chunk times, tokens)`:
per concurrency level, requests of `prompt_tokens` random token ids (distinct, so no prefix-cache hits) and exactly
`output_tokens` tokens, streamed, after a warm-up; each level bracketed by eval/contention (the server's processes
counted as ours), a contended level run again, then flagged. Where the server counts its own inter-token latency
(`itl_counters() -> (seconds, intervals)`, vLLM's /metrics), the level reports it beside the client's TPOT: the
difference is what the API server and the client add on top of the engine's steps.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from eval import contention

log = logging.getLogger("compress")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        return math.nan
    x = sorted(values)
    pos = (len(x) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(x) - 1)
    return x[lo] + (x[hi] - x[lo]) * (pos - lo)


def request_metrics(sent_s: float, token_times_s: list[float], output_tokens: int) -> dict:
    """One streamed request: `sent_s` when it was sent, `token_times_s` when each streamed chunk with text arrived
    (a chunk may carry several tokens), `output_tokens` the count the server reported (usage)."""
    if not token_times_s or output_tokens < 1:
        raise ValueError("the request produced no tokens")
    ttft = token_times_s[0] - sent_s
    e2e = token_times_s[-1] - sent_s
    tpot = (e2e - ttft) / (output_tokens - 1) if output_tokens > 1 else math.nan
    return {"ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e, "output_tokens": output_tokens}


def summarize_level(requests: list[dict], *, concurrency: int, wall_s: float, slo_ttft_s: float | None,
                    slo_tpot_s: float | None) -> dict:
    """One concurrency level's figures from its measured requests (`request_metrics` dicts)."""
    if not requests:
        raise ValueError("no measured requests")
    ttft = [r["ttft_s"] for r in requests]
    tpot = [r["tpot_s"] for r in requests if not math.isnan(r["tpot_s"])]
    e2e = [r["e2e_s"] for r in requests]

    def good(r: dict) -> bool:
        return ((slo_ttft_s is None or r["ttft_s"] <= slo_ttft_s)
                and (slo_tpot_s is None or (not math.isnan(r["tpot_s"]) and r["tpot_s"] <= slo_tpot_s)))

    met = sum(good(r) for r in requests)
    return {"concurrency": concurrency, "requests": len(requests), "wall_s": wall_s,
            "ttft_s_p50": percentile(ttft, 50), "ttft_s_p99": percentile(ttft, 99),
            "tpot_s_p50": percentile(tpot, 50), "tpot_s_p99": percentile(tpot, 99),
            "e2e_s_p50": percentile(e2e, 50), "e2e_s_p99": percentile(e2e, 99),
            "output_tok_per_sec": sum(r["output_tokens"] for r in requests) / wall_s,
            "requests_per_sec": len(requests) / wall_s,
            "goodput_requests_per_sec": met / wall_s, "slo_met_share": met / len(requests),
            "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s}}


def random_prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
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
                      [random_prompt(rng, vocab, settings.prompt_tokens) for _ in range(warmup)]))
    n = max(settings.requests_min, settings.requests_per_concurrency * concurrency)
    prompts = [random_prompt(rng, vocab, settings.prompt_tokens) for _ in range(n)]
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
                raise RuntimeError(f"the server returned {tokens} tokens, expected {settings.output_tokens}")
            with lock:
                results.append(request_metrics(sent, times, tokens))

    def level() -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(worker) for _ in range(concurrency)]:
                f.result()
        return time.perf_counter() - t0

    counters = getattr(server, "itl_counters", lambda: None)
    before = counters()
    wall_s, sample = contention.timed(level, threshold, pids)
    after = counters()
    out = summarize_level(results, concurrency=concurrency, wall_s=wall_s, slo_ttft_s=settings.slo_ttft_ms / 1000,
                          slo_tpot_s=settings.slo_tpot_ms / 1000)
    if before is not None and after is not None and after[1] > before[1]:
        # the engine's own inter-token latency over this level (warm-up excluded: read after it)
        out["server_itl_s_mean"] = (after[0] - before[0]) / (after[1] - before[1])
    out["requests_planned"] = n
    out["capped"] = capped[0]
    return out, sample


def sweep(server, pids, settings, vocab: int, threshold: float, label: str = "") -> list[dict]:
    """Every concurrency level of `settings.concurrency`; a contended level is run again (at most
    `settings.retries` times), then flagged."""
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
        itl = f" (server ITL {1000 * lv['server_itl_s_mean']:.1f} ms)" if "server_itl_s_mean" in lv else ""
        log.info("stage serve: %sconcurrency %d: TTFT p50 %.0f ms p99 %.0f ms, TPOT p50 %.1f ms p99 %.1f ms%s, "
                 "%.1f output tok/s, goodput %.2f req/s (%d requests)%s", label, c, 1000 * lv["ttft_s_p50"],
                 1000 * lv["ttft_s_p99"], 1000 * lv["tpot_s_p50"], 1000 * lv["tpot_s_p99"], itl,
                 lv["output_tok_per_sec"], lv["goodput_requests_per_sec"], lv["requests"],
                 ", CONTENDED" if lv["contention"]["contended"] else "")
    return levels
