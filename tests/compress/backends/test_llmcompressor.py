"""Every method on a tiny random Llama, through the whole pipeline: the checkpoint reloads with plain transformers,
its config is what vLLM reads, symmetric schemes store no zero points, and the logits stay near the baseline's."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress import run as run_mod
from compress.recipe import load_recipe, parse_variant
from compress.backends.llmcompressor import quantized_input_widths, weight_scheme
from conftest import ROOT, write_recipe

TINY_VARIANTS = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())["variants"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, calib_file):
    tmp = tmp_path_factory.mktemp("quant")
    recipe_path = write_recipe(tmp, tiny_model, calib_file, TINY_VARIANTS)
    code = run_mod.run(load_recipe(recipe_path), recipe_path)
    results = json.loads((tmp / "run" / "results.json").read_text())
    return code, {r["name"]: r for r in results["variants"]}, results


def _logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return model(**tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")).logits


def _tensor_names(folder: Path) -> list[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return list(f.keys())


def test_all_variants_ok_with_required_fields(tiny_run):
    code, records, results = tiny_run
    assert code == 0
    assert list(records) == [v["name"] for v in TINY_VARIANTS]
    for r in records.values():
        assert r["status"] == "ok", r
        for field in ("name", "method", "scheme", "size_bytes", "compress_seconds", "checkpoint",
                      "selfcheck_max_abs_diff", "environment"):
            assert field in r, field
        assert r["selfcheck_max_abs_diff"] <= 1e-3
        assert {"device", "torch", "transformers", "llmcompressor"} <= set(r["environment"])
        assert r["compress_peak_memory_bytes"] > 10e6 and r["compress_peak_memory_kind"] == "rss"
    assert results["environment"]["device"] == "cpu"


@pytest.mark.parametrize("name", [v["name"] for v in TINY_VARIANTS if v["method"] != "baseline"])
def test_checkpoint_config_is_compressed_tensors(tiny_run, name):
    record = tiny_run[1][name]
    folder = Path(record["checkpoint"])
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] in ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    weights = group["weights"]
    assert weights["num_bits"] == record["bits"]
    assert weights["group_size"] == record["group_size"]
    names = _tensor_names(folder)
    zero_points = [n for n in names if n.endswith("weight_zero_point")]
    if weights["symmetric"]:
        assert not zero_points, zero_points
    else:
        assert zero_points and record["method"] == "awq"
    assert "lm_head.weight" in names  # ignored: kept unquantized
    assert not any(n.startswith("lm_head.") and "scale" in n for n in names)
    for f in ("tokenizer.json", "generation_config.json", "README.md", "manifest.json", "compress-recipe.yaml",
              "recipe.yaml"):
        assert (folder / f).is_file(), f
    card = (folder / "README.md").read_text()
    assert "vllm serve" in card and record["scheme"] in card


def test_activation_schemes(tiny_run):
    records = tiny_run[1]
    for name, kind in (("w8a8-int8", "int"), ("fp8-dynamic", "float")):
        qc = json.loads((Path(records[name]["checkpoint"]) / "config.json").read_text())["quantization_config"]
        acts = qc["config_groups"]["group_0"]["input_activations"]
        assert acts["type"] == kind and acts["dynamic"] is True and acts["strategy"] == "token"


def test_quantized_logits_near_baseline_and_8_bit_closer_than_4(tiny_run):
    records = tiny_run[1]
    base = _logits(Path(records["baseline"]["checkpoint"]))
    err = {}
    for name, r in records.items():
        if name != "baseline":
            err[name] = float((_logits(Path(r["checkpoint"])) - base).abs().mean() / base.abs().mean())
    assert all(0 < e < 0.5 for e in err.values()), err
    assert err["rtn-w8a16"] < err["rtn-w4a16"] / 4, err


def test_4_bit_weights_are_packed_small(tiny_run):
    records = tiny_run[1]
    base = records["baseline"]["weights_bytes"]
    assert records["rtn-w4a16"]["weights_bytes"] < 0.6 * base
    assert records["rtn-w4a16"]["weights_bytes"] < records["rtn-w8a16"]["weights_bytes"]


def test_weight_scheme_for_vllm():
    s = weight_scheme(parse_variant(dict(name="g", method="gptq", bits=4, group_size=128)))
    assert (s.weights.num_bits, s.weights.strategy, s.weights.group_size, s.weights.symmetric) == (4, "group", 128, True)
    assert s.input_activations is None
    ch = weight_scheme(parse_variant(dict(name="r", method="rtn", bits=8)))
    assert ch.weights.strategy == "channel" and ch.weights.group_size is None


def test_quantized_input_widths_respects_ignore(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    widths = quantized_input_widths(config, ["lm_head"])
    assert "lm_head" not in widths and widths["model.layers.0.mlp.down_proj"] == 128
    assert set(widths.values()) == {64, 128}
    assert "model.layers.1.mlp.up_proj" not in quantized_input_widths(config, ["lm_head", "re:.*mlp.up_proj"])


def test_offloaded_model_compresses_like_in_memory(tmp_path, tiny_model, calib_file, monkeypatch):
    """A memory budget smaller than the model: most weights wait on disk, calibration runs layer by layer, and the
    checkpoint equals the in-memory one."""
    from compressed_tensors.offload import get_offloaded_device

    from compress.backends import llmcompressor as quantize

    weights_bytes = (tiny_model / "model.safetensors").stat().st_size
    disk_modules = []
    from compress import load

    real = load.load_offloaded

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        disk_modules.extend(n for n, m in model.named_modules() if str(get_offloaded_device(m)) == "disk")
        return model

    monkeypatch.setattr(load, "load_offloaded", spy)
    assert quantize.PIPELINE == "sequential"  # offloading needs the layer-by-layer pipeline, in-memory runs the same
    variants = [{"name": "gptq", "method": "gptq", "bits": 4, "group_size": 32}]
    folders = {}
    for mode in ("memory", "offload"):
        (tmp_path / mode).mkdir()
        recipe_path = write_recipe(tmp_path / mode, tiny_model, calib_file, variants)
        recipe = yaml.safe_load(recipe_path.read_text())
        if mode == "offload":  # a quarter of the model in memory, the rest in a folder that holds a user's file
            (tmp_path / "scratch").mkdir()
            (tmp_path / "scratch" / "notes.txt").write_text("mine")
            recipe["model"]["offload"] = {"max_cpu_memory_gb": weights_bytes / 4 / 1e9,
                                          "folder": str(tmp_path / "scratch")}
        recipe_path.write_text(yaml.safe_dump(recipe))
        assert run_mod.run(load_recipe(recipe_path), recipe_path) == 0
        record = json.loads((tmp_path / mode / "run" / "results.json").read_text())["variants"][1]
        assert record["status"] == "ok" and record["compress_peak_memory_bytes"] > 0
        folders[mode] = Path(record["checkpoint"])
    assert len(disk_modules) > 5, disk_modules  # most Linears really were on disk
    assert record["offload"]["max_cpu_memory_gb"] > 0
    # compress offloaded into a staging folder of its own inside the given folder and deleted only that
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == ["notes.txt"]
    assert (tmp_path / "scratch" / "notes.txt").read_text() == "mine"
    assert torch.allclose(_logits(folders["memory"]), _logits(folders["offload"]), atol=1e-5)


@pytest.mark.parametrize("scheme, group, dtype", [("W4A16", 64, torch.float32), ("W4A16-asym", 32, torch.float32),
                                                   ("W8A16", None, torch.float32), ("FP8-dynamic", None, torch.float32),
                                                   ("NVFP4A16", None, torch.bfloat16),
                                                   ("MXFP4A16", None, torch.bfloat16)])
def test_fake_quantize_weights_is_what_rtn_writes(tiny_model, scheme, group, dtype):
    """The sensitivity analysis's one-unit quantization equals the weights the `rtn` method's checkpoint holds:
    llm-compressor's scales and zero points applied to the original weights, one fused unit (q, k, v; gate, up;
    o; down) at a time, NVFP4's global scale shared within the unit."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from compress.backends.llmcompressor import compress_model, fake_quantize_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).eval()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    v = parse_variant(dict(name="r", method="rtn", scheme=scheme, **({"group_size": group} if group else {})))
    compress_model(model, v, None)
    modules = dict(model.named_modules())
    units = [[f"model.layers.{i}.{part}" for part in unit] for i in range(2) for unit in
             (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))]
    for unit in units:
        ours = fake_quantize_weights([original[n] for n in unit], scheme, group)
        for name, q in zip(unit, ours):
            m = modules[name]
            written = fake_quantize(original[name].float(), m.weight_scale, getattr(m, "weight_zero_point", None),
                                    m.quantization_scheme.weights, global_scale=getattr(m, "weight_global_scale", None))
            assert q.dtype == dtype and q.shape == original[name].shape
            torch.testing.assert_close(q.float(), written.to(dtype).float(), rtol=0, atol=0)
            assert not torch.equal(q, original[name])  # it did round
    assert sum(map(len, units)) == 14  # every quantized Linear of the 2 layers


