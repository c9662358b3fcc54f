"""The formats table (compress/backends/llmcompressor.py METHODS x SCHEMES) on a tiny random Llama: every scheme a
method can write builds, reloads in transformers and says what it is; the table alone decides what a recipe may ask;
and a method added to the table is validated, keyed, built and reported with no edit anywhere else."""

import json
from pathlib import Path

import pytest

from compress import checks
from compress import run as run_mod
from compress.backends import llmcompressor as lc
from compress.recipe import InputError, load_recipe, parse_variant
from conftest import write_recipe

# every scheme through round to nearest (the tiny model's 64 and 128 widths are not multiples of FP8-block's 128:
# that one is the shape check's test below), and each other method on a scheme it adds; the fp4 schemes build and
# reload only from a bf16 model, so they have a run of their own in bf16
def _rtn(scheme: str) -> dict:
    group = {"group_size": 32} if lc.SCHEMES[scheme].groupable else {}
    return {"name": f"rtn-{scheme.lower()}", "method": "rtn", "scheme": scheme, **group}


FP4 = [s for s, f in lc.SCHEMES.items() if f.model_dtype == "bfloat16"]
TINY_FORMATS = ([_rtn(s) for s in lc.SCHEMES if s not in FP4 and s != "FP8-block"]
                + [{"name": "gptq-w4a8", "method": "gptq", "scheme": "W4A8-INT", "group_size": 32},
                   {"name": "autoround-w4a16", "method": "autoround", "scheme": "W4A16", "group_size": 32, "iters": 2},
                   {"name": "spinquant-w4a16", "method": "rtn", "scheme": "W4A16", "group_size": 32,
                    "rotate": "spinquant"}])
TINY_FP4 = [_rtn(s) for s in FP4]


@pytest.fixture(scope="module")
def formats_run(tmp_path_factory, tiny_model, calib_file):
    records = {}
    for dtype, variants in (("float32", TINY_FORMATS), ("bfloat16", TINY_FP4)):
        tmp = tmp_path_factory.mktemp(f"formats-{dtype}")
        recipe_path = write_recipe(tmp, tiny_model, calib_file, variants,
                                   model={"source": str(tiny_model), "dtype": dtype, "device": "cpu"})
        run_mod.run(load_recipe(recipe_path), recipe_path)
        results = json.loads((tmp / "run" / "results.json").read_text())
        records.update({r["name"]: {**r, "dtype_bits": 32 if dtype == "float32" else 16} for r in results["variants"]})
    return records


