"""The evaluation stage on a tiny model: every figure lands in results.json, the baseline is the KL reference,
recovery pairs items, measurements are cached per variant, and bad evaluation input is rejected up front."""

import json
from pathlib import Path

import pytest
import torch

from compress import checkpoint
from compress import build as build_mod
from compress import run as run_mod
from compress.cli import main
from compress.recipe import load_recipe
from conftest import task_data, write_recipe

VARIANTS = [{"name": "baseline", "method": "baseline"},
            {"name": "rtn-w4", "method": "rtn", "bits": 4, "group_size": 32},
            {"name": "rtn-w8", "method": "rtn", "bits": 8}]
F32 = torch.float32  # the run dtype keys are taken with where a test is not about it


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Local files in the shared data's formats: an ARC-style task file and a perplexity text."""
    return task_data(tmp_path_factory.mktemp("data"))


def _recipe(tmp_path, tiny_model, calib_file, data_dir, evaluation=None):
    ev = {"data_dir": str(data_dir), "tasks": ["arc_easy"], "limit": 20, "batch_size": 4,
          "perplexity": {"file": "text.raw", "context": 64, "stride": 32, "max_windows": 6},
          "throughput": {"prompt_tokens": 8, "new_tokens": 4, "batch_sizes": [1, 2], "repeats": 1}}
    ev.update(evaluation or {})
    return write_recipe(tmp_path, tiny_model, calib_file, VARIANTS, evaluation=ev)


