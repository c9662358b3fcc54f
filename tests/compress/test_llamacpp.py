"""GGUF export with llama.cpp's own converter and quantizer, llama.cpp's logits and decode benchmark, and GGUF rows
through the whole pipeline, on the tiny model (with a Llama-2-style tokenizer, which the converter accepts).

Skipped when llama-cpp-python (the `edge` extra) is not installed, or when llama.cpp's converter has not been
fetched yet (`python -m compress.llamacpp fetch-converter`; unit tests never download)."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from compress import gguf_file, llamacpp  # noqa
from compress import build as build_mod  # noqa
from compress import run as run_mod  # noqa
from compress.backends import gguf as gguf_backend  # noqa
from eval.engines import llamacpp as cpp_engine  # noqa: E402
from compress.recipe import load_recipe  # noqa: E402
from conftest import TEXT, write_recipe  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def converter():
    folder = llamacpp.converter_dir(fetch=False)
    if folder is None:
        pytest.skip("llama.cpp's converter is not fetched: python -m compress.llamacpp fetch-converter")
    return folder


@pytest.fixture(scope="module")
def exported(tiny_llama_tok_model, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for t in ("F16", "Q8_0", "Q4_K_M", "Q4_0"):
        files[t] = out / f"m-{t}.gguf"
        info = llamacpp.export(tiny_llama_tok_model, files[t], t, threads=1)
        assert info["intermediate"] == (None if t == "F16" else "F16")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.values())  # no F16 left behind
    return files


def _hf_logits(folder, ids, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _kl(p_logits, q_logits) -> float:
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_files_hold_the_types_llama_cpp_chose(exported):
    f16, q8, q4km, q4 = (gguf_file.summarize(exported[t]) for t in ("F16", "Q8_0", "Q4_K_M", "Q4_0"))
    assert set(f16["types"]) == {"F16", "F32"} and set(q8["types"]) == {"Q8_0", "F32"}
    # the tiny model's rows are 64 and 128 weights long, not multiples of 256: no K-quant fits, and llama.cpp
    # falls back to Q5_0 (Q4_K) and Q8_0 (Q6_K): the "Q4_K_M" file holds no Q4_K tensor at all
    assert "Q4_K" not in q4km["types"] and "Q5_0" in q4km["types"]
    assert "Q4_0" in q4["types"] and q4["types"]["F32"]["tensors"] == 5  # 2 x 2 norms + the final norm
    assert q4["tensor_bytes"] < q8["tensor_bytes"] < f16["tensor_bytes"]
    assert q4["params"] == f16["params"]
    assert f16["n_layers"] == 2 and (f16["n_kv_heads"], f16["head_dim"]) == (2, 16)


def test_llama_cpp_logits_match_the_source_and_transformers(exported, tiny_llama_tok_model):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_llama_tok_model)("The quick brown fox jumps over")["input_ids"]
    source = _hf_logits(tiny_llama_tok_model, ids)
    kl = {}
    for t, path in exported.items():
        engine = llamacpp.GGUFModel(path, context=64, threads=1)
        try:
            cpp = engine.window_logits(ids)
            again = engine.window_logits(ids)  # each window starts from an empty cache
        finally:
            engine.close()
        assert cpp.shape == source.shape and np.array_equal(cpp.numpy(), again.numpy())
        kl[t] = _kl(source, cpp)
        dequantized = _hf_logits(path.parent, ids, gguf_file=path.name)  # transformers reading the same file
        assert _kl(dequantized, cpp) < 0.01, t
    assert kl["F16"] < 1e-5 and kl["F16"] < kl["Q8_0"] < kl["Q4_0"]


def test_importance_matrix_weights_the_rounding(tiny_llama_tok_model, tmp_path):
    """With an importance matrix, llama.cpp minimises the error on the columns it marks important: the weighted
    error of the quantized weights drops, and the same inputs give the same file."""
    import gguf

    f16 = tmp_path / "f16.gguf"
    llamacpp.convert(tiny_llama_tok_model, f16, "F16")
    summary = gguf_file.summarize(f16)
    widths = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(f16).tensors if len(t.shape) == 2}
    rng = np.random.default_rng(0)
    imatrix = {name: rng.lognormal(0, 2, w).astype(np.float32) for name, w in widths.items()}
    for name, extra in (("plain", None), ("imat", imatrix), ("imat2", imatrix)):
        llamacpp.quantize(f16, tmp_path / f"{name}.gguf", "Q4_0", imatrix=extra, threads=1)

    def weights(path):
        return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(path).tensors}

    ref, plain, imat, imat2 = (weights(tmp_path / f) for f in ("f16.gguf", "plain.gguf", "imat.gguf", "imat2.gguf"))
    name = "blk.0.attn_q.weight"
    assert gguf_file.summarize(tmp_path / "imat.gguf")["tensor_types"][name] == "Q4_0"
    weighted = {k: float((imatrix[name] * (w[name] - ref[name]) ** 2).sum()) for k, w in
                (("plain", plain), ("imat", imat))}
    assert weighted["imat"] < weighted["plain"]
    assert all(np.array_equal(imat[k], imat2[k]) for k in imat)
    assert summary["architecture"] == "llama"


def test_decode_benchmark_fields(exported):
    bw = 20e9
    r = cpp_engine.decode_benchmark(exported["Q8_0"], prompt_tokens=12, new_tokens=6, repeats=2, threads=1,
                                  bandwidth_bytes_per_sec=bw)
    one = r["batches"]["1"]
    assert r["engine"] == "llama.cpp" and r["threads"] == 1 and set(r["batches"]) == {"1"}
    assert one["tokens_decoded"] == 6 and one["decode_steps"] == 5
    assert one["tok_per_sec_min"] <= one["tok_per_sec"] <= one["tok_per_sec_max"] and one["ttft_s"] > 0
    summary = gguf_file.summarize(exported["Q8_0"])
    rf = r["roofline"]["1"]
    assert rf["weight_bytes"] == summary["tensor_bytes"] == r["weight_bytes_in_memory"]
    assert rf["kv_bytes"] == gguf_file.kv_bytes(summary, 12 + 3)
    assert rf["bound_tok_per_sec"] == pytest.approx(bw / (summary["tensor_bytes"] + rf["kv_bytes"]))
    assert rf["utilisation"] == pytest.approx(one["tok_per_sec"] / rf["bound_tok_per_sec"])
    assert r["peak_memory_bytes"] >= r["rss_now_bytes"] > 0 and isinstance(r["weight_repacking"], bool)
    assert r["flash_attention"] is llamacpp.FLASH_ATTENTION


def test_gguf_rows_through_the_pipeline(tmp_path, tiny_llama_tok_model, calib_file, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": str(i), "question": f"Which word completes: {TEXT[i % 5][:30]}?",
             "choices": ["fox", "dog", "scale", "model"], "gold": i % 4} for i in range(12)]
    (data / "arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "text.raw").write_text(" ".join(TEXT * 10))
    variants = [{"name": "baseline", "method": "baseline"}, {"name": "q8", "method": "gguf", "gguf_type": "Q8_0"},
                {"name": "q4-imat", "method": "gguf", "gguf_type": "Q4_0", "imatrix": True}]
    evaluation = {"selfcheck_prompts": ["The quick brown fox", "def add(a, b):"], "data_dir": str(data),
                  "tasks": ["arc_easy"], "limit": 8, "batch_size": 4,
                  "perplexity": {"file": "text.raw", "context": 64, "stride": 64, "max_windows": 4},
                  "throughput": {"prompt_tokens": 8, "new_tokens": 4, "batch_sizes": [1, 2], "repeats": 1,
                                 "llamacpp_threads": 1}}
    recipe = write_recipe(tmp_path, tiny_llama_tok_model, calib_file, variants, evaluation=evaluation)
    assert run_mod.run(load_recipe(recipe), recipe) == 0
    out = tmp_path / "run"
    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())["variants"]}
    base, q8, q4 = results["baseline"], results["q8"], results["q4-imat"]
    for r, gtype in ((q8, "Q8_0"), (q4, "Q4_0")):
        folder = Path(r["checkpoint"])
        g = r["gguf"]
        assert g["file"] == f"model-{gtype}.gguf" and (folder / g["file"]).is_file()
        assert r["weights_bytes"] == g["tensor_bytes"] == gguf_file.summarize(folder / g["file"])["tensor_bytes"]
        assert r["selfcheck"]["engines_kl_mean"] < gguf_backend.GGUF_ENGINE_MAX_KL
        assert r["selfcheck"]["tokenizer_agrees"] is True and "converter" in g["tokenizer"]
        assert r["perplexity"]["engine"] == "llama.cpp" and r["perplexity"]["tokens"] == base["perplexity"]["tokens"]
        assert r["kl"]["mean"] > 0 and r["tasks_engine"].startswith("transformers, GGUF")
        th = r["throughput"]
        assert th["engine"] == "llama.cpp" and th["threads"] == 1 and set(th["batches"]) == {"1"}
        assert r["roofline"]["weight_bytes"] == g["tensor_bytes"]
        assert (th["prompt_tokens"], th["new_tokens"]) == (base["throughput"]["prompt_tokens"],
                                                          base["throughput"]["new_tokens"])
        sr = r["speed_ratio"]  # interleaved with the transformers baseline in one process
        assert sr["engine"]["engine"] == "llama.cpp" and sr["engine"]["threads"] == 1
        assert sr["baseline_engine"]["engine"] == "transformers-eager" and sr["ratio_lo"] <= sr["ratio_hi"]
        assert (folder / "tokenizer.json").is_file() and r["serve"].startswith("llama-server -m ")
        card = (folder / "README.md").read_text()
        assert "tensor types actually stored" in card and "ollama create" in card and "llama.cpp, 1 thread" in card
    assert q4["gguf"]["imatrix"] and q4["gguf"]["imatrix_tensors"] == 2 * 7 + 1
    assert q4["calibration"]["tokens"] == 4 * 32 and q8["calibration"] is None
    assert q4["kl"]["mean"] > q8["kl"]["mean"]
    md = (out / "report.md").read_text()
    assert "## GGUF files" in md and "## Decode speed" in md and "| llama.cpp, 1 thread |" in md
    assert "Fastest 4-bit GGUF row: q4-imat" in md and "read the GGUF file dequantized on load" in md

    measured = []
    from eval import perplexity

    orig = perplexity.evaluate_tokens
    monkeypatch.setattr(perplexity, "evaluate_tokens", lambda *a, **k: measured.append(1) or orig(*a, **k))
    built = []
    real_build = build_mod.build
    monkeypatch.setattr(build_mod, "build", lambda job, v: built.append(v.name) or real_build(job, v))
    assert run_mod.run(load_recipe(recipe), recipe) == 0
    assert built == [] and measured == []  # second run: every checkpoint and figure reused
    timed = []
    from eval import measure as measure_mod

    real_speed = measure_mod.measure_speed
    monkeypatch.setattr(measure_mod, "measure_speed", lambda *a, **k: timed.append(a[1]["name"]) or real_speed(*a, **k))
    evaluation["throughput"]["llamacpp_threads"] = 2
    recipe = write_recipe(tmp_path, tiny_llama_tok_model, calib_file, variants, evaluation=evaluation)
    assert run_mod.run(load_recipe(recipe), recipe) == 0
    # llama.cpp's threads re-time the GGUF rows only, and change none of their perplexity or task figures
    assert built == [] and measured == [] and timed == ["q8", "q4-imat"]


def test_a_foreign_converter_folder_is_never_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    monkeypatch.delenv("COMPRESS_LLAMA_CPP_DIR", raising=False)
    folder = tmp_path / f"llama.cpp-converter-{llamacpp.version()}"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError, match="only ever puts a complete converter there"):
        llamacpp.converter_dir(fetch=True)
    assert (folder / "notes.txt").read_text() == "mine"
