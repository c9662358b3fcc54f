"""Speed ratios under the same conditions: the baseline and a variant decoded in alternating rounds, the ratio
taken within each round, and a distribution-free interval over the rounds.

Why not divide two medians: the rows of a run are timed minutes apart, and a shared machine changes in minutes (a
job starts on the other core, the hypervisor lends our CPU to another guest). The quotient of two medians taken at
different times is then the effect of *when* each was timed: on the 2-core VM this was written on, a W4A16 row
timed while the baseline had been timed under load read "2.1x the baseline" although it decodes fp32 weights like
the baseline. Here both checkpoints are loaded in one process and timed back to back, round after round, in the
order A B, B A, A B, ... (the order alternates so that neither always runs second, with warm caches); a load that
comes and goes slows both halves of a round alike, and each round's ratio b/a cancels it.

The interval: the ratios of n rounds are not normal (a burst of load gives one outlier), so the interval is the
order-statistic one for their median (the sign-test interval): [r_(k), r_(n+1-k)] covers the median with
probability 1 - 2 P(Binomial(n, 1/2) < k), whatever the distribution. With 8 rounds the 95% interval is
[min, max] (99.2% coverage); 12 rounds give [r_(3), r_(10)] (96.1%). An interval that contains 1.0 is reported as
"no measurable difference", never as a speed-up or a slow-down.

Fewer rounds when they already say it: with `width` set, the rounds stop as soon as the quiet ones are enough for
the interval to have its coverage (6 at 95%) and that interval is no wider than `width` times its median: a row
whose ratio is 0.80 [0.79, 0.82] after 6 rounds would only narrow it with 8, at a fifth of a row's speed-stage
time. A wide interval (a noisy row) still gets every round.

Each timed run is also bracketed by eval/contention: a round in which either run was contended is timed again
(at most `retries` more rounds), and when `rounds` quiet rounds were not had by then, the ratio comes from every
round and is flagged `contended`. Works for any two engines that give a batch-1 `open_decoder` (transformers,
llama.cpp, and vLLM servers: eval/served.py interleaves a vLLM row with the run's baseline in transformers).
"""

from __future__ import annotations

import statistics
from math import comb

from eval import contention

LEVEL = 0.95  # the interval's nominal coverage
METHOD = ("interleaved rounds A B / B A in one process, ratio per round, median with its distribution-free "
          "(sign-test) interval")


