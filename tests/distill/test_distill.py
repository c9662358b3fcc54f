"""distill/: block-influence pruning, the KD loss, the training loop's schedule and resumption, and distilled
students going through the pipeline like any other variant."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from compress import run as run_mod
from compress.cli import main
from compress.recipe import Distill, load_recipe
from conftest import perplexity_data, write_recipe
from distill.prune import block_influence, layers_to_drop, prune_layers
from distill.train import kd_loss, lr_factor, step_windows, train


def _model(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the default init, so the teacher's distributions are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


def _windows(n: int, length: int = 16, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, length), generator=g).tolist()


def test_identity_layer_has_zero_influence_and_is_dropped_first():
    model = _model()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: an exact identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = block_influence(model, _windows(6), batch_size=4)
    assert len(scores) == 4
    assert scores[2] == pytest.approx(0, abs=1e-6)
    assert min(s for i, s in enumerate(scores) if i != 2) > 1e-4
    assert layers_to_drop(scores, keep=3) == [2]
    assert layers_to_drop(scores, keep=2)[0] == 2 or 2 in layers_to_drop(scores, keep=2)


def test_kd_loss_matches_hand_computation():
    torch.manual_seed(0)
    s, t = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    targets = torch.tensor([[2, -100]])
    T = 2.0
    expected_kl = 0.0
    for pos in range(2):
        pt = [math.exp(x / T) for x in t[0, pos].tolist()]
        ps = [math.exp(x / T) for x in s[0, pos].tolist()]
        pt = [x / sum(pt) for x in pt]
        ps = [x / sum(ps) for x in ps]
        expected_kl += sum(a * math.log(a / b) for a, b in zip(pt, ps)) / 2
    expected_kl *= T * T
    logits = s[0, 0].tolist()
    expected_ce = -(logits[2] - math.log(sum(math.exp(x) for x in logits)))  # only position 0 has a target
    loss, parts = kd_loss(s, t, T)
    assert float(loss) == pytest.approx(expected_kl, rel=1e-5) and parts["kl"] == pytest.approx(expected_kl, rel=1e-5)
    loss, parts = kd_loss(s, t, T, ce_weight=0.25, targets=targets)
    assert parts["ce"] == pytest.approx(expected_ce, rel=1e-5)
    assert float(loss) == pytest.approx(0.75 * expected_kl + 0.25 * expected_ce, rel=1e-5)
    assert float(kd_loss(t, t, T)[0]) == pytest.approx(0, abs=1e-6)


def test_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert step_windows([[0], [1], [2]], 1, 2) == [[2], [0]]  # wraps around: a second epoch


def test_student_saves_reloads_and_generates(tmp_path, tiny_model):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    student = prune_layers(teacher, [0])
    assert len(teacher.model.layers) == 2 and teacher.config.num_hidden_layers == 2  # teacher untouched
    assert student.config.num_hidden_layers == 1 and student.model.layers[0].self_attn.layer_idx == 0
    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 23, 40]])
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, reloaded(ids).logits, atol=1e-5)
    out = reloaded.generate(ids, max_new_tokens=5, do_sample=False)  # the KV cache indexes the renumbered layer
    assert out.shape == (1, 9)
    with pytest.raises(ValueError, match="out of range"):
        prune_layers(teacher, [2])


def _cfg(**over) -> Distill:
    base = {"student": {"layers": 3}, "steps": 6, "batch": 4, "micro_batch": 2, "seq_len": 16, "lr": 1e-3,
            "checkpoint_every": 2}
    base.update(over)
    return Distill(**base)


def test_training_lowers_the_loss_and_resume_continues_the_step_count(tmp_path):
    teacher = _model()
    windows = _windows(4)  # every step sees the same 4 windows, so the loss curve is not data noise
    cfg = _cfg()
    straight = prune_layers(teacher, [1])
    full = train(straight, teacher, windows, cfg, tmp_path / "a")
    assert [h["step"] for h in full] == [1, 2, 3, 4, 5, 6]
    assert full[-1]["loss"] < full[0]["loss"]
    assert all(h["grad_norm"] > 0 and h["tok_per_sec"] > 0 for h in full)

    resumed = prune_layers(teacher, [1])
    first = train(resumed, teacher, windows, cfg, tmp_path / "b", stop_after=3)  # "killed" after 3 steps
    assert [h["step"] for h in first] == [1, 2, 3]
    fresh = prune_layers(teacher, [1])  # a new process: a fresh student, state from disk
    second = train(fresh, teacher, windows, cfg, tmp_path / "b")
    assert [h["step"] for h in second] == [1, 2, 3, 4, 5, 6]
    assert second[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-4)
    for a, b in zip(straight.parameters(), fresh.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


class _Planted:
    """What a hostile train-state.pt could hold: an object whose unpickling runs code."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def test_a_planted_resume_state_runs_no_code_and_is_set_aside(tmp_path, monkeypatch):
    from distill.train import STATE

    monkeypatch.chdir(tmp_path)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    torch.save({"step": 3, "student": _Planted()}, state_dir / STATE)
    teacher = _model()
    history = train(prune_layers(teacher, [1]), teacher, _windows(4), _cfg(), state_dir)
    assert not (tmp_path / "PWNED").exists()  # weights_only=True refused to unpickle it
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]  # trained from step 0
    aside = [p.name for p in state_dir.iterdir() if p.name.startswith("unreadable-")]
    assert len(aside) == 1 and aside[0].endswith(STATE)  # kept for the user, not deleted


