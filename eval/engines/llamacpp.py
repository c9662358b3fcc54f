"""The llama.cpp engine: a GGUF file's logits for the perplexity windows, and its batch-1 decode benchmark, through
compress/llamacpp.py (the one module that imports llama_cpp).

Why measure GGUF rows in llama.cpp: on a CPU, transformers runs any quantized checkpoint by decompressing it to fp32,
so decode reads fp32 weights whatever the format. llama.cpp's kernels read the quantized blocks directly and multiply
them with 8-bit activations, so a 4-bit file moves ~7x fewer bytes per token; the file's figures are the ones its
users get.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from compress import llamacpp
from eval import contention
from eval.throughput import PROMPT_SENTENCE, check_new_tokens, process_memory, repeat_prompt, roofline, timed_runs

log = logging.getLogger("compress")


def key_settings(settings: dict) -> dict:
    """The settings a GGUF row's figures depend on: llama.cpp's attention kernel changes its logits and speed."""
    return {**settings, "llamacpp_flash_attention": llamacpp.FLASH_ATTENTION}


@contextmanager
def scorer(row, context: int, model):
    """Perplexity from llama.cpp on the row's GGUF file, closed after the block (`model` is not used)."""
    gguf = load(row.path, context)
    try:
        yield gguf
    finally:
        gguf.close()


def decoder_args(row, t, device: str, dtype: str) -> dict:
    """`open_decoder`'s arguments for this row (eval/engines.Row.decoder_spec)."""
    return {"path": str(row.path), "threads": t.llamacpp_threads}


def benchmark(row, name: str, t, device: str, dtype: str, **shape) -> dict:
    """`decode_benchmark` of the row's GGUF file with `t.llamacpp_threads`, in its own process (batch 1)."""
    log.info("stage throughput: %s with llama.cpp (%s threads), %d prompt + %d new tokens, batch 1, %d repeats "
             "(own process)", name, t.llamacpp_threads or "all", t.prompt_tokens, t.new_tokens, t.repeats)
    return decode_benchmark_in_subprocess(row.path, threads=t.llamacpp_threads, **shape)


def load(path: Path, context: int) -> llamacpp.GGUFModel:
    """llama.cpp on one GGUF file, giving logits per window (what eval/perplexity.py reads)."""
    return llamacpp.GGUFModel(path, context=context)


def _one_run(llm, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
    """Greedy decode of exactly `new_tokens` tokens (no stop at EOS). Returns (ttft_s, decode_s, tokens)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = int(llamacpp.last_logits(llm).argmax())
    t1 = time.perf_counter()
    produced = 1
    for _ in range(new_tokens - 1):
        llm.eval([tok])
        tok = int(llamacpp.last_logits(llm).argmax())
        produced += 1
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, produced


def open_decoder(path, *, prompt_tokens: int, new_tokens: int, threads: int | None):
    """One GGUF file in llama.cpp as a batch-1 timed decode `one_run() -> (ttft_s, decode_s, tokens)` on the
    benchmark prompt, its close(), and what it runs on. Used by `decode_benchmark` and eval/interleaved."""
    from compress.environment import available_cores

    check_new_tokens(new_tokens)
    llama_cpp = llamacpp.require()
    threads = threads or available_cores()
    llm = llamacpp.load(Path(path), n_ctx=prompt_tokens + new_tokens + 8, threads=threads)
    ids = repeat_prompt(llm.tokenize(PROMPT_SENTENCE.encode(), add_bos=False, special=False), prompt_tokens)
    info = {"engine": "llama.cpp", "engine_version": f"llama-cpp-python {llama_cpp.__version__}", "threads": threads,
            "device": "cpu"}
    return (lambda: _one_run(llm, ids, new_tokens)), llm.close, info


def decode_benchmark(path: Path, *, prompt_tokens: int, new_tokens: int, repeats: int, threads: int | None,
                     bandwidth_bytes_per_sec: float, retries: int = 0,
                     threshold: float = contention.THRESHOLD) -> dict:
    """Batch-1 decode of one GGUF file with llama.cpp: TTFT, decode tok/s (eval/throughput.timed_runs), peak RSS of
    this process, and the roofline with the file's tensor bytes as the bytes read per token (llama.cpp reads the
    quantized blocks as they are) plus its F16 KV cache at the mean context.

    The prompt is the benchmark sentence tokenized by llama.cpp itself, repeated and cut to `prompt_tokens`, as the
    transformers engine does with its tokenizer. The output dict has the same keys, for batch "1" only.
    """
    from compress import gguf_file

    summary = gguf_file.summarize(path)
    one_run, close, info = open_decoder(path, prompt_tokens=prompt_tokens, new_tokens=new_tokens, threads=threads)
    one = timed_runs(one_run, batch=1, new_tokens=new_tokens, repeats=repeats, retries=retries, threshold=threshold)
    mean_context = prompt_tokens + new_tokens // 2
    kv = gguf_file.kv_bytes(summary, mean_context)
    res = {
        **info,
        "weight_repacking": llamacpp.weight_repacking(),
        "flash_attention": llamacpp.FLASH_ATTENTION,
        "cpu_features": llamacpp.system_info(),
        # the largest tensor type in the file ('Q5_0' for SmolLM2's "Q4_K_M"), which is what decode mostly reads
        "dtype": f"GGUF, mostly {next(iter(summary['types']), '?')}",
        "batches": {"1": one},
        "weight_bytes_in_memory": summary["tensor_bytes"],
        "weight_bytes_stored": summary["file_bytes"],
        "repeats": repeats,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "kv_context_tokens": mean_context,
        **process_memory(),
        "roofline": {"1": roofline(summary["tensor_bytes"], kv, bandwidth_bytes_per_sec, one["tok_per_sec"],
                                   batch=1, weight_bytes_stored=summary["file_bytes"])},
        "folder": str(Path(path).parent),
        "file": str(path),
    }
    close()
    return res


def decode_benchmark_in_subprocess(path: Path, **kwargs) -> dict:
    """`decode_benchmark` in a fresh Python process, so its peak RSS is this file's alone (compress/worker.py)."""
    from compress.worker import run_worker

    return run_worker("eval.engines.llamacpp", {"path": str(path), **kwargs}, f"llama.cpp throughput worker for {path}")


if __name__ == "__main__":  # the worker of decode_benchmark_in_subprocess
    from compress.worker import serve

    serve(lambda path, **kw: decode_benchmark(Path(path), **kw))
