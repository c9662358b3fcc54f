"""Recipe validation: good recipes parse, bad ones fail naming the file, the field path and what was expected."""

from pathlib import Path

import pytest
import yaml

from compress.recipe import InputError, load_recipe, parse_variant

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base(**over) -> dict:
    data = {"model": {"source": "smollm2-135m"},
            "calibration": {"source": "c.jsonl", "samples": 8, "seq_len": 64},
            "variants": [{"name": "gptq", "method": "gptq", "bits": 4, "group_size": 64}],
            "output": "runs/x"}
    data.update(over)
    return data


@pytest.mark.parametrize("name", ["smollm2-135m-lab.yaml", "smollm2-135m-kv.yaml", "smollm2-135m-distill.yaml",
                                  "smollm2-135m-edge.yaml", "llama8b-awq.yaml", "tiny.yaml"])
def test_shipped_recipes_parse(name):
    recipe = load_recipe(ROOT / "recipes" / name)
    assert recipe.variants[0].method == "baseline"


def test_baseline_row_is_added_and_defaults_filled(tmp_path):
    recipe = load_recipe(_write(tmp_path, _base()))
    assert [v.name for v in recipe.variants] == ["baseline", "gptq"]
    gptq = recipe.variants[1]
    assert gptq.symmetric is True and gptq.ignore == ["lm_head"] and gptq.label == "W4A16-g64" and gptq.scheme == "W4A16"
    awq = load_recipe(_write(tmp_path, _base(variants=[{"name": "a", "method": "awq", "group_size": 64}])))
    assert awq.variants[1].bits == 4 and awq.variants[1].symmetric is False


