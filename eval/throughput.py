"""Decode throughput, engine-neutral: memory bandwidth, the roofline, and the timing and statistics of decode runs.

What a user of a compressed model feels is decode speed: after the prompt is read once (prefill, timed as TTFT),
every further token is one forward pass over a single position per sequence. That pass does little arithmetic per
byte: each weight is read once from memory to produce one token per sequence, plus the KV cache of every earlier
position. So decode is memory-bound, and its ceiling is memory bandwidth / bytes read per step (`roofline`). This
module measures the three numbers that comparison needs: the bandwidth (`measure_bandwidth`), the tokens per second
(`timed_runs`, driven by each engine's decode loop in eval/engines/), and the KV bytes at a given context
(compress.planner.kv_bytes).

Each engine (eval/engines/transformers.py, eval/engines/llamacpp.py) supplies only its own decode loop and what it
reads per token; the warm-up, repeats, medians and memory figures are computed here, the same for every row.
"""

from __future__ import annotations

import resource
import statistics
import time

from compress.environment import proc_status_bytes
from eval import contention

PROMPT_SENTENCE = "The quick brown fox jumps over the lazy dog while the model reads its prompt. "
MiB = 1 << 20
# what `measure_bandwidth` calls the bandwidth, and how rows are judged against it (part of the evaluation cache key)
BANDWIDTH_PROBE = "read-stream, bracketed per row"


