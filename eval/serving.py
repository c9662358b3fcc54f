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
"""

from __future__ import annotations

import math


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