@pytest.mark.parametrize("data, where, expected", [
    (_base(extra_key=1), "extra_key", "unknown key"),
    (_base(model={"source": "smollm2-135m", "dtyp": "float32"}), "model.dtyp", "unknown key"),
    (_base(variants=[{"name": "g", "method": "gptq", "group_szie": 64}]), "variants[0].group_szie", "unknown key"),
    (_base(variants=[{"name": "g", "method": "gptq", "bits": 3}]), "variants[0].bits", "writes no scheme with bits=3"),
    (_base(variants=[{"name": "g", "method": "awq", "bits": 8}]), "variants[0].bits", "writes no scheme with bits=8"),
    (_base(variants=[{"name": "g", "method": "hqq"}]), "variants[0].method", "'gptq'"),
    (_base(variants=[{"name": "g", "method": "gptq", "group_size": "big"}]), "variants[0].group_size",
     "valid integer"),
    (_base(variants=[{"name": "g", "method": "gptq", "group_size": 96}]), "variants[0].group_size", "power of two"),
    (_base(variants=[{"name": "f", "method": "fp8", "group_size": 64}]), "variants[0].group_size", "per output channel"),
    (_base(variants=[{"name": "s", "method": "smoothquant-gptq", "symmetric": False}]), "variants[0].symmetric",
     "symmetric"),
    (_base(calibration={"source": "c.jsonl", "samples": 0}), "calibration.samples", "greater than 0"),
    (_base(calibration=None), "(top level)", "add a `calibration:` section"),
    (_base(variants=[{"name": "a", "method": "rtn"}, {"name": "a", "method": "fp8"}]), "variants", "unique"),
    (_base(variants=[{"name": "bad name", "method": "rtn"}]), "variants[0].name", "pattern"),
    (_base(variants=[{"name": "b", "method": "baseline", "bits": 4}]), "variants[0].bits", "no weight quantization settings"),
    ({"model": {}, "variants": [{"name": "r", "method": "rtn"}]}, "output", "Field required"),
    (_base(variants=[{"name": "g", "method": "gguf"}]), "variants[0].gguf_type", "needs a llama.cpp file type"),
    (_base(variants=[{"name": "g", "method": "gguf", "gguf_type": "Q4_K_X"}]), "variants[0].gguf_type",
     "expected one of ['F32', 'F16'"),
    (_base(variants=[{"name": "g", "method": "gguf", "gguf_type": "Q4_0", "bits": 4}]), "variants[0].bits",
     "choose the llama.cpp type with gguf_type"),
    (_base(variants=[{"name": "g", "method": "gguf", "gguf_type": "F16", "imatrix": True}]), "variants[0].imatrix",
     "not quantized"),
    (_base(variants=[{"name": "g", "method": "gguf", "gguf_type": "Q4_0", "ignore": []}]), "variants[0].ignore",
     "chooses each tensor's type"),
    (_base(variants=[{"name": "g", "method": "gguf", "gguf_type": "Q4_0", "samples": 8}]), "variants[0]",
     "or set imatrix: true"),
    (_base(variants=[{"name": "g", "method": "gguf", "gguf_type": "Q4_0", "kv_cache": {"dtype": "fp8"}}]),
     "variants[0].kv_cache", "keeps its engine's own KV cache"),
    (_base(variants=[{"name": "b", "method": "bnb-int8", "compute_dtype": "float32"}]), "variants[0].compute_dtype",
     "only method 'bnb-nf4'"),
    (_base(variants=[{"name": "b", "method": "bnb-nf4", "gguf_type": "Q4_0"}]), "variants[0].gguf_type",
     "does not take gguf_type; only gguf do"),
    (_base(variants=[{"name": "b", "method": "bnb-nf4", "group_size": 64}]), "variants[0].group_size",
     "does not take group_size; only rtn, gptq, awq, smoothquant-gptq, autoround, fp8, auto do"),
    (_base(variants=[{"name": "b", "method": "gptq", "imatrix": True}]), "variants[0].imatrix", "only gguf do"),
    (_base(variants=[{"name": "s", "method": "rtn", "smoothing_strength": 0.5}]), "variants[0].smoothing_strength",
     "only method 'smoothquant-gptq'"),
    (_base(variants=[{"name": "k", "method": "baseline", "kv_cache": {"dtype": "fp8"}}]), "variants[0]",
     "use method 'none'"),
    (_base(variants=[{"method": "gptq"}]), "variants[0].name", "Field required"),
    (_base(variants=[{"name": "m"}]), "variants[0].method", "missing; expected one of"),
    (_base(calibration=None, variants=[{"name": "g", "method": "gguf", "gguf_type": "Q4_0", "imatrix": True}]),
     "(top level)", "add a `calibration:` section"),
    (_base(variants=[{"name": "a", "method": "awq", "scheme": "NVFP4"}]), "variants[0].scheme",
     "method 'awq' cannot write 'NVFP4'; it writes ['W4A16-asym', 'W4A16']"),
    (_base(variants=[{"name": "r", "method": "rtn", "scheme": "W3A16"}]), "variants[0].scheme",
     "(schemes: ['W4A16', 'W4A16-asym'"),
    (_base(variants=[{"name": "n", "method": "rtn", "scheme": "NVFP4", "group_size": 32}]), "variants[0].group_size",
     "in groups of 16 fixed by the format"),
    (_base(variants=[{"name": "g", "method": "gptq", "iters": 10}]), "variants[0].iters",
     "method 'gptq' does not take iters; only method 'autoround' do"),
    (_base(variants=[{"name": "g", "method": "gptq", "scheme": "W8A16", "bits": 4}]), "variants[0].bits",
     "scheme 'W8A16' has bits=8, got 4"),
    (_base(variants=[{"name": "f", "method": "fp8", "scheme": "W4A16"}]), "variants[0].scheme",
     "method 'fp8' writes FP8-dynamic"),
    (_base(variants=[{"name": "r", "method": "rtn", "rotate": "hadamard"}]), "variants[0].rotate", "'spinquant'"),
    (_base(variants=[{"name": "b", "method": "gguf", "gguf_type": "Q4_0", "scheme": "W4A16"}]), "variants[0].scheme",
     "method 'gguf' does not take scheme"),
    (_base(evaluation={"throughput": {"llamacpp_threads": 0}}), "evaluation.throughput.llamacpp_threads",
     "greater than 0"),
    (_base(evaluation={"tasks": ["arc_easy"], "vllm": {"tasks": ["gtpq"]}}), "evaluation.vllm.tasks",
     "['gtpq'] are not variant names; expected some of ['baseline', 'gptq']"),
])
def test_bad_recipe_names_file_field_and_expectation(tmp_path, data, where, expected):
    path = _write(tmp_path, data)
    with pytest.raises(InputError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {where}:"), msg
    assert expected in msg, msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(InputError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(InputError, match="expected a mapping"):
        load_recipe(bad)


def test_edge_methods_fill_their_format(tmp_path):
    variants = [{"name": "nf4", "method": "bnb-nf4"}, {"name": "int8", "method": "bnb-int8"},
                {"name": "q4km", "method": "gguf", "gguf_type": "q4_k_m"},
                {"name": "q4i", "method": "gguf", "gguf_type": "Q4_0", "imatrix": True, "samples": 8},
                {"name": "f16", "method": "gguf", "gguf_type": "F16"}]
    recipe = load_recipe(_write(tmp_path, _base(variants=variants)))
    nf4, int8, q4km, q4i, f16 = recipe.variants[1:]
    assert (nf4.bits, nf4.double_quant, nf4.label, nf4.calibrated) == (4, True, "NF4-dq (bitsandbytes)", False)
    assert (int8.bits, int8.label) == (8, "LLM.int8 (bitsandbytes)")
    assert (q4km.gguf_type, q4km.bits, q4km.label, q4km.calibrated) == ("Q4_K_M", 4, "GGUF Q4_K_M", False)
    assert q4i.calibrated and q4i.label == "GGUF Q4_0 imatrix" and f16.bits == 16
    assert not any(v.uses_llmcompressor for v in recipe.variants)


def test_cache_key_of_older_variants_ignores_the_new_fields(tmp_path):
    """Checkpoints built before the bitsandbytes/GGUF fields existed, and before the options were split per method,
    keep their cache key: the variant is hashed in the first format's flat shape, the later fields only when set."""
    recipe = load_recipe(_write(tmp_path, _base(variants=[
        {"name": "gptq", "method": "gptq", "bits": 4, "group_size": 64},
        {"name": "q", "method": "gguf", "gguf_type": "Q4_0"}])))
    gptq, gguf = recipe.variants[1:]
    assert gguf.key_fields()["bits"] == 4 and gguf.key_fields()["group_size"] is None
    dumped = gptq.key_fields()
    assert set(dumped) == {"name", "method", "bits", "group_size", "symmetric", "ignore", "smoothing_strength",
                           "dampening_frac", "samples", "seq_len"}


def test_calibration_shape_defaults_per_method():
    """AWQ's grid search costs several times GPTQ's per calibration token (benchmarks/results/calibration_awq_*.txt
    against calibration_gptq_c4_shapes.txt), so it defaults to the 16 x 256 the sweep picked; a shape the recipe
    sets always wins (in the calibration section or on the variant)."""
    from compress.recipe import Calibration

    default = Calibration(source="c.jsonl")
    gptq, awq = (parse_variant({"name": m, "method": m}).default_calibration_shape() for m in ("gptq", "awq"))
    assert default.shape_for(gptq) == (64, 512) and default.shape_for(awq) == (16, 256)
    assert Calibration(source="c.jsonl", samples=32).shape_for(awq) == (32, 256)
    assert Calibration(source="c.jsonl", seq_len=1024).shape_for(awq) == (16, 1024)


def test_calibration_settings_name_the_pipeline(tmp_path):
    """The llm-compressor pipeline decides GPTQ's weights, so it is part of the calibration record and cache key."""
    from compress.keys import calibration_settings as _calibration_settings

    variants = [{"name": "g", "method": "gptq", "bits": 4, "group_size": 32},
                {"name": "a", "method": "awq", "bits": 4, "group_size": 32},
                {"name": "q", "method": "gguf", "gguf_type": "Q4_0", "imatrix": True}]
    recipe = load_recipe(_write(tmp_path, _base(calibration={"source": "c.jsonl"}, variants=variants)))
    g, a, q = (_calibration_settings(recipe, v) for v in recipe.variants[1:])
    assert (g["pipeline"], g["samples"], g["seq_len"]) == ("sequential", 64, 512)
    assert (a["pipeline"], a["samples"], a["seq_len"]) == ("sequential", 16, 256)
    assert "pipeline" not in q  # llama.cpp's importance matrix: no llm-compressor pipeline
