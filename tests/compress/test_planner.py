"""The memory planner on Llama-3.1-8B's published shape (config only, nothing downloaded)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from compress.options import KVCache
from compress.planner import (GB, GPUS, format_plan, kv_bytes, kv_bytes_per_token, kv_memory, plan_rows,
                              weight_bytes_estimate)


@pytest.fixture(scope="module")
def llama8b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)


def test_bf16_weights_match_published_parameter_count(llama8b):
    assert weight_bytes_estimate(llama8b, 16, None) == pytest.approx(8.03e9 * 2, rel=0.01)


def test_kv_bytes_8k_bf16_is_one_gib(llama8b):
    assert kv_bytes(llama8b, 8192, 1, 2) == 2 * 32 * 8 * 128 * 8192 * 2 == 1_073_741_824


def test_w4a16_is_well_under_half_of_bf16(llama8b):
    bf16 = weight_bytes_estimate(llama8b, 16, None)
    w4 = weight_bytes_estimate(llama8b, 4, 128)
    assert w4 < 0.4 * bf16
    # lm_head quantized too is smaller still; scales make g128 larger than per-channel
    assert weight_bytes_estimate(llama8b, 4, 128, ignore_lm_head=False) < w4
    assert weight_bytes_estimate(llama8b, 4, None) < w4


def test_fits_table(llama8b):
    rows = plan_rows(llama8b, [("bf16", 16, None), ("w4a16-g128", 4, 128)], context=8192, batch=1)
    bf16 = rows[0]
    assert bf16["total_bytes"] == bf16["weight_bytes"] + 1_073_741_824
    # 16.06 GB + 1.07 GB fits in 24 GB x 0.9 = 21.6 GB; five 8k sequences fit beside the weights on an L4
    assert bf16["gpus"]["L4 24GB"]["fits"]
    assert bf16["gpus"]["L4 24GB"]["max_sequences"] == 5
    assert bf16["gpus"]["A100 40GB"]["fits"]
    assert bf16["gpus"]["A100 40GB"]["max_sequences"] == 18
    # eight concurrent 8k sequences: 16.06 + 8.59 GB does not fit the L4, does fit the A100-40
    wide = plan_rows(llama8b, [("bf16", 16, None)], context=8192, batch=8)[0]
    assert not wide["gpus"]["L4 24GB"]["fits"]
    assert wide["gpus"]["A100 40GB"]["fits"]
    # quantized weights leave room for more sequences on every card
    for gpu, _ in GPUS:
        assert rows[1]["gpus"][gpu]["max_sequences"] >= bf16["gpus"][gpu]["max_sequences"]
    table = format_plan(rows)
    assert "| bf16 | 16.06 |" in table and "H200 141GB" in table and "w4a16-g128" in table


def test_headroom_is_applied(llama8b):
    row = plan_rows(llama8b, [("bf16", 16, None)], context=8192, batch=1, headroom=0.5)[0]
    assert row["gpus"]["L4 24GB"]["usable_bytes"] == 12 * GB
    assert not row["gpus"]["L4 24GB"]["fits"]
    assert row["gpus"]["L4 24GB"]["max_sequences"] == 0


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_estimate_equals_parameter_count_of_a_built_model(tied):
    """The formula counts exactly the parameters transformers creates for a Llama config (x 2 bytes at bf16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert weight_bytes_estimate(config, 16, None) == 2 * params


def _kv(**kw) -> KVCache:
    return KVCache(**kw)


def test_bytes_per_token_smollm2_shape():
    """SmolLM2-135M: 30 layers, 3 KV heads of 64 channels."""
    config = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                             head_dim=64)
    assert kv_bytes_per_token(config, None) == 30 * 2 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(config, _kv(dtype="bf16")) == 23040
    assert kv_bytes_per_token(config, _kv(dtype="fp8")) == 11520  # per-layer scales: nothing per token
    assert kv_bytes_per_token(config, _kv(dtype="int8")) == 30 * (2 * 3 * 64 + 2 * 3 * 4)  # + scale, min
    # int4 KIVI: keys 4 bytes per channel per 32 tokens, values 4 bytes per token and head
    assert kv_bytes_per_token(config, _kv(dtype="int4", granularity="channel")) == 30 * (192 + 24 + 12)
    mem = kv_memory(config, _kv(dtype="fp8"), weight_bytes=10**9, context=4096, batch=2, headroom=0.1)
    h100 = mem["gpus"]["H100 80GB"]
    assert h100["max_sequences"] == int((80e9 * 0.9 - 1e9) // (11520 * 4096))
    assert h100["max_sequences_16bit_kv"] == int((80e9 * 0.9 - 1e9) // (23040 * 4096))
    assert h100["extra_sequences"] == h100["max_sequences"] - h100["max_sequences_16bit_kv"] > 0
    assert mem["bytes_at_context_batch"] == 11520 * 4096 * 2 and mem["ratio_vs_16bit"] == 2