def _sync(device: str) -> None:
    """Wait for queued GPU work so the clock measures work done, not work launched (a no-op on CPU)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure_bandwidth(size_bytes: int | None = None, repeats: int = 5, device: str = "cpu") -> dict:
    """The memory bandwidth a decode step can use: how fast this machine streams reads from memory, in bytes/s.

    A batch-1 decode step is a read stream (every weight once, a matrix-vector product over it), so its ceiling is
    the read bandwidth, measured here as two read-only kernels over one tensor much larger than the caches (512 MiB on
    CPU, 2 GiB on GPU by default; smaller and the figure is cache bandwidth, which decode of a real model never
    sees): `tensor.sum()` (a plain vectorised stream) and `torch.mv` over the same bytes viewed as a matrix (the
    decode kernel itself). Each gets one warm-up (page faults, clocks), then the median of `repeats` timed runs (the
    median ignores one run slowed by another process). `bytes_per_sec` -- what every roofline divides by -- is the
    faster of the two medians: the best read rate this machine demonstrably reaches, so no engine is flattered by a
    slow probe (BLAS sgemv reached only 70% of `sum` on the AMD EPYC this was tuned on).

    A copy `dst.copy_(src)` is also timed and kept as `copy_bytes_per_sec` (read + write counted), for reference
    only: it counts writes decode does not do, so it says nothing certain about a read stream. It swings from one
    process to the next, and on some machines it comes out below the read figure (the bandwidth lines of
    benchmarks/results/edge_speed_noamx_build.txt and edge_speed_amx_build.txt).
    """
    import torch

    on_gpu = str(device).startswith("cuda")
    if size_bytes is None:
        size_bytes = (2 << 30) if on_gpu else 512 * MiB
    n = max(1, size_bytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    rows = 4096 if n >= 4096 else 1
    matrix = src[: n - n % rows].view(rows, -1)
    vector = torch.ones(matrix.shape[1], dtype=torch.float32, device=device)
    dst = torch.empty_like(src)

    def rates(fn, nbytes: int) -> list[float]:
        fn()  # warm-up: touches every page, settles clocks
        out = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(nbytes / (time.perf_counter() - t0))
        return out

    copy = rates(lambda: dst.copy_(src), 2 * n * 4)
    del dst
    probes = {"torch.sum": rates(lambda: src.sum(), n * 4),
              "torch.mv": rates(lambda: torch.mv(matrix, vector), matrix.numel() * 4)}
    del src, matrix, vector
    medians = {k: statistics.median(v) for k, v in probes.items()}
    best = max(medians, key=medians.get)
    size_mib = f"{n * 4 / MiB:g} MiB"
    return {
        "bytes_per_sec": medians[best],
        "bytes_per_sec_min": min(probes[best]),
        "bytes_per_sec_max": max(probes[best]),
        "method": (f"read stream: {best} over {size_mib} fp32, median of {repeats} (the faster of "
                   + " / ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in medians.items()) + ")"),
        "device": str(device),
        "read_probes_bytes_per_sec": medians,
        "copy_bytes_per_sec": statistics.median(copy),
        "copy_method": f"torch copy_ of {size_mib} fp32, read+write counted, median of {repeats} (reference only)",
    }


def bracketed(before: dict, after: dict) -> dict:
    """The bandwidth of a measurement taken between two probes: the mean of their figures, both kept.

    On a shared host the read bandwidth a VM gets drifts by tens of percent within minutes (compare the bandwidth
    lines of the edge_speed_* files in benchmarks/results), so each throughput row is judged against probes taken just
    before and just after it rather than against one figure from the start of a long run."""
    out = {**before, "bytes_per_sec": (before["bytes_per_sec"] + after["bytes_per_sec"]) / 2,
           "bytes_per_sec_min": min(before["bytes_per_sec_min"], after["bytes_per_sec_min"]),
           "bytes_per_sec_max": max(before["bytes_per_sec_max"], after["bytes_per_sec_max"]),
           "before_bytes_per_sec": before["bytes_per_sec"], "after_bytes_per_sec": after["bytes_per_sec"]}
    out["method"] = f"mean of probes before and after the row; each: {before['method']}"
    return out


def rebound(rf: dict, bandwidth_bytes_per_sec: float) -> dict:
    """A roofline record recomputed for another bandwidth figure (same bytes, same measured tok/s)."""
    bound = bandwidth_bytes_per_sec / rf["bytes_per_step"] * rf["batch"]
    util = rf["utilisation"] * rf["bound_tok_per_sec"] / bound
    return {**rf, "bandwidth_bytes_per_sec": bandwidth_bytes_per_sec, "bound_tok_per_sec": bound, "utilisation": util}


def repeat_prompt(ids: list[int], prompt_tokens: int) -> list[int]:
    """Exactly `prompt_tokens` ids: the ids of PROMPT_SENTENCE repeated and cut, so every run and every checkpoint
    that shares a tokenizer reads the same prompt (no special tokens, no randomness), in every engine."""
    if not ids:
        raise ValueError("the tokenizer produced no ids for the prompt sentence")
    return (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]


def check_new_tokens(new_tokens: int) -> None:
    """A decode benchmark needs a decode step: the first token comes from prefill. Checked before any loading."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2: the first token comes from prefill, the rest are decode steps")


def timed_runs(one_run, *, batch: int, new_tokens: int, repeats: int, retries: int = 0,
               threshold: float = contention.THRESHOLD) -> dict:
    """Median and range of TTFT and decode tok/s over `repeats` calls of `one_run()` -> (ttft_s, decode_s,
    tokens per sequence), after one untimed warm-up call (allocator, page faults, decompression, kernels).

    TTFT = the prefill that yields the first token; tok/s = batch x (new_tokens - 1) decode steps / their seconds,
    the decode phase only: prefill is a different regime (compute-bound, one big matmul) and is reported as TTFT.
    Every engine's benchmark goes through here, so their rows are computed alike.

    Each timed call is bracketed by eval/contention (other processes' CPU time and steal on our cores). A contended
    call is not counted: another is made instead, at most `retries` more in all. If `repeats` quiet calls were not
    had by then, the figures come from every call and the row's `contention.contended` is true, so the report
    flags it instead of comparing it silently."""
    check_new_tokens(new_tokens)
    steps = new_tokens - 1
    one_run()  # warm-up
    runs, samples = [], []
    while sum(not s["contended"] for s in samples) < repeats and len(runs) < repeats + retries:
        (ttft_s, decode_s, produced), sample = contention.timed(one_run, threshold)
        runs.append((ttft_s, decode_s, produced))
        samples.append(sample)
    quiet = [i for i, s in enumerate(samples) if not s["contended"]]
    used = quiet if len(quiet) >= repeats else list(range(len(runs)))
    counts = [runs[i][2] for i in used]
    if any(c != new_tokens for c in counts):
        raise RuntimeError(f"decode loop produced {counts} tokens per sequence, expected {new_tokens}")
    ttfts = [runs[i][0] for i in used]
    rates = [batch * steps / runs[i][1] for i in used]
    return {"tok_per_sec": statistics.median(rates), "tok_per_sec_min": min(rates), "tok_per_sec_max": max(rates),
            "ttft_s": statistics.median(ttfts), "ttft_s_min": min(ttfts), "ttft_s_max": max(ttfts),
            "ms_per_token": statistics.median(runs[i][1] / steps * 1000 for i in used),
            "tokens_decoded": counts[0],  # per sequence: 1 from prefill + decode_steps
            "decode_steps": steps,
            "contention": contention.summary(samples, [samples[i] for i in used], retries=retries,
                                             threshold=threshold)}


