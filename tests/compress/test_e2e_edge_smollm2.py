"""End to end on the real model: SmolLM2-135M-Instruct (embedded) as GGUF Q4_K_M through llama.cpp and as
bitsandbytes NF4, evaluated beside the baseline. A few minutes on a 2-core CPU; skipped without the `edge` extra.

Beyond "it runs": the GGUF file must carry the model's own tokenizer (llama.cpp tokenizes the self-check prompts
exactly as the HF tokenizer does), hold what llama.cpp really does with 576-wide rows (Q5_0 instead of Q4_K; the
1536-wide ffn_down rows can take K-quants), and stay a language model: perplexity within 2x of the baseline's
(measured here: baseline 38.4 on 8 x 256 tokens; broken files give hundreds or more)."""

import json
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from conftest import ROOT

DATA = ROOT.parent / "shared" / "data"
pytestmark = pytest.mark.slow


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data beside the checkout")
def test_gguf_and_nf4_on_smollm2(tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("bitsandbytes")
    from compress import llamacpp

    if llamacpp.converter_dir(fetch=False) is None:
        pytest.skip("llama.cpp's converter is not fetched: python -m compress.llamacpp fetch-converter")
    recipe = {
        "model": {"source": "smollm2-135m"},
        "variants": [{"name": "q4km", "method": "gguf", "gguf_type": "Q4_K_M"}, {"name": "nf4", "method": "bnb-nf4"}],
        "evaluation": {"data_dir": str(DATA), "tasks": [],
                       "perplexity": {"context": 256, "stride": 256, "max_windows": 8},
                       "throughput": {"prompt_tokens": 32, "new_tokens": 8, "batch_sizes": [1], "repeats": 1,
                                      "llamacpp_threads": 1}},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    base, q4km, nf4 = results["variants"]
    g = q4km["gguf"]
    assert q4km["selfcheck"]["tokenizer_agrees"] and "SmolLM2-135M-Instruct.Q4_1.gguf" in g["tokenizer"]
    # 576-wide rows cannot take Q4_K (256-weight blocks) and fall back to Q5_0; 1536-wide ffn_down rows keep it
    assert g["types"]["Q5_0"]["tensors"] > 5 * g["types"]["Q4_K"]["tensors"] > 0
    assert g["types"]["F32"]["tensors"] == 61 and 5.5 < g["bits_per_weight"] < 7
    for r in (q4km, nf4):
        assert r["status"] == "ok"
        assert base["perplexity"]["value"] < r["perplexity"]["value"] < 2.0 * base["perplexity"]["value"]
        assert r["perplexity"]["tokens"] == base["perplexity"]["tokens"] == 8 * 255
        assert 0 < r["kl"]["mean"] < 1 and r["throughput"]["batches"]["1"]["tok_per_sec"] > 0
    assert q4km["perplexity"]["engine"] == "llama.cpp" and q4km["throughput"]["engine"] == "llama.cpp"
    sr = q4km["speed_ratio"]  # llama.cpp interleaved with the fp32 transformers baseline: 4-bit reads ~7x less
    assert sr["engine"]["engine"] == "llama.cpp" and sr["ratio_lo"] > 1 and sr["verdict"] == "faster"
    assert q4km["roofline"]["weight_bytes"] == g["tensor_bytes"] < 0.25 * base["weights_bytes"]
    card = (Path(q4km["checkpoint"]) / "README.md").read_text()
    assert "Q4_1" in card and "llama-server -m" in card
