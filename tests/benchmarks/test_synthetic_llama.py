"""benchmarks/synthetic_llama.py: the random-weight model has the shape asked for, the tokenizer and vocabulary of
the folder it borrows them from, and appears only once complete."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT


@pytest.fixture()
def synthetic(monkeypatch):
    spec = importlib.util.spec_from_file_location("synthetic_llama", ROOT / "benchmarks" / "synthetic_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(module.SHAPES, "tiny", (32, 3, 4, 2, 96))
    return module


def test_build_hf_shape_tokenizer_and_reuse(synthetic, tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = synthetic.build_hf("tiny", tmp_path / "hf", tiny_model, seed=3)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"]) == (32, 3, 4, 2, 96)
    assert cfg["vocab_size"] == json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert cfg["tie_word_embeddings"] is True and "speed" in (out / "SYNTHETIC.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no staging left beside it
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.015 < std < 0.025  # N(0, 0.02), not the all-zero or all-one weights a broken init would give
    text = "The quick brown fox"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(tiny_model)(text).input_ids
    mtime = (out / "config.json").stat().st_mtime_ns
    assert synthetic.build_hf("tiny", out, tiny_model) == out and (out / "config.json").stat().st_mtime_ns == mtime