def median_interval(values: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(lo, hi, coverage): the narrowest order-statistic interval [x_(k), x_(n+1-k)] whose coverage of the median,
    1 - 2 P(Bin(n, 1/2) <= k - 1), is at least `level`. With too few values for `level` it is [min, max] and the
    coverage returned is lower than asked (6 values: 96.9%; 5: 93.8%), so the caller can say so."""
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("no values")
    k, coverage = 1, 1 - 2 / 2 ** n
    for j in range(2, n // 2 + 1):
        cov = 1 - 2 * sum(comb(n, i) for i in range(j)) / 2 ** n
        if cov < level:
            break
        k, coverage = j, cov
    return x[k - 1], x[n - k], coverage


def verdict(lo: float, hi: float) -> str:
    """What an interval of speed ratios (variant / baseline) lets one say."""
    if lo <= 1.0 <= hi:
        return "no measurable difference"
    return "faster" if lo > 1.0 else "slower"


def fewest_rounds(level: float = LEVEL) -> int:
    """The fewest values whose median interval has coverage `level` ([min, max]: 1 - 2 / 2^n >= level)."""
    n = 1
    while 1 - 2 / 2 ** n < level:
        n += 1
    return n


def tight(ratios: list[float], width: float | None, level: float = LEVEL) -> bool:
    """Whether quiet rounds with these ratios may stop: enough of them for the interval's coverage, and the interval
    within `width` x its median (None: never early)."""
    if width is None or len(ratios) < fewest_rounds(level):
        return False
    lo, hi, _ = median_interval(ratios, level)
    return hi - lo <= width * statistics.median(ratios)


def interleave(run_a, run_b, *, new_tokens: int, rounds: int, retries: int = 0,
               threshold: float = contention.THRESHOLD, level: float = LEVEL, pids=None,
               width: float | None = None) -> dict:
    """Alternate `run_a` (the baseline) and `run_b` (the variant), each `() -> (ttft_s, decode_s, tokens)` of a
    batch-1 greedy decode of `new_tokens` tokens, until `rounds` quiet rounds are had (or fewer that are `tight`
    within `width`) or `rounds + retries` were run; return the ratio b/a per round, its median and interval, each
    side's median tok/s over the same rounds, and the contention of every timed window. `pids`: a callable giving
    the server processes that decode for us (vLLM's), whose CPU time is ours, not contention."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    steps = new_tokens - 1
    run_a(), run_b()  # warm-up of both (allocator, decompression, kernels), outside the rounds
    per_round, samples = [], []

    def quiet_ratios() -> list[float]:
        return [r["ratio"] for r in per_round if not r["contended"]]

    while (len(quiet_ratios()) < rounds and len(per_round) < rounds + retries
           and not tight(quiet_ratios(), width, level)):
        order = "ab" if len(per_round) % 2 == 0 else "ba"
        tok, seen = {}, {}
        for side in order:
            (_, decode_s, produced), sample = contention.timed(run_a if side == "a" else run_b, threshold, pids)
            if produced != new_tokens:
                raise RuntimeError(f"decode loop produced {produced} tokens, expected {new_tokens}")
            tok[side], seen[side] = steps / decode_s, sample
            samples.append(sample)
        per_round.append({"order": order, "baseline_tok_per_sec": tok["a"], "tok_per_sec": tok["b"],
                          "ratio": tok["b"] / tok["a"], "contended": seen["a"]["contended"] or seen["b"]["contended"],
                          "others_cpu_share": max(seen["a"]["others_cpu_share"] or 0, seen["b"]["others_cpu_share"] or 0),
                          "steal_share": max(seen["a"]["steal_share"] or 0, seen["b"]["steal_share"] or 0)})
    quiet = [r for r in per_round if not r["contended"]]
    early = len(quiet) < rounds and tight([r["ratio"] for r in quiet], width, level)
    used = quiet if len(quiet) >= rounds or early else per_round
    lo, hi, coverage = median_interval([r["ratio"] for r in used], level)
    used_samples = [s for i, s in enumerate(samples) if per_round[i // 2] in used]
    return {"ratio": statistics.median(r["ratio"] for r in used), "ratio_lo": lo, "ratio_hi": hi,
            "coverage": coverage, "level": level, "verdict": verdict(lo, hi),
            "rounds": len(used), "rounds_run": len(per_round), "rounds_max": rounds,
            "stopped_early": (f"interval within {width:g} x its median after {len(quiet)} quiet rounds"
                              if early else None),
            "baseline_tok_per_sec": statistics.median(r["baseline_tok_per_sec"] for r in used),
            "tok_per_sec": statistics.median(r["tok_per_sec"] for r in used),
            "contention": contention.summary(samples, used_samples, retries=retries, threshold=threshold),
            "method": METHOD, "per_round": per_round}


def speed_ratio(baseline: dict, variant: dict, *, prompt_tokens: int, new_tokens: int, rounds: int, retries: int,
                threshold: float = contention.THRESHOLD, width: float | None = None) -> dict:
    """Load both checkpoints (each an eval/engines.Row.decoder_spec) in this process and `interleave` them."""
    from eval.engines import open_decoder

    a_run, a_close, a_info = open_decoder(baseline, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    b_run, b_close, b_info = open_decoder(variant, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    try:
        out = interleave(a_run, b_run, new_tokens=new_tokens, rounds=rounds, retries=retries, threshold=threshold,
                         width=width)
    finally:
        b_close()
        a_close()
    return {**out, "baseline_engine": a_info, "engine": b_info, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "batch": 1}


def speed_ratio_in_subprocess(baseline: dict, variant: dict, **kwargs) -> dict:
    """`speed_ratio` in a fresh process (compress/worker.py): the run's own memory and threads stay out of it."""
    from compress.worker import run_worker

    return run_worker("eval.interleaved", {"baseline": baseline, "variant": variant, **kwargs},
                      f"interleaved speed-ratio worker for {variant.get('folder') or variant.get('path')}")


if __name__ == "__main__":  # the worker of speed_ratio_in_subprocess
    from compress.worker import serve

    serve(speed_ratio)
