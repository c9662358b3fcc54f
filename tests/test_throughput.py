"""Decode benchmark, KV formula, roofline arithmetic and bandwidth probe on the tiny random Llama (no timing targets:
speed is for benchmarks/decode_speed.py, not for unit tests)."""

from __future__ import annotations

import math

import pytest

from compress.throughput import decode_benchmark, kv_bytes, measure_bandwidth, roofline


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


def test_kv_bytes_by_hand():
    from transformers import LlamaConfig

    tiny = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300)
    assert kv_bytes(tiny, 24, 4, 4) == 2 * 2 * 2 * (64 // 4) * 24 * 4 * 4 == 49152
    mha = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=None, vocab_size=300)
    assert kv_bytes(mha, 10, 1, 2) == 2 * 3 * 4 * 16 * 10 * 1 * 2


def test_roofline_arithmetic():
    r = roofline(weight_bytes=9e7, kv_bytes_at_context=1e7, bandwidth_bytes_per_sec=1e9, measured_tok_per_sec=5)
    assert r["bytes_per_token"] == pytest.approx(1e8)
    assert r["bound_tok_per_sec"] == pytest.approx(10)
    assert r["utilisation"] == pytest.approx(0.5)
    # batching shares the weight read: 4 sequences on the same bytes -> 4x the bound
    r4 = roofline(9e7, 1e7, 1e9, 20, batch=4, weight_bytes_stored=3e7)
    assert r4["bound_tok_per_sec"] == pytest.approx(40) and r4["utilisation"] == pytest.approx(0.5)
    assert r4["weight_bytes_stored"] == 3e7


def test_measure_bandwidth_small():
    bw = measure_bandwidth(size_bytes=8 << 20, repeats=2)
    assert bw["bytes_per_sec"] > 0 and math.isfinite(bw["bytes_per_sec"])
    assert bw["bytes_per_sec_min"] <= bw["bytes_per_sec"] <= bw["bytes_per_sec_max"]
    assert "8 MiB" in bw["method"] and bw["device"] == "cpu"
    # the bound is the faster read probe, never the copy (which counts writes decode does not do)
    assert set(bw["read_probes_bytes_per_sec"]) == {"torch.sum", "torch.mv"}
    assert bw["bytes_per_sec"] == max(bw["read_probes_bytes_per_sec"].values())
    assert bw["copy_bytes_per_sec"] > 0 and math.isfinite(bw["copy_bytes_per_sec"])
