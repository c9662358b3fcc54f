"""The transformers eager engine: a saved checkpoint loaded as a user would (`from_pretrained`), its logits, and
its decode benchmark on the run's device.

These are figures for eager PyTorch, not for vLLM: eager PyTorch launches one kernel per op, and on CPU transformers
runs compressed-tensors checkpoints by decompressing them to the float dtype on the first forward pass (see
eval/throughput.roofline). They say how this machine runs this checkpoint in transformers; a serving engine with
fused int4 kernels is a different measurement.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from eval import contention
from eval.throughput import PROMPT_SENTENCE, _sync, check_new_tokens, process_memory, repeat_prompt, roofline, timed_runs

log = logging.getLogger("compress")


def key_settings(settings: dict) -> dict:
    """The settings a transformers row's figures depend on: all but llama.cpp's."""
    return {k: v for k, v in settings.items() if not k.startswith("llamacpp_")}


@contextmanager
def scorer(row, context: int, model):
    """Perplexity from the loaded model itself (eval/engines.Row.scorer)."""
    yield model


def decoder_args(row, t, device: str, dtype: str) -> dict:
    """`open_decoder`'s arguments for this row (eval/engines.Row.decoder_spec)."""
    return {"folder": str(row.folder), "device": device, "dtype": dtype}


def benchmark(row, name: str, t, device: str, dtype: str, **shape) -> dict:
    """`benchmark_checkpoint` of the row's folder at `t.batch_sizes`, in its own process."""
    log.info("stage throughput: %s, %d prompt + %d new tokens, batches %s, %d repeats (own process)",
             name, t.prompt_tokens, t.new_tokens, t.batch_sizes, t.repeats)
    return benchmark_checkpoint_in_subprocess(row.folder, batch_sizes=t.batch_sizes, device=device, dtype=dtype,
                                              **shape)


def load_checkpoint(folder: Path, dtype, device: str, gguf_file: str | None = None):
    """A saved checkpoint loaded with plain transformers, as a user would; `gguf_file`: a GGUF file in `folder`,
    dequantized on load (the same weights in float arithmetic)."""
    from transformers import AutoModelForCausalLM

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device, **extra).eval()


