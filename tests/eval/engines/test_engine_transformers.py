"""The transformers engine's decode benchmark on a tiny model: exact token counts, figures in range."""

from __future__ import annotations

import math

import pytest

from eval.engines.transformers import decode_benchmark


def test_decode_benchmark_on_tiny_model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    res = decode_benchmark(model, tok, prompt_tokens=16, new_tokens=8, batch_sizes=(1, 4), repeats=2, device="cpu")
    assert res["engine"] == "transformers-eager" and res["device"] == "cpu" and res["dtype"] == "float32"
    assert (res["repeats"], res["prompt_tokens"], res["new_tokens"]) == (2, 16, 8)
    assert set(res["batches"]) == {"1", "4"}
    for b in res["batches"].values():
        assert b["tokens_decoded"] == 8 and b["decode_steps"] == 7
        for key in ("tok_per_sec", "tok_per_sec_min", "tok_per_sec_max", "ttft_s", "ms_per_token"):
            assert b[key] > 0 and math.isfinite(b[key])
        assert b["tok_per_sec_min"] <= b["tok_per_sec"] <= b["tok_per_sec_max"]
    assert res["memory_kind"] == "rss" and res["peak_memory_bytes"] > 0 and res["rss_now_bytes"] > 0
    assert res["rss_now_bytes"] <= res["peak_memory_bytes"] and res["ru_maxrss_bytes"] > 0
    assert res["weight_bytes_in_memory"] == sum(p.numel() * 4 for p in model.parameters())


def test_decode_benchmark_rejects_single_token():
    with pytest.raises(ValueError):
        decode_benchmark(None, None, new_tokens=1)