def process_memory() -> dict:
    """This process's peak and current RSS. The peak is VmHWM (the high-water mark of this address space, reset by
    exec) where Linux has it; `ru_maxrss_bytes` is reported too but misleads in a child process: Linux carries the
    parent's RSS at fork time into the child's ru_maxrss, so a worker started by a 1 GB parent shows >= 1 GB
    whatever it loads."""
    rss_now_bytes = proc_status_bytes("VmRSS")  # read before the peak, so that peak >= now
    ru_maxrss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_memory_bytes": proc_status_bytes("VmHWM") or ru_maxrss_bytes, "memory_kind": "rss",
            "ru_maxrss_bytes": ru_maxrss_bytes, "rss_now_bytes": rss_now_bytes}


def roofline(weight_bytes: int, kv_bytes_at_context: int, bandwidth_bytes_per_sec: float,
             measured_tok_per_sec: float, batch: int = 1, weight_bytes_stored: int | None = None) -> dict:
    """The memory-bandwidth ceiling on decode tok/s, and how much of it the measurement reaches.

    Each decode step reads every weight once and the whole KV cache once, and produces one token per sequence; the
    arithmetic per byte is a few FLOPs, far below what any CPU or GPU needs to be compute-bound. So
        bytes_per_step  = weight_bytes + kv_bytes_at_context     (KV for all `batch` sequences)
        bound_tok_per_sec = bandwidth / bytes_per_step x batch
    and utilisation = measured / bound. Batching raises the bound because the weights are read once for all sequences.

    `weight_bytes` must be the bytes actually read per step, which is not always the size on disk. On CPU, transformers
    runs a compressed-tensors (e.g. packed int4) checkpoint by decompressing every Linear to the model's float dtype
    (fp32 here) on the first forward pass, so decode reads fp32 weights: a W4A16 checkpoint four to eight times smaller
    on disk gives no decode speed-up in this engine. Pass `resident_weight_bytes(model)` measured after a forward
    pass, and optionally the on-disk size as `weight_bytes_stored` to show the two side by side. The bound ignores
    activations, the logits and the input-embedding row (small beside the weights) and assumes perfect overlap, so
    utilisation near 1 is the best case, not a target; eager PyTorch at batch 1 is usually well below it.
    """
    bytes_per_step = weight_bytes + kv_bytes_at_context
    bound = bandwidth_bytes_per_sec / bytes_per_step * batch
    out = {
        "bytes_per_token": bytes_per_step / batch,
        "bytes_per_step": bytes_per_step,
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes_at_context,
        "bandwidth_bytes_per_sec": bandwidth_bytes_per_sec,
        "bound_tok_per_sec": bound,
        "utilisation": measured_tok_per_sec / bound,
        "batch": batch,
    }
    if weight_bytes_stored is not None:
        out["weight_bytes_stored"] = weight_bytes_stored
    return out