@pytest.mark.parametrize("variant", TINY_FORMATS + TINY_FP4, ids=lambda v: v["name"])
def test_every_scheme_builds_reloads_and_says_what_it_is(formats_run, variant):
    r = formats_run[variant["name"]]
    assert r["status"] == "ok", r.get("error")
    assert r["selfcheck_max_abs_diff"] <= 1e-3  # reloaded by transformers, same logits as in memory
    s = lc.SCHEMES[variant["scheme"]]
    fmt = r["format"]
    assert (fmt["scheme"], fmt["preset"], fmt["rotate"]) == (variant["scheme"], s.preset, variant.get("rotate"))
    assert fmt["bits_per_weight"] == pytest.approx(s.bits_per_weight(variant.get("group_size"), r["dtype_bits"]))
    qc = json.loads((Path(r["checkpoint"]) / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == s.bits
    assert (group["input_activations"] is None) == (s.activations == "16-bit")
    card = (Path(r["checkpoint"]) / "README.md").read_text()
    assert f"preset `{s.preset}`" in card and "reference, read from vLLM" in card


def test_calibrated_schemes_read_calibration_text(formats_run):
    """Static activation scales (FP8-static, NVFP4's global scale) are observed: those rows record their data."""
    for name, r in formats_run.items():
        scheme = next((v["scheme"] for v in TINY_FORMATS + TINY_FP4 if v["name"] == name), None)
        if scheme:
            calibrated = lc.SCHEMES[scheme].calibrates or lc.METHODS[r["method"]].calibrates
            assert bool(r["calibration"]) == calibrated, name


def test_a_group_the_model_does_not_divide_is_exit_2_before_any_work(tmp_path, tiny_model, calib_file):
    recipe_path = write_recipe(tmp_path, tiny_model, calib_file, [{"name": "b", "method": "rtn", "scheme": "FP8-block"}])
    with pytest.raises(InputError, match=r"variants\[0\]\.scheme: 'FP8-block' has groups of 128 inputs, which do not "
                                         r"divide the input width"):
        checks.check_inputs(load_recipe(recipe_path), recipe_path, prepare=False)
    assert not (tmp_path / "run").exists()


def test_an_fp4_scheme_in_an_fp32_run_is_exit_2_before_any_work(tmp_path, tiny_model, calib_file):
    recipe_path = write_recipe(tmp_path, tiny_model, calib_file, [_rtn("NVFP4A16")])
    with pytest.raises(InputError, match=r"variants\[0\]\.scheme: 'NVFP4A16' builds and reloads only from a bfloat16 "
                                         r"model .*this run computes in float32: set model.dtype: bfloat16"):
        checks.check_inputs(load_recipe(recipe_path), recipe_path, prepare=False)


def test_a_missing_optional_package_names_its_pip_line(tmp_path, tiny_model, calib_file, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "auto_round" else real(name, *a))
    recipe_path = write_recipe(tmp_path, tiny_model, calib_file, [{"name": "a", "method": "autoround"}])
    with pytest.raises(InputError, match=r"variants\[0\]\.method: 'autoround' needs auto-round, which is not "
                                         r"installed; install it: pip install auto-round==0\.15\.1"):
        checks.check_backends(load_recipe(recipe_path), recipe_path)


def test_a_method_added_to_the_table_alone_is_validated_keyed_built_and_reported(tmp_path, tiny_model, calib_file,
                                                                               monkeypatch):
    """README "How to add a method": one METHODS entry. Nothing else is edited: the recipe accepts it (and refuses
    a scheme it does not write), it has its own cache key, it builds and reloads, and the report shows its row."""
    toy = lc.Method(schemes=("W8A16",), first_schemes=(), calibrates=False, options={},
                    modifiers=lambda lib, v, q, dtype: [lib.quantization.QuantizationModifier(**q)],
                    what="toy: round to nearest under another name")
    monkeypatch.setitem(lc.METHODS, "toy", toy)
    with pytest.raises(Exception, match="method 'toy' cannot write 'W4A16'; it writes \\['W8A16'\\]"):
        parse_variant({"name": "t", "method": "toy", "scheme": "W4A16"})
    ours, rtn = parse_variant({"name": "t", "method": "toy"}), parse_variant({"name": "t", "method": "rtn", "bits": 8})
    assert (ours.scheme, ours.label) == ("W8A16", "W8A16-channel") and ours.key_fields() != rtn.key_fields()

    recipe_path = write_recipe(tmp_path, tiny_model, calib_file, [{"name": "toy-w8", "method": "toy"}])
    assert run_mod.run(load_recipe(recipe_path), recipe_path) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    row = next(r for r in results["variants"] if r["name"] == "toy-w8")
    assert (row["status"], row["method"], row["scheme"]) == ("ok", "toy", "W8A16-channel")
    assert row["format"]["method"] == "toy: round to nearest under another name"
    assert "toy-w8" in (tmp_path / "run" / "report.md").read_text()


def test_compress_formats_prints_the_table(capsys):
    from compress import cli

    assert cli.main(["formats", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["scheme"]: r for r in out["schemes"]}
    assert set(rows) == set(lc.SCHEMES) and set(out["methods"]) == set(lc.METHODS)
    assert rows["W4A16"]["bits_per_weight"] == 4.25 and rows["NVFP4"]["bits_per_weight"] == 4.5
    assert "autoround" in rows["W4A16"]["methods"] and rows["FP8-static"]["calibrated"]
    assert cli.main(["formats"]) == 0 and "REFERENCE" in capsys.readouterr().out


def test_spinquant_rotates_widths_that_are_not_powers_of_two(tmp_path):
    """SmolLM2's hidden size is 576 = 16 x 36: a random Hadamard rotation (a known 12 x 12 factor here: hidden 48,
    head_dim 12) where the deterministic one takes powers of two only. The rotation is fused into the weights, and a
    rebuild is bit-identical (the cache relies on it). Not asserted: closeness to the original model, which
    llm-compressor 0.14's SpinQuant does not keep on a Llama even unquantized (it centers the embeddings, exact only
    before a LayerNorm; an RMSNorm model changes, as the measured KL of a spinquant row shows)."""
    import torch
    from transformers import AutoModelForCausalLM

    from compress.backends.llmcompressor import compress_model, release_session
    from conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "tiny-48", hidden_size=48, intermediate_size=96)
    variant = parse_variant({"name": "s", "method": "rtn", "scheme": "W8A16", "rotate": "spinquant"})
    ids = torch.tensor([[5, 9, 13, 21, 34, 55]])
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    built = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        compress_model(model, variant, None)
        release_session()
        with torch.no_grad():
            built.append((model(ids).logits, {k: v.clone() for k, v in model.state_dict().items()}))
    (logits, weights), (_, again) = built
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                           original.state_dict()["model.layers.0.self_attn.q_proj.weight"])  # it did rotate
    assert logits.isfinite().all()
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
