"""Load: a sweep of 20 variants in one recipe, run twice in a fresh process. Peak memory per variant must not grow
with the number of variants built before it (nothing of a variant stays alive into the next), and the rerun is a
no-op."""

import json
import subprocess
import sys

from conftest import build_tiny_model, write_recipe


KINDS = [{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "rtn", "bits": 8, "symmetric": False},
         {"method": "fp8"}, {"method": "none", "kv_cache": {"dtype": "int8"}}]


def _variants() -> list[dict]:
    """Five rounds of the same four kinds under new names: a variant's peak is compared with the same kind's in the
    first round, so a difference is growth across variants, not the difference between methods."""
    return [{"name": f"round{r}-{i}", **kind} for r in range(5) for i, kind in enumerate(KINDS)]


def test_twenty_variant_sweep_memory_is_flat_and_rerun_is_a_noop(tmp_path, calib_file):
    # 8 layers of 512 x 2048: ~126 MB of fp32 weights, so one model kept alive per variant would add ~2.4 GB
    model = build_tiny_model(tmp_path / "model", hidden_size=512, intermediate_size=2048, layers=8)
    weights = (model / "model.safetensors").stat().st_size
    variants = _variants()
    assert len(variants) == 20
    recipe = write_recipe(tmp_path, model, calib_file, variants)
    cmd = [sys.executable, "-m", "compress", "run", str(recipe)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    records = json.loads((tmp_path / "run" / "results.json").read_text())["variants"]
    assert [r["status"] for r in records] == ["ok"] * 21  # the 20, and the baseline row every recipe gets
    peaks = [r["compress_peak_memory_bytes"] for r in records[1:]]
    print("peak RSS per variant (MB):", [round(p / 1e6) for p in peaks])
    # each kind's last-round peak is less than one model above its first-round peak; a leak of one model per variant
    # would put it 16 models higher. (Before llm-compressor's session was released after each variant, one quantized
    # model stayed alive into the next variant's peak.)
    for i in range(len(KINDS)):
        assert peaks[16 + i] - peaks[i] < weights, [round(p / 1e6) for p in peaks]

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    records = json.loads((tmp_path / "run" / "results.json").read_text())["variants"]
    assert all(r["cached"] for r in records)
    assert "stage load" not in second.stderr and "stage compress" not in second.stderr