def resident_weight_bytes(model) -> int:
    """Bytes of the parameters as they sit in memory now (tied weights counted once).

    For a compressed-tensors checkpoint, call this after the first forward pass: transformers loads the packed int4
    weights, and a pre-forward hook decompresses them to the model's float dtype on that first pass. Before it, this
    returns the packed size; after it, the size decode really reads.
    """
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _one_run(model, input_ids, new_tokens: int, device: str) -> tuple[float, float, int]:
    """Greedy decode of exactly `new_tokens` tokens per sequence. Returns (ttft_s, decode_s, tokens generated per
    sequence).

    The loop is written out instead of calling generate(): generate() stops at EOS and adds logits processors, so the
    number of decoded tokens, and with it tok/s, would depend on what the model happens to say.
    """
    import torch

    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids, use_cache=True)
    next_tok = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    _sync(device)
    t1 = time.perf_counter()
    generated = [next_tok]
    past = out.past_key_values
    for _ in range(new_tokens - 1):
        out = model(next_tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_tok = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        generated.append(next_tok)
    _sync(device)
    t2 = time.perf_counter()
    tokens = torch.cat(generated, dim=1)
    return t1 - t0, t2 - t1, int(tokens.shape[1])


def decoder(model, tokenizer, *, prompt_tokens: int, new_tokens: int, batch: int, device: str):
    """One timed decode of this engine as a call: `one_run() -> (ttft_s, decode_s, tokens per sequence)` on the
    benchmark prompt (`batch` copies of it), what eval/throughput.timed_runs and eval/interleaved time."""
    import torch

    ids = repeat_prompt(tokenizer(PROMPT_SENTENCE, add_special_tokens=False)["input_ids"], prompt_tokens)
    input_ids = torch.tensor([ids] * batch, dtype=torch.long, device=device)

    def one_run():
        with torch.inference_mode():
            return _one_run(model, input_ids, new_tokens, device)

    return one_run


def open_decoder(folder, *, prompt_tokens: int, new_tokens: int, device: str, dtype: str):
    """A checkpoint folder loaded as a user would, as a batch-1 `decoder`, and a close() (nothing to close here:
    the model goes with the call). For eval/interleaved, which alternates two of these."""
    import torch
    from transformers import AutoTokenizer

    model = load_checkpoint(Path(folder), getattr(torch, dtype), device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    one_run = decoder(model, tokenizer, prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch=1, device=device)
    info = {"engine": "transformers-eager", "device": str(device), "dtype": dtype,
            "threads": None if str(device).startswith("cuda") else torch.get_num_threads()}
    return one_run, (lambda: None), info


def decode_benchmark(model, tokenizer, *, prompt_tokens: int = 128, new_tokens: int = 64,
                     batch_sizes=(1, 4), repeats: int = 3, device: str = "cpu", retries: int = 0,
                     threshold: float = contention.THRESHOLD) -> dict:
    """Prefill time (TTFT) and decode tok/s of `model` for each batch size, median and range over `repeats` runs
    after one warm-up, contended runs timed again up to `retries` times (eval/throughput.timed_runs says how they
    are computed).

    Peak memory: on GPU, torch.cuda.max_memory_allocated after resetting the peak (tensors only, not the CUDA
    context). On CPU, the process's peak RSS, which is a lifetime peak: it includes loading and anything the process
    did before, so `rss_now_bytes` (VmRSS after the runs) is reported beside it. Run one checkpoint per process when
    the peaks of two checkpoints must be compared (`benchmark_checkpoint_in_subprocess`).
    """
    import torch

    check_new_tokens(new_tokens)
    on_gpu = str(device).startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    batches = {}
    weight_bytes = None
    for batch in batch_sizes:
        one_run = decoder(model, tokenizer, prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch=batch,
                          device=device)
        batches[str(batch)] = timed_runs(one_run, batch=batch, new_tokens=new_tokens, repeats=repeats,
                                         retries=retries, threshold=threshold)
        if weight_bytes is None:
            weight_bytes = resident_weight_bytes(model)  # after the first forward: decompressed size
    result = {
        "engine": "transformers-eager",
        "threads": None if on_gpu else torch.get_num_threads(),
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "batches": batches,
        "weight_bytes_in_memory": weight_bytes,
        "repeats": repeats,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
    }
    if on_gpu:
        result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        result["memory_kind"] = "cuda_max_allocated"
    else:
        result.update(process_memory())
    return result


def benchmark_checkpoint(folder, *, prompt_tokens: int, new_tokens: int, batch_sizes, repeats: int, device: str,
                         dtype: str, bandwidth_bytes_per_sec: float, retries: int = 0,
                         threshold: float = contention.THRESHOLD) -> dict:
    """Load one checkpoint folder as a user would, run `decode_benchmark`, and add the roofline per batch size.

    The KV read per decode step is taken at the mean context of the decode (prompt + new_tokens / 2).
    """
    import torch
    from transformers import AutoTokenizer

    from compress.checkpoint import weights_size_bytes
    from compress.planner import kv_bytes

    folder = Path(folder)
    model = load_checkpoint(folder, getattr(torch, dtype), device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    res = decode_benchmark(model, tokenizer, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                           batch_sizes=tuple(batch_sizes), repeats=repeats, device=device, retries=retries,
                           threshold=threshold)
    mean_context = prompt_tokens + new_tokens // 2
    kv_dtype_bytes = torch.empty((), dtype=model.dtype).element_size()
    stored = weights_size_bytes(folder)
    res["weight_bytes_stored"] = stored
    res["kv_context_tokens"] = mean_context
    res["roofline"] = {
        b: roofline(res["weight_bytes_in_memory"], kv_bytes(model.config, mean_context, int(b), kv_dtype_bytes),
                    bandwidth_bytes_per_sec, r["tok_per_sec"], batch=int(b), weight_bytes_stored=stored)
        for b, r in res["batches"].items()
    }
    res["folder"] = str(folder)
    return res


def benchmark_checkpoint_in_subprocess(folder, **kwargs) -> dict:
    """`benchmark_checkpoint` in a fresh Python process, so the peak RSS it reports belongs to this checkpoint alone
    (compress/worker.py)."""
    from compress.worker import run_worker

    return run_worker("eval.engines.transformers", {"folder": str(folder), **kwargs},
                      f"throughput worker for {folder}")


if __name__ == "__main__":  # the worker of benchmark_checkpoint_in_subprocess
    from compress.worker import serve

    serve(benchmark_checkpoint)
