"""KV formula, roofline arithmetic and bandwidth probe (no timing targets:
speed is for benchmarks/decode_speed.py, not for unit tests)."""

from __future__ import annotations

import math

import pytest

from compress.planner import kv_bytes
from eval.throughput import measure_bandwidth, roofline


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
