"""Method `auto` on the tests' tiny Llama: a mixed checkpoint that reloads, the target met as predicted, the
sensitivities measured once for two targets, and unreachable targets refused before any build."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compress import run as run_mod
from compress.options import InputError
from compress.recipe import load_recipe, parse_variant
from compress.sensitivity import units
from conftest import write_recipe

FORMATS = ["W4A16", "W8A16", "unquantized"]
# 6 bits per weight: between all-W4A16 and all-W8A16, so the choice mixes formats
AUTO = [{"name": "auto-6", "method": "auto", "formats": FORMATS, "group_size": 32, "target": {"effective_bits": 6},
         "analysis": {"windows": 2, "seq_len": 16}},
        {"name": "auto-kl", "method": "auto", "formats": FORMATS, "group_size": 32, "target": {"max_kl": 0.001},
         "analysis": {"windows": 2, "seq_len": 16}}]


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, tiny_model, calib_file):
    tmp = tmp_path_factory.mktemp("auto")
    recipe_path = write_recipe(tmp, tiny_model, calib_file, [{"name": "baseline", "method": "baseline"}, *AUTO])
    code = run_mod.run(load_recipe(recipe_path), recipe_path)
    results = json.loads((tmp / "run" / "results.json").read_text())
    return code, {r["name"]: r for r in results["variants"]}, tmp / "run"


def test_builds_a_mixed_checkpoint_that_reloads(auto_run, tiny_model):
    code, records, out = auto_run
    assert code == 0
    r = records["auto-6"]
    assert r["status"] == "ok", r.get("error")
    a = r["auto"]
    assert a["effective_bits"] <= 6 and len(a["units"]) == 8  # 2 layers x (qkv, o, gate_up, down)
    assert {u["format"] for u in a["units"]} <= {"W4A16-g32", "W8A16-g32", "unquantized"}
    assert a["counts"] == {f: sum(u["format"] == f for u in a["units"]) for f in a["counts"]}
    assert sum(a["counts"].values()) == len(a["units"]) and all(a["counts"].values())
    config = json.loads((out / "auto-6" / "config.json").read_text())["quantization_config"]
    targets = {t: g["weights"]["num_bits"] for g in config["config_groups"].values() for t in g["targets"]}
    modules = {u.name: u.modules for u in units(AutoModelForCausalLM.from_pretrained(tiny_model), "linear")}
    for u in a["units"]:  # config.json says each unit's format, per module, as vLLM reads it
        if u["format"] == "unquantized":
            assert not set(modules[u["unit"]]) & set(targets)
        else:
            assert {targets[m] for m in modules[u["unit"]]} == {int(u["format"][1])}
    model = AutoModelForCausalLM.from_pretrained(out / "auto-6", dtype=torch.float32)  # transformers reloads it
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_the_frontier_and_the_prediction(auto_run):
    _, records, _ = auto_run
    a = records["auto-6"]["auto"]
    bits = [p[0] for p in a["frontier"]]
    costs = [p[1] for p in a["frontier"]]
    assert bits == sorted(bits) and costs == sorted(costs, reverse=True)
    assert a["predicted"]["value"] in costs or min(costs) <= a["predicted"]["value"]
    if a["next_point"]:
        assert a["next_point"]["effective_bits"] > a["effective_bits"]
        assert a["next_point"]["predicted"] < a["predicted"]["value"]
    kl = records["auto-kl"]["auto"]
    assert kl["predicted"]["value"] <= 0.001


def test_a_second_target_reads_the_sensitivities(auto_run):
    _, records, out = auto_run
    first, second = records["auto-6"]["auto"]["sensitivity"], records["auto-kl"]["auto"]["sensitivity"]
    assert first["cached"] is False and second["cached"] is True and first["key"] == second["key"]
    assert first["costs"] == second["costs"]
    assert (out / ".sensitivity" / f"{first['key']}.json").is_file()


@pytest.mark.parametrize("target, match", [({"effective_bits": 2}, "below the smallest choice"),
                                           ({"max_size_gb": 1e-6}, "below the smallest choice")])
def test_unreachable_size_targets_are_refused_before_any_build(tmp_path, tiny_model, calib_file, target, match):
    recipe_path = write_recipe(tmp_path, tiny_model, calib_file, [{**AUTO[0], "target": target}])
    from compress.checks import check_inputs

    with pytest.raises(InputError, match=rf"variants\[0\]\.target: .*{match}"):
        check_inputs(load_recipe(recipe_path), recipe_path, prepare=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, match", [
    ({"formats": ["W4A16", "W8A8-INT8"]}, "also quantizes activations"),
    ({"formats": ["W4A16", "W4A16"]}, "each format once"),
    ({"formats": ["W4A16", "W5"]}, "not a scheme"),
    ({"algorithm": "awq", "formats": ["W8A16", "unquantized"]}, "cannot write 'W8A16'"),
    ({"target": {"effective_bits": 4, "max_kl": 0.1}}, "exactly one"),
    ({"target": {}}, "exactly one"),
    ({"group_size": 48}, "power of two"),
])
def test_bad_settings(change, match):
    with pytest.raises(Exception, match=match):
        parse_variant({**AUTO[0], **change})


def test_checkpoint_holds_two_integer_widths(auto_run):
    _, records, out = auto_run
    formats = {u["format"] for u in records["auto-6"]["auto"]["units"]}
    with safe_open(out / "auto-6" / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any(n.endswith("weight_packed") for n in names) == bool(formats & {"W4A16-g32", "W8A16-g32"})


def test_report_says_what_was_chosen(auto_run):
    _, records, out = auto_run
    report = (out / "report.md").read_text()
    assert "Auto-choose: targets, predicted and measured" in report and "Auto-choose: format per unit" in report
    bits = records["auto-6"]["auto"]["effective_bits"]
    assert f"| auto-6 | effective_bits 6 | {bits:.3f} |" in report


def test_frontier_plot(auto_run):
    """The predicted frontier as a curve under the built variants, placed by their measured KL (set here: the tiny
    run measures no perplexity)."""
    from compress.report.draw import svg
    from compress.report.plots import auto_frontier, colours

    _, records, _ = auto_run
    variants = [dict(r, kl={"mean": 0.01 * (i + 1)}) for i, r in enumerate(records.values())]
    plot = auto_frontier(variants, colours([r["name"] for r in variants]))
    assert {p.name for p in plot.marks} == {"auto-6", "auto-kl"} and plot.curve[1] and plot.y_log
    assert 'class="curve"' in svg(plot)


def test_model_card_lists_every_unit(auto_run):
    _, records, out = auto_run
    card = (out / "auto-6" / "README.md").read_text()
    assert "target effective_bits 6" in card
    for u in records["auto-6"]["auto"]["units"]:
        assert f"| {u['unit']} | {u['format']} |" in card


@pytest.mark.parametrize("change, match", [
    ({"target": {"effective_bits": 40}}, "chooses every unit unquantized"),
    ({"formats": ["W4A16", "W8A16"], "target": {"max_kl": 1e-9}}, "below the least predicted KL"),
])
def test_targets_known_unreachable_after_the_analysis(tmp_path, tiny_model, calib_file, change, match):
    """Exit 2 (InputError) naming the closest reachable value, with no checkpoint written."""
    recipe_path = write_recipe(tmp_path, tiny_model, calib_file, [{**AUTO[0], **change}])
    with pytest.raises(InputError, match=match):
        run_mod.run(load_recipe(recipe_path), recipe_path)
    assert not (tmp_path / "run" / "auto-6").exists()