# ------------------------------------------------------------------------------------------------ pipeline

DISTILL = {"student": {"layers": 1}, "data": None, "steps": 8, "batch": 4, "micro_batch": 2, "seq_len": 16,
           "lr": 3e-3, "importance_samples": 2, "checkpoint_every": 4}


def _variants(calib_file: Path) -> list[dict]:
    d = {**DISTILL, "data": str(calib_file)}
    return [{"name": "baseline", "method": "baseline"},
            {"name": "pruned", "method": "none", "distill": {**d, "steps": 0}},
            {"name": "distilled", "method": "none", "distill": d},
            {"name": "distilled-w4", "method": "rtn", "bits": 4, "group_size": 32, "distill": d}]


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory, tiny_model, calib_file):
    tmp = tmp_path_factory.mktemp("distill")
    _, ev = perplexity_data(tmp)
    recipe_path = write_recipe(tmp, tiny_model, calib_file, _variants(calib_file), evaluation=ev)
    code = run_mod.run(load_recipe(recipe_path), recipe_path)
    results = json.loads((tmp / "run" / "results.json").read_text())
    return code, {r["name"]: r for r in results["variants"]}, tmp / "run", recipe_path


def test_distilled_students_ship_and_beat_the_untrained_one(distill_run):
    code, r, run_dir, _ = distill_run
    assert code == 0
    pruned, distilled, quant = r["pruned"], r["distilled"], r["distilled-w4"]
    for v in (pruned, distilled, quant):
        assert v["status"] == "ok" and v["selfcheck_max_abs_diff"] <= 1e-3
        config = json.loads((Path(v["checkpoint"]) / "config.json").read_text())
        assert config["num_hidden_layers"] == 1
    assert "quantization_config" in json.loads((Path(quant["checkpoint"]) / "config.json").read_text())
    assert distilled["distill"]["dropped_layers"] == pruned["distill"]["dropped_layers"]
    assert distilled["distill"]["chosen_by"] == "lowest block influence"
    assert distilled["kl"]["mean"] < pruned["kl"]["mean"]  # training moved the student toward the teacher
    assert distilled["weights_bytes"] < r["baseline"]["weights_bytes"]
    curve = distilled["distill"]["loss_curve"]
    assert [p["step"] for p in curve] == list(range(1, 9)) and curve[-1]["loss"] < curve[0]["loss"]
    assert len(list((run_dir / ".students").iterdir())) == 2  # untrained + trained; the W4 row reused the latter
    assert quant["distill"]["cached"] is True and distilled["distill"]["cached"] is False
    report = (run_dir / "report.md").read_text()
    assert "## Distillation" in report and "baseline (teacher)" in report
    assert 'class="loss-curve"' in (run_dir / "report.html").read_text()


def test_rerun_reuses_everything(distill_run, monkeypatch):
    _, _, run_dir, recipe_path = distill_run
    import distill.student as student_mod

    monkeypatch.setattr(student_mod, "train", lambda *a, **k: pytest.fail("retrained a cached student"))
    assert run_mod.run(load_recipe(recipe_path), recipe_path) == 0


def test_distilling_on_an_evaluation_file_is_refused(tmp_path, tiny_model, calib_file, capsys):
    data, ev = perplexity_data(tmp_path)
    variants = [{"name": "d", "method": "none", "distill": {**DISTILL, "data": str(data / "text.raw")}}]
    recipe = write_recipe(tmp_path, tiny_model, calib_file, variants, evaluation=ev)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "variants[0].distill.data" in err and "evaluation file" in err
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_a_measured_estimate(tmp_path, tiny_model, calib_file, capsys):
    recipe = write_recipe(tmp_path, tiny_model, calib_file, _variants(calib_file)[:3])
    assert main(["run", "--dry-run", str(recipe)]) == 0
    out = capsys.readouterr()
    assert "s per step measured on cpu" in out.err and "for 8 steps" in out.err
    (est,) = json.loads(out.out)["distill_estimates"].values()
    assert est["step_seconds"] > 0 and est["estimated_train_seconds"] == pytest.approx(8 * est["step_seconds"])
    assert not (tmp_path / "run").exists()