@pytest.mark.parametrize("method", ["gptq", "smoothquant-gptq"])
def test_one_hessian_product_per_input_is_bit_identical(tiny_model, calib_file, method, monkeypatch):
    """GPTQ with q/k/v (and gate/up) sharing one X Xᵀ per input writes the same weights, bit for bit, as
    llm-compressor's own loop, which computes it once per Linear; and it computes fewer products."""
    import contextlib

    from llmcompressor.modifiers.gptq import helpers

    from compress.backends import llmcompressor as quantize

    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = [json.loads(line)["text"] for line in calib_file.read_text().splitlines()][:4]
    windows = [tok(t)["input_ids"][:16] for t in texts]
    windows = [w for w in windows if len(w) == 16]
    assert len(windows) >= 2
    calls = {"n": 0}
    real = helpers.accumulate_hessian

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr("llmcompressor.modifiers.gptq.base.accumulate_hessian", counting)
    v = parse_variant({"name": "g", "method": method, "bits": 4 if method == "gptq" else 8})
    weights = {}
    for shared in (False, True):
        if not shared:
            monkeypatch.setattr(quantize, "_one_product_per_input", contextlib.nullcontext)
        else:
            monkeypatch.undo()
            monkeypatch.setattr("llmcompressor.modifiers.gptq.base.accumulate_hessian", counting)
        calls["n"] = 0
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        quantize.compress_model(model, v, windows)
        quantize.release_session()
        weights[shared] = ({n: t.detach().clone() for n, t in model.state_dict().items()}, calls["n"])
    (loop, loop_calls), (ours, our_calls) = weights[False], weights[True]
    assert our_calls < loop_calls  # 7 Linears per layer read 4 distinct inputs
    assert loop.keys() == ours.keys()
    for name in loop:
        assert torch.equal(loop[name], ours[name]), name
