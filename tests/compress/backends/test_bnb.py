"""bitsandbytes NF4 and LLM.int8 on the tiny model, through the pipeline: quantized on load, saved before the first
forward (bitsandbytes' CPU repacking is lossy on save), reloaded identically, evaluated, servable with vLLM.
Skipped when bitsandbytes (the `edge` extra) is not installed."""

import json
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

from compress import run as run_mod  # noqa: E402
from compress.recipe import load_recipe, parse_variant  # noqa: E402
from conftest import TEXT, write_recipe  # noqa: E402


def test_quantization_config_maps_the_variant():
    import torch

    from compress.backends.bnb import quantization_config

    nf4 = quantization_config(parse_variant(dict(name="n", method="bnb-nf4", compute_dtype="bfloat16", double_quant=False)),
                              torch.float32)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and not nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16 and nf4.llm_int8_skip_modules == ["lm_head"]
    default = quantization_config(parse_variant(dict(name="n", method="bnb-nf4")), torch.float32)
    assert default.bnb_4bit_use_double_quant and default.bnb_4bit_compute_dtype == torch.float32
    int8 = quantization_config(parse_variant(dict(name="i", method="bnb-int8", ignore=[])), torch.float32)
    assert int8.load_in_8bit and int8.llm_int8_skip_modules is None


def test_nf4_and_int8_build_reload_and_measure(tmp_path, tiny_model, calib_file):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data"
    data.mkdir()
    (data / "text.raw").write_text(" ".join(TEXT * 10))
    variants = [{"name": "baseline", "method": "baseline"}, {"name": "nf4", "method": "bnb-nf4"},
                {"name": "int8", "method": "bnb-int8"}]
    recipe = write_recipe(tmp_path, tiny_model, calib_file, variants, evaluation={
        "selfcheck_prompts": ["The quick brown fox", "def add(a, b):"], "data_dir": str(data),
        "perplexity": {"file": "text.raw", "context": 64, "stride": 64, "max_windows": 4},
        "throughput": {"prompt_tokens": 8, "new_tokens": 4, "batch_sizes": [1], "repeats": 1}})
    assert run_mod.run(load_recipe(recipe), recipe) == 0
    results = {r["name"]: r for r in json.loads((tmp_path / "run" / "results.json").read_text())["variants"]}
    base, nf4, int8 = results["baseline"], results["nf4"], results["int8"]
    for r, cls, fmt in ((nf4, bnb.nn.Linear4bit, "nf4"), (int8, bnb.nn.Linear8bitLt, None)):
        assert r["status"] == "ok" and r["selfcheck_max_abs_diff"] == 0  # reloaded = what was evaluated in memory
        assert r["weights_bytes"] < 0.8 * base["weights_bytes"]
        assert "--quantization bitsandbytes" in r["serve"] and r["bnb"]["bitsandbytes"] == bnb.__version__
        config = json.loads((Path(r["checkpoint"]) / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "bitsandbytes"
        assert config.get("bnb_4bit_quant_type") == fmt if fmt else config["load_in_8bit"]
        model = AutoModelForCausalLM.from_pretrained(r["checkpoint"], dtype=torch.float32)
        assert isinstance(model.model.layers[0].mlp.down_proj, cls)
        assert not isinstance(model.lm_head, cls)  # ignore: [lm_head]
        assert r["kl"]["mean"] > 0 and r["throughput"]["batches"]["1"]["tok_per_sec"] > 0
        assert r["throughput"]["engine"] == "transformers-eager"
        card = (Path(r["checkpoint"]) / "README.md").read_text()
        assert "via bitsandbytes" in card and "--quantization bitsandbytes" in card
    assert nf4["bnb"]["double_quant"] is True and nf4["kl"]["mean"] > int8["kl"]["mean"]  # 4 bits drift further