def test_every_figure_is_measured_and_cached(tmp_path, tiny_model, calib_file, data_dir, monkeypatch):
    recipe = _recipe(tmp_path, tiny_model, calib_file, data_dir)
    assert run_mod.run(load_recipe(recipe), recipe) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    r = {v["name"]: v for v in results["variants"]}
    assert results["bandwidth"]["bytes_per_sec"] > 0
    base, w4, w8 = r["baseline"], r["rtn-w4"], r["rtn-w8"]
    assert base["kl"]["mean"] == 0 and base["kl"]["top1_agreement"] == 1
    assert base["perplexity"]["tokens"] == w4["perplexity"]["tokens"] > 0
    assert w4["kl"]["mean"] > w8["kl"]["mean"] > 0  # 4-bit drifts further from the baseline than 8-bit
    assert w4["tasks"]["arc_easy"]["n"] == 20 and "items" not in w4["tasks"]["arc_easy"]
    assert {"pct", "ci95"} <= set(w4["recovery"]["arc_easy"]) and "average" in w4["recovery"]
    assert "recovery" not in base
    for v in r.values():
        assert v["throughput"]["engine"] == "transformers-eager"
        assert set(v["throughput"]["batches"]) == {"1", "2"}
        assert "contention" in v["throughput"]["batches"]["1"]
        assert 0 < v["roofline"]["utilisation"]
    assert "speed_ratio" not in base  # the reference; the others are interleaved with it
    for v in (w4, w8):
        sr = v["speed_ratio"]
        assert sr["ratio_lo"] <= sr["ratio"] <= sr["ratio_hi"] and "per_round" not in sr
        assert sr["rounds"] >= 8 or (sr["rounds"] >= 6 and sr["stopped_early"])  # 6 only when the interval is tight
        assert sr["verdict"] in ("faster", "slower", "no measurable difference")
    # where the time went, per row and stage, as each figure was made; the report's table sums them
    assert set(base["stage_seconds"]) == {"compress", "load", "perplexity", "tasks", "throughput"}
    assert set(w4["stage_seconds"]) == {"compress", "load", "perplexity", "tasks", "throughput", "speed_ratio"}
    assert all(s >= 0 for v in r.values() for s in v["stage_seconds"].values())
    assert w4["stage_seconds"]["compress"] == w4["compress_seconds"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Where the time went" in report and "| all rows |" in report
    cached = json.loads((tmp_path / "run" / "eval" / "rtn-w4.json").read_text())
    assert len(cached["speed_ratio"]["per_round"]) == cached["speed_ratio"]["rounds_run"]  # the rounds stay here
    for f in ("report.md", "results.csv", "report.html"):
        assert (tmp_path / "run" / f).is_file()
    card = (tmp_path / "run" / "rtn-w4" / "README.md").read_text()
    assert "| perplexity, `text.raw`" in card and "KL divergence from the baseline" in card
    table = card.split("## Measured")[1].split("\n\n")[1]  # one unbroken markdown table
    assert table.startswith("| figure | value |") and "KL divergence" in table and "tok/s" in table
    assert "arc_easy acc (lm-eval, 0-shot, n = 20" in card and "tok/s" in card
    # every row says the dtype transformers computed it in, and why (evaluation.dtype auto: this CPU's bf16 or not)
    measured_in = w4["measured_dtype"]
    assert measured_in == base["measured_dtype"] and measured_in["why"].startswith("auto: ")
    assert measured_in["perplexity"] == "float32" and measured_in["tasks"] in ("float32", "bfloat16")
    assert f"n = 20, in {measured_in['tasks']})" in card and "tokens, in float32) |" in card
    assert (f"transformers computed perplexity and KL in float32, the tasks and the speed in {measured_in['tasks']}"
            in report)
    assert "decode speed ÷ the baseline's (" in card and "interleaved rounds, batch 1) |" in card
    manifest = json.loads((tmp_path / "run" / "rtn-w4" / "manifest.json").read_text())
    assert checkpoint.verify(tmp_path / "run" / "rtn-w4", manifest["cache_key"])  # card refreshed, manifest too

    measured = []
    from eval import perplexity

    orig = perplexity.evaluate_tokens
    monkeypatch.setattr(perplexity, "evaluate_tokens", lambda *a, **k: measured.append(1) or orig(*a, **k))
    assert run_mod.run(load_recipe(recipe), recipe) == 0
    assert measured == []  # nothing re-measured
    rerun = {v["name"]: v for v in json.loads((tmp_path / "run" / "results.json").read_text())["variants"]}
    assert {n: v["stage_seconds"] for n, v in rerun.items()} == {n: v["stage_seconds"] for n, v in r.items()}
    timed = []
    from eval import measure as measure_mod

    real_speed = measure_mod.measure_speed
    monkeypatch.setattr(measure_mod, "measure_speed", lambda *a, **k: timed.append(a[1]["name"]) or real_speed(*a, **k))
    assert run_mod.run(load_recipe(recipe), recipe, remeasure_speed=True) == 0
    assert measured == [] and timed == ["baseline", "rtn-w4", "rtn-w8"]  # speed timed again, accuracy reused
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {v["name"]: v["kl"] for v in again["variants"]} == {n: v["kl"] for n, v in r.items()}
    recipe = _recipe(tmp_path, tiny_model, calib_file, data_dir, {"throughput": {
        "prompt_tokens": 8, "new_tokens": 4, "batch_sizes": [1, 2], "repeats": 1, "rounds": 6}})
    assert run_mod.run(load_recipe(recipe), recipe) == 0
    assert measured == [] and len(timed) == 6  # a changed throughput setting re-times, re-scores nothing
    built = []
    real_build = build_mod.build
    monkeypatch.setattr(build_mod, "build", lambda job, v: built.append(v.name) or real_build(job, v))
    recipe = _recipe(tmp_path, tiny_model, calib_file, data_dir, {"limit": 12})
    assert run_mod.run(load_recipe(recipe), recipe) == 0
    assert len(measured) == 3  # a changed evaluation setting re-measures every variant
    assert built == []  # ... but rebuilds no checkpoint


@pytest.mark.parametrize("evaluation, message", [
    ({"tasks": ["hellaswag_typo"]}, "evaluation.tasks: unknown ['hellaswag_typo']"),
    ({"data_dir": "/no/such/dir"}, "evaluation.data_dir: folder not found"),
    ({"perplexity": {"file": "missing.raw"}}, "evaluation.perplexity.file"),
])
def test_bad_evaluation_input_exits_2(tmp_path, tiny_model, calib_file, data_dir, capsys, evaluation, message):
    recipe = _recipe(tmp_path, tiny_model, calib_file, data_dir, evaluation)
    assert main(["run", str(recipe)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_speed_key_covers_the_bandwidth_probe_and_the_baseline_and_the_eval_key_no_speed(data_dir, monkeypatch):
    """Speed figures measured under another bandwidth definition, or against another baseline, are redone, so a
    report never mixes two bounds or two references; accuracy figures depend on no speed setting."""
    from eval import measure as evaluate, throughput
    from compress.recipe import Evaluation

    with_tp = Evaluation(data_dir=str(data_dir), tasks=[], perplexity={"file": "text.raw"},
                         throughput={"prompt_tokens": 8, "new_tokens": 4})
    without = Evaluation(data_dir=str(data_dir), tasks=[], perplexity={"file": "text.raw"}, throughput=None)
    fewer = Evaluation(data_dir=str(data_dir), tasks=[], perplexity={"file": "text.raw"},
                       throughput={"prompt_tokens": 8, "new_tokens": 4, "rounds": 4})
    row, base = {"name": "q", "cache_key": "ckpt", "checkpoint": "ckpt"}, {"name": "baseline", "cache_key": "base"}
    assert evaluate.speed_key(without, row, base, "cpu", F32) is None
    assert evaluate.eval_key(with_tp, row, "cpu", F32) == evaluate.eval_key(without, row, "cpu", F32) \
        == evaluate.eval_key(fewer, row, "cpu", F32)
    before = evaluate.speed_key(with_tp, row, base, "cpu", F32)
    assert before != evaluate.speed_key(fewer, row, base, "cpu", F32)
    assert before != evaluate.speed_key(with_tp, row, {**base, "cache_key": "another"}, "cpu", F32)
    monkeypatch.setattr(throughput, "BANDWIDTH_PROBE", "another-probe")
    assert evaluate.speed_key(with_tp, row, base, "cpu", F32) != before


def test_measure_dtype_auto_is_bf16_only_where_computed_natively_and_fp32_keys_stay(data_dir, monkeypatch):
    """evaluation.dtype "auto" runs an fp32 model's tasks and speed in bf16 on a CPU with native bf16 (AMX or
    AVX512-BF16) and in fp32 on one without (emulated bf16 is slower); a 16-bit model keeps its dtype; an explicit
    dtype wins. The dtype enters both keys, except fp32, whose keys are those of the figures measured before the
    setting existed."""
    from compress import environment
    from compress.recipe import Evaluation
    from eval import measure as evaluate

    ev = Evaluation(data_dir=str(data_dir), tasks=[], perplexity={"file": "text.raw"},
                    throughput={"prompt_tokens": 8, "new_tokens": 4})
    flags = {"flags": []}
    monkeypatch.setattr(environment, "cpu_features", lambda: flags)
    assert evaluate.measure_dtype(ev, "cpu", F32)[0] == F32
    flags["flags"] = ["avx512f", "avx512_bf16"]
    dtype, why = evaluate.measure_dtype(ev, "cpu", F32)
    assert dtype == torch.bfloat16 and "avx512_bf16" in why
    assert evaluate.measure_dtype(ev, "cpu", torch.float16)[0] == torch.float16
    assert evaluate.measure_dtype(ev, "cuda", F32)[0] == torch.bfloat16
    pinned = ev.model_copy(update={"dtype": "float32"})
    assert evaluate.measure_dtype(pinned, "cpu", F32) == (F32, "evaluation.dtype float32")

    row, base = {"name": "q", "cache_key": "ckpt", "checkpoint": "ckpt"}, {"name": "baseline", "cache_key": "base"}
    assert evaluate.eval_key(ev, row, "cpu", F32) == evaluate.eval_key(pinned, row, "cpu", F32)
    assert evaluate.eval_key(ev, row, "cpu", torch.bfloat16) != evaluate.eval_key(ev, row, "cpu", F32)
    assert evaluate.speed_key(ev, row, base, "cpu", torch.bfloat16) != evaluate.speed_key(ev, row, base, "cpu", F32)


def test_eval_key_covers_llamacpp_attention_only_for_gguf_rows(data_dir, monkeypatch):
    """Flash attention changes llama.cpp's logits and speed, so a GGUF row measured with the other setting is
    redone; a transformers row keeps its cache."""
    from compress import llamacpp
    from eval import measure as evaluate
    from compress.recipe import Evaluation

    ev = Evaluation(data_dir=str(data_dir), tasks=[], perplexity={"file": "text.raw"},
                    throughput={"prompt_tokens": 8, "new_tokens": 4})
    rows = [{"cache_key": "ckpt", "checkpoint": "ckpt", "gguf": {"file": "model.gguf"}},
            {"cache_key": "ckpt", "checkpoint": "ckpt"}]
    before = [evaluate.eval_key(ev, r, "cpu", F32) for r in rows]
    monkeypatch.setattr(llamacpp, "FLASH_ATTENTION", not llamacpp.FLASH_ATTENTION)
    after = [evaluate.eval_key(ev, r, "cpu", F32) for r in rows]
    assert after[0] != before[0] and after[1] == before[1]


def test_the_main_pass_takes_a_served_rows_transformers_reference_as_the_vllm_stage_would(tmp_path, tiny_model,
                                                                                           data_dir):
    """The vLLM stage's reference (greedy tokens and the first windows' perplexity, in the served dtype and the
    run's), taken by the main pass with the models it loads anyway: the very figures of loading the checkpoint again
    per dtype (eval/agreement.reference), the run-dtype perplexity read off the main pass's own windows."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from compress.options import Evaluation
    from eval import agreement, measure
    from eval.engines import for_row
    from eval.served_setup import ppl_windows, reference_inputs

    ev = Evaluation(data_dir=str(data_dir), tasks=["arc_easy"], limit=8, batch_size=4, dtype="bfloat16",
                    perplexity={"file": "text.raw", "context": 64, "stride": 32, "max_windows": 6}, throughput=None,
                    selfcheck_prompts=["The quick brown fox", "def add(a, b):"],
                    vllm={"agreement_tokens": 6, "perplexity_windows": 3})
    record = {"name": "rtn", "checkpoint": str(tiny_model), "cache_key": "k",
              "serve": f"vllm serve {tiny_model} --dtype bfloat16"}
    result = measure.measure_variant(SimpleNamespace(evaluation=ev), tmp_path, record, "key", "cpu", F32,
                                     torch.bfloat16, None, {"ppl_ids": None})
    got = result["vllm_reference"]
    assert got["inputs"] == reference_inputs(ev) and got["seconds"] >= 0
    assert "prefix" not in result["perplexity"] and result["perplexity"]["windows"] == 6  # the main figure as it was
    tok = AutoTokenizer.from_pretrained(tiny_model)
    want = agreement.reference(tiny_model, [tok(p).input_ids for p in ev.selfcheck_prompts], 6,
                               ["bfloat16", "float32"], "cpu", tok((data_dir / "text.raw").read_text()).input_ids,
                               ev.perplexity, ppl_windows(ev))
    assert want["float32"]["perplexity"]["windows"] == 3
    assert got["by_dtype"] == want
    # a row vLLM does not serve, or one whose KV format transformers only simulates, takes none
    for other in ({**record, "kv_cache": {"dtype": "int4"}}, {**record, "bnb": {"bits": 4}}):
        assert measure._served_reference(ev, other, for_row(other), "float32", tok, {"ppl_ids": None}, "cpu") is None
