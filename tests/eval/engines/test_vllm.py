"""eval/engines/vllm.py, vllm_env.py and eval/served.py: the pieces without a server, then the tiny model's W4A16
and W8A8 checkpoints served by the real vLLM CPU engine through `compress run` (load, kernel, agreement,
perplexity, the sweep's figures, the ratio, the rerun that reuses them), a variant vLLM cannot serve, and a server
that dies with a killed run.

The served tests need vLLM's environment (`python -m eval.engines.vllm_env install`, which .ci/run does); without
it they are skipped here and fail in CI (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.options import InputError
from conftest import build_tiny_model, perplexity_data, write_recipe
from eval import agreement, served, served_row, served_setup
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


def test_failure_reason_is_the_root_cause_with_its_details():
    """vLLM's engine wraps the worker's error ("See root cause above"); the reason is the worker's, with the kernels
    vLLM tried and why each refused (the log of a W8A16 checkpoint on vLLM 0.32's CPU build, shortened)."""
    w = "(Worker pid=10350) ERROR 12-07 13:21:34 [multiproc_executor.py:953] "
    log = (f"{w}Traceback (most recent call last):\n{w}  File \"x.py\", line 930, in choose_mp_linear_kernel\n"
           f"{w}    raise ValueError(\n"
           f"{w}ValueError: Failed to find a kernel that can implement the WNA16 linear layer. Reasons: \n"
           f"{w} Dynamic4bitLinearKernel cannot implement due to: Unsupported quant type uint8b128\n"
           f"{w} CPUWNA16LinearKernel cannot implement due to: Quant type (uint8b128) not supported by CPUWNA16\n"
           "(EngineCore pid=10340) INFO 12-07 13:21:35 [core.py:1] [shutdown] Executor: all workers exited\n"
           "Exception: WorkerProc initialization failed due to an exception in a background process. See stack "
           "trace for root cause.\n"
           "EngineCore failed to start.\nTraceback (most recent call last):\n  File \"core.py\", line 1482\n"
           "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n")
    assert vllm.failure_reason(log) == (
        "ValueError: Failed to find a kernel that can implement the WNA16 linear layer. Reasons — "
        "Dynamic4bitLinearKernel: Unsupported quant type uint8b128; "
        "CPUWNA16LinearKernel: Quant type (uint8b128) not supported by CPUWNA16")


def test_a_long_reason_ends_at_a_whole_detail():
    """A reason is one table cell: past its length it ends after the last whole detail, never inside a word."""
    details = "".join(f" Kernel{i}LinearKernel cannot implement due to: needs feature number {i} of this CPU\n"
                      for i in range(12))
    reason = vllm.failure_reason("ValueError: Failed to find a kernel. Reasons: \n" + details)
    assert len(reason) <= vllm.REASON_CHARS and reason.endswith("of this CPU …")
    assert "Kernel0LinearKernel: needs feature number 0 of this CPU; Kernel1LinearKernel" in reason


def test_server_env_drops_our_thread_settings():
    """compress sets OMP_NUM_THREADS to every core for itself; vLLM binds its own OpenMP threads (one core of two
    here), and the inherited setting oversubscribed that core: decode many times slower."""
    env = vllm.server_env({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONPATH": "/repo", "HOME": "/root"},
                          {"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert env == {"HOME": "/root", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}


def test_agreement_counts_tokens_before_the_first_divergence():
    a = agreement.agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert a["matched_tokens"] == [2, 4] and a["identical"] == 1 and a["share"] == pytest.approx(6 / 8)


def test_agreement_is_judged_at_the_served_dtype_against_its_noise_floor():
    ref = {"float32": {"greedy": [[1, 2, 3, 4]], "perplexity": {"value": 10.0, "tokens": 8}},
           "bfloat16": {"greedy": [[1, 2, 3, 5]], "perplexity": {"value": 10.05, "tokens": 8}}}
    ppl = {"value": 10.06, "tokens": 8, "windows": 1, "context": 8, "stride": 8}
    ok = agreement.compare([[1, 2, 3, 5]], ppl, ref, "bfloat16", "float32")
    assert ok["agreement"]["matched_tokens"] == [4] and ok["agreement_vs_float32"]["matched_tokens"] == [3]
    assert ok["noise_floor"]["matched_tokens"] == [3] and ok["checks"] == []
    assert ok["perplexity"]["transformers_value"] == 10.05 and ok["perplexity"]["transformers_float32_value"] == 10.0
    bad = agreement.compare([[9, 2, 3, 5]], {**ppl, "value": 10.3}, ref, "bfloat16", "float32")
    assert len(bad["checks"]) == 2 and "below half its noise floor" in bad["checks"][0] and "+2.5%" in bad["checks"][1]


PROBE_W4A16 = {"dtype": "torch.bfloat16", "layers": [
    {"layers": "model.layers.*.self_attn.qkv_proj", "method": "CompressedTensorsLinearMethod",
     "scheme": "CompressedTensorsWNA16", "kernel": "CPUWNA16LinearKernel", "use_w4a8": False, "isa_hint": "amx",
     "act_type": "torch.bfloat16", "count": 30},
    {"layers": "lm_head", "method": "UnquantizedLinearMethod", "cpu_linear": "onednn_mm", "count": 1}]}


def test_compute_path_says_what_vllm_computed_and_whether_it_is_the_checkpoints_scheme():
    own = vllm.compute_path(PROBE_W4A16, None)
    assert own["own_scheme"] and own["label"] == "bfloat16 activations"
    assert own["groups"][0]["gemm"] == "cpu_gemm_wna16 (W4A16, isa amx)" and own["groups"][1]["gemm"] == "oneDNN"
    w4a8 = {**PROBE_W4A16, "layers": [{**PROBE_W4A16["layers"][0], "use_w4a8": True}, PROBE_W4A16["layers"][1]]}
    path = vllm.compute_path(w4a8, None)
    assert not path["own_scheme"] and path["label"] == "uint8, per token, dynamic activations"
    int8 = {"dtype": "torch.bfloat16", "layers": [
        {"layers": "model.layers.*.mlp.down_proj", "method": "CompressedTensorsLinearMethod",
         "kernel": "CPUInt8ScaledMMLinearKernel", "is_static_input_scheme": False, "input_symmetric": True,
         "kernel_method": "_apply_weights_sgl", "count": 30}]}
    path = vllm.compute_path(int8, "int8, token, dynamic")
    assert path["own_scheme"] and path["groups"][0]["gemm"] == "sgl-kernel int8 GEMM (AMX)"
    fp8 = {"dtype": "torch.bfloat16", "layers": [  # the lab's fp8-dynamic: the kernel is the scheme's fp8_linear
        {"layers": "model.layers.*.mlp.down_proj", "method": "CompressedTensorsLinearMethod",
         "scheme": "CompressedTensorsW8A8Fp8", "kernel": "ChannelWiseTorchFP8ScaledMMLinearKernel",
         "is_static_input_scheme": False, "act_per_tensor": False, "count": 30}]}
    path = vllm.compute_path(fp8, "float8, token, dynamic")
    assert path["own_scheme"] and path["label"] == "fp8 e4m3, per token, dynamic activations", path
    assert "emulated" in path["groups"][0]["gemm"]
    unknown = {"dtype": "torch.bfloat16", "layers": [  # a probe that found no kernel: never labelled bf16
        {"layers": "model.layers.*.mlp.down_proj", "method": "CompressedTensorsLinearMethod",
         "scheme": "CompressedTensorsW4A4Nvfp4", "count": 30}]}
    path = vllm.compute_path(unknown, None)
    assert not path["own_scheme"] and path["label"].startswith("unknown (CompressedTensorsW4A4Nvfp4)"), path
    assert vllm.compute_path(None, None) is None
    assert vllm.layer_facts(f"x\n(EngineCore pid=1) {vllm.PROBE_MARKER} {json.dumps(PROBE_W4A16)}\n") == PROBE_W4A16


def test_every_cpu_server_keeps_the_checkpoints_scheme_and_a_runtime_path_sets_its_own():
    env = {"build": "cpu"}
    from compress.options import VLLMSettings

    s = VLLMSettings()
    own = served_setup.env_vars(s, env)
    assert own["VLLM_CPU_INT4_W4A8"] == "0" and own["COMPRESS_VLLM_PROBE"] == "1"
    assert served_setup.env_vars(s, env, "w4a8")["VLLM_CPU_INT4_W4A8"] == "1"
    assert "VLLM_CPU_INT4_W4A8" not in served_setup.env_vars(s, {"build": "cuda"})
    w4a16 = {"config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}, "input_activations": None}}}
    nvfp4a16 = {"config_groups": {"g": {"weights": {"num_bits": 4, "type": "float"}, "input_activations": None}}}
    w8a8 = {"config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}, "input_activations": {
        "num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}}
    assert vllm.RUNTIME_PATHS["w4a8"].applies(w4a16) and not vllm.RUNTIME_PATHS["w4a8"].applies(w8a8)
    assert not vllm.RUNTIME_PATHS["w4a8"].applies(nvfp4a16)  # fp4 weights: not CPUWNA16's int4
    assert vllm.declared_activations(w8a8) == "int8, token, dynamic"


def test_a_runtime_path_says_why_it_does_not_apply(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}, "input_activations": None}}}}))
    row = {"checkpoint": str(tmp_path), "scheme": "W4A16-g64"}
    amd = {"model": "AMD EPYC 9R14", "flags": ["avx512f", "avx512_bf16"]}
    why = served_setup.runtime_not_here("w4a8", row, amd, "cpu")
    assert "amx_tile" in why and "AMD EPYC 9R14" in why and "avx512_bf16" in why
    assert served_setup.runtime_not_here("w4a8", row, {"flags": ["amx_tile"]}, "cpu") is None
    assert "W8A8" in served_setup.runtime_not_here("w4a8", {**row, "checkpoint": str(tmp_path / "none"), "scheme": "W8A8"},
                                             {"flags": ["amx_tile"]}, "cpu")


def test_a_dead_worker_is_named_with_its_signal():
    text = ("(EngineCore pid=20727) ERROR 12-06 01:34:07 [multiproc_executor.py:315] Worker proc VllmWorker-0 died "
            "unexpectedly (exit code: -4), shutting down executor.\n")
    assert vllm.worker_death(text) == "vLLM's worker VllmWorker-0 died of SIGILL (illegal instruction)"
    assert vllm.worker_death("all fine") is None


def test_binding_is_read_from_the_log():
    text = ("(EngineCore pid=5) INFO 12-06 01:00:00 [ompmultiprocessing.py:180] OpenMP thread binding info: \n"
            "\tVLLM_CPU_OMP_THREADS_BIND='auto', auto_setup=True, skip_setup=False\n"
            "\tlocal_world_size=1, reserve_cpu_num=1\n\tlocal_rank=0, core ids=[0]\n\treserved_cpus=[1]\n")
    assert vllm.binding(text) == ("VLLM_CPU_OMP_THREADS_BIND='auto', auto_setup=True, skip_setup=False; "
                                  "local_world_size=1, reserve_cpu_num=1; local_rank=0, core ids=[0]; "
                                  "reserved_cpus=[1]")


def test_the_probe_is_a_wheel_with_vllms_plugin_entry_point(tmp_path):
    import zipfile

    wheel = vllm_env.probe_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "compress_vllm_probe.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert b"[vllm.general_plugins]" in zipfile.ZipFile(wheel).read(entry)


def test_served_weight_bytes_counts_float_tensors_at_the_served_dtype(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 8), "q": torch.zeros(4, 2, dtype=torch.int32), "s": torch.zeros(4, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"))
    assert served_row.served_weight_bytes(tmp_path, "float32") == 32 * 4 + 8 * 4 + 4 * 4
    assert served_row.served_weight_bytes(tmp_path, "bfloat16") == 32 * 2 + 8 * 4 + 4 * 2


def test_not_served_rows_say_why():
    assert "llama.cpp" in served_setup.not_served({"gguf": {"file": "x.gguf"}})
    assert "int8" in served_setup.not_served({"kv_cache": {"dtype": "int8"}, "kv_in_checkpoint": False})
    assert served_setup.not_served({"kv_cache": {"dtype": "fp8"}, "kv_in_checkpoint": True}) is None
    assert served_setup.not_served({"name": "x"}) is None


class _SlowServer:
    """A server whose 4-token probe takes `seconds` (or never answers: TimeoutError after the timeout it is given)."""

    def __init__(self, folder: Path, seconds: float | None):
        self.folder, self.seconds, self.load_s, self.flags, self.timeouts = folder, seconds, 1.0, [], []
        self.deadlines: list[float | None] = []

    def log(self) -> str:
        return LOG

    def stream(self, payload: dict, timeout_s: float = 600, deadline_s: float | None = None):
        self.timeouts.append(timeout_s)
        self.deadlines.append(deadline_s)
        if self.seconds is None or (deadline_s is not None and self.seconds > deadline_s):
            raise TimeoutError("timed out")
        return 0.0, [self.seconds / 4 * (i + 1) for i in range(4)], 4

    def greedy(self, *a, **k):
        raise AssertionError("a too-slow row is measured no further")


@pytest.mark.parametrize("seconds, floor, status", [(2.0, None, "too slow"), (None, None, "too slow"),
                                                    (0.1, None, "measured"), (2.0, 1.0, "measured")])
def test_the_speed_probe_stops_a_row_too_slow_to_measure(tmp_path, seconds, floor, status):
    """Never wait on what is known to fail: a first probe not finished within probe_timeout_s, or a timed one not
    finished by the time its rate can only be below the floor (4 tokens / floor: half the SLO's per-user pace by
    default, or min_tok_per_sec) makes the row "too slow", with its kernel, and nothing else is asked of the
    server; a faster one goes on to be measured."""
    from types import SimpleNamespace

    from compress.options import Evaluation

    ev = Evaluation(tasks=[], perplexity=None, vllm={"min_tok_per_sec": floor, "probe_timeout_s": 5})
    server = _SlowServer(tmp_path, seconds)
    tokenizer = lambda text: SimpleNamespace(input_ids=[1, 2, 3])  # noqa: E731
    call = lambda: served_row.measure(server, ev=ev, record={"name": "fp8", "checkpoint": str(tmp_path)},  # noqa: E731
                                      tokenizer=tokenizer, ppl_ids=None, reference={}, run_dtype="float32",
                                      bandwidth=None)
    if status == "measured":
        with pytest.raises(AssertionError, match="measured no further"):
            call()
        return
    out = call()
    assert out["status"] == "too slow" and "CPUWNA16LinearKernel" in out["reason"] and set(server.timeouts) == {5}
    if seconds is None:
        assert out["probe_timeout_s"] == 5 and "did not finish within 5 s" in out["reason"]
        assert server.deadlines == [5]
    else:  # 2 s for 4 tokens: cut at 4 / 5 tok/s = 0.8 s, before it would have finished
        assert server.deadlines == [5, pytest.approx(0.8)] and out["probe_tok_per_sec_below"] == 5
        assert "within 0.8 s: below 5 tok/s (half the SLO's per-user pace" in out["reason"]


def test_a_cached_too_slow_row_is_measured_again_once_the_settings_let_it_through():
    from compress.options import VLLMSettings

    slow, timed_out = {"status": "too slow", "probe_tok_per_sec": 2.0}, {"status": "too slow", "probe_timeout_s": 60}
    assert served._still_too_slow({"status": "ok"}, VLLMSettings()) is None
    assert served._still_too_slow(slow, VLLMSettings()) is True  # 2 tok/s < 5, half of 1 / 100 ms
    assert served._still_too_slow(slow, VLLMSettings(min_tok_per_sec=1)) is False
    assert served._still_too_slow(slow, VLLMSettings(min_tok_per_sec=0)) is False
    assert served._still_too_slow(timed_out, VLLMSettings()) is True
    assert served._still_too_slow(timed_out, VLLMSettings(probe_timeout_s=600)) is False
    cut = {"status": "too slow", "probe_tok_per_sec_below": 5.0}  # the timed probe cut at the default floor's deadline
    assert served._still_too_slow(cut, VLLMSettings()) is True
    assert served._still_too_slow(cut, VLLMSettings(min_tok_per_sec=1)) is False


def test_stream_gives_up_at_its_deadline_and_not_before(tmp_path):
    """Server.stream against a real socket that sends a token every 0.2 s: with deadline_s 0.5 it raises
    TimeoutError after about 0.5 s (each wait bounded by what is left, though every wait is shorter than
    timeout_s); without it, every token arrives."""
    import http.server
    import threading

    from eval.engines import vllm

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                for _ in range(5):
                    time.sleep(0.2)
                    self.wfile.write(b'data: {"choices": [{"text": "x"}]}\n\n')
                    self.wfile.flush()
                self.wfile.write(b'data: {"choices": [], "usage": {"completion_tokens": 5}}\n\ndata: [DONE]\n\n')
            except OSError:  # the client hung up at its deadline
                pass

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        server = vllm.Server({}, tmp_path, [], name="m", log_path=tmp_path / "log")
        server.port = httpd.server_address[1]
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            server.stream({"prompt": [1]}, timeout_s=5, deadline_s=0.5)
        assert 0.45 < time.perf_counter() - t0 < 0.9
        sent, times, tokens = server.stream({"prompt": [1]}, timeout_s=5)
        assert len(times) == 5 and tokens == 5
    finally:
        httpd.shutdown()


def test_a_rows_key_holds_its_own_lm_eval_pass_only():
    """Adding a row to evaluation.vllm.tasks measures that row again, not every other one; the task settings are
    in the key of the rows that run them."""
    from compress.options import Evaluation

    env = {"vllm": "0.32.0", "torch": "2.13.0", "build": "cpu", "package": "vllm-cpu"}
    rows = {n: {"name": n, "cache_key": n * 3, "serve": f"vllm serve {n}"} for n in ("baseline", "gptq", "rtn")}

    def keys(**ev) -> dict[str, str]:
        e = Evaluation(tasks=["arc_easy"], perplexity=None, **ev)
        return {n: served_setup.key(e, r, rows["baseline"], env, "cpu") for n, r in rows.items()}

    one = keys(vllm={"tasks": ["gptq"]})
    two = keys(vllm={"tasks": ["gptq", "baseline"]})
    assert one["gptq"] == two["gptq"] and one["rtn"] == two["rtn"] and one["baseline"] != two["baseline"]
    assert keys(vllm={"tasks": True}) == keys(vllm={"tasks": ["baseline", "gptq", "rtn"]})
    assert keys(vllm={"tasks": False})["rtn"] == one["rtn"]
    fewer = keys(vllm={"tasks": ["gptq"]}, limit=10)
    assert fewer["gptq"] != one["gptq"] and fewer["rtn"] == one["rtn"]
    # how lm-eval's client batches its requests can flip a near-tie item: it keys the task rows, no other row
    lone = keys(vllm={"tasks": ["gptq"], "tasks_concurrency": 4, "tasks_batch_size": 1})
    assert lone["gptq"] != one["gptq"] and lone["rtn"] == one["rtn"] and lone["baseline"] == one["baseline"]


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
    """The tiny Llama with head_dim 64 (vLLM's CPU attention takes 32..256), rows that 64-groups divide, and an
    lm_head above 1 MiB in bf16 (vocabulary padded to 2304), as every real LLM's is. vLLM 0.32's CPU build creates a
    oneDNN primitive only for an unquantized GEMM that large, and that is what asks Linux for AMX permission; its
    W4A16 kernel on an AMX CPU (isa "amx") does not ask, so with only small layers the worker dies of SIGILL at the
    first W4A16 GEMM (measured here on the 300-token vocabulary; eval/engines/vllm.worker_death names it)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm") / "tiny-llama", hidden_size=256,
                            intermediate_size=512, vocab_size=2304)


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
                    "agreement_tokens": 8, "kv_cache_space_gb": 1, "ratio_rounds": 2, "ratio_new_tokens": 4,
                    "runtime_variants": ["w4a8"]})
    recipe = write_recipe(tmp_path, vllm_model, calib_file,
                          [{"name": "baseline", "method": "baseline"},
                           {"name": "rtn-w4a16", "method": "rtn", "bits": 4, "group_size": 64},
                           {"name": "w8a8-int8", "method": "smoothquant-gptq"}],
                          evaluation=ev)
    proc = _run(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["name"]: r for r in results["variants"]}
    for name in rows:  # the run's fp32 reference came with the main pass; bf16, never loaded there, is computed
        assert f"{name} in transformers, float32: taken by the main pass" in proc.stderr
        assert f"{name} in transformers, bfloat16 (greedy and perplexity" in proc.stderr
    for name, r in rows.items():
        v = r["vllm"]
        assert v["status"] == "ok", (name, v.get("reason"))
        assert v["serve_command"] == r["serve"] and v["engine"]["vllm"] == vllm_env.VLLM_VERSION
        assert (tmp_path / "run" / v["log"]).is_file()
        assert v["env_vars"]["VLLM_CPU_INT4_W4A8"] == "0" and v["compute_path"]["own_scheme"], v["compute_path"]
        assert v["cpu"]["model"] and v["binding"]
        # agreement at the served precision: a random tiny model in bf16 may diverge late, never at once
        a = v["agreement"]
        assert a["reference"] == "transformers, same checkpoint, bfloat16"
        assert a["prompts"] == 2 and all(1 <= m <= 8 for m in a["matched_tokens"]), a
        p = v["perplexity"]
        assert p["tokens"] == p["transformers_tokens"] == r["perplexity"]["tokens"]  # 4 windows, under the cap
        assert p["transformers_float32_value"] == pytest.approx(r["perplexity"]["value"], rel=1e-4)
        assert abs(p["gap"]) < 0.01 and v["checks"] == [], (p, v["checks"])  # equal precision: within 1%
        assert v["sweep"][0]["server_itl_s_mean"] > 0
        assert [lv["concurrency"] for lv in v["sweep"]] == [1, 2]
        for lv in v["sweep"]:
            assert lv["requests"] >= 3 and lv["wall_s"] > 0
            for m in ("ttft", "tpot", "e2e"):
                assert 0 < lv[f"{m}_s_p50"] <= lv[f"{m}_s_p99"] < 60, (m, lv)
            assert lv["output_tok_per_sec"] > 0 and 0 <= lv["slo_met_share"] <= 1
        assert v["decode"]["tok_per_sec"] > 0 and v["decode"]["bound_tok_per_sec"] > 0
    assert rows["baseline"]["vllm"]["kernels"] == []
    assert any("WNA16" in k for k in rows["rtn-w4a16"]["vllm"]["kernels"]), rows["rtn-w4a16"]["vllm"]["kernels"]
    w4 = rows["rtn-w4a16"]
    assert [g["gemm"] for g in w4["vllm"]["compute_path"]["groups"] if g["quantized"]][0].startswith(
        "cpu_gemm_wna16 (W4A16")  # the switch kept it W4A16, whatever the CPU
    runtime = w4["vllm_runtime"]["w4a8"]  # the runtime variant: its own row
    assert set(rows["w8a8-int8"]["vllm_runtime"]) == {"w4a8"} and \
        rows["w8a8-int8"]["vllm_runtime"]["w4a8"]["status"] == "skipped"  # not an int4 weight-only checkpoint
    if "amx_tile" in runtime["cpu"]["flags"]:
        assert runtime["status"] == "ok" and runtime["env_vars"]["VLLM_CPU_INT4_W4A8"] == "1"
        assert not runtime["compute_path"]["own_scheme"]
        assert runtime["compute_path"]["label"] == "uint8, per token, dynamic activations"
        assert runtime["perplexity"]["value"] > 0 and runtime["sweep"] and runtime["speed_ratio"]["rounds"] >= 2
        assert runtime["log"] == "eval/rtn-w4a16.w4a8.vllm.log"
    else:
        assert runtime["status"] == "skipped" and "amx_tile" in runtime["reason"]
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
    assert "serving " not in again.stderr and again.stderr.count("reusing its vLLM figures") == 6
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


@needs_vllm
def test_sigterm_in_the_vllm_stage_keeps_every_finished_measurement(tmp_path, vllm_model, calib_file):
    """A run stopped with SIGTERM while its second row is being served: exit 143, no server left, and results.json
    and the report hold every figure measured so far (both rows' transformers figures, the baseline's vLLM row),
    marked as a partial run that was stopped."""
    data, ev = perplexity_data(tmp_path)
    ev.update(vllm={"concurrency": [1], "prompt_tokens": 16, "output_tokens": 8, "requests_min": 2,
                    "agreement_tokens": 8, "kv_cache_space_gb": 1, "perplexity_windows": 2})
    recipe = write_recipe(tmp_path, vllm_model, calib_file,
                          [{"name": "baseline", "method": "baseline"},
                           {"name": "rtn-w4a16", "method": "rtn", "bits": 4, "group_size": 64}], evaluation=ev)
    proc = subprocess.Popen([sys.executable, "-m", "compress", "run", str(recipe)], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "stage vllm: rtn-w4a16 ready" in line:
            break
    assert proc.poll() is None, "".join(seen[-30:])
    server_pids = [int(p) for p in subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"],
                                                  capture_output=True, text=True).stdout.split()]
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(120) == 143, rest[-3000:]
    assert "stopped by SIGTERM" in rest and "Traceback" not in rest and "Exception ignored" not in rest, rest[-3000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(p) for p in server_pids):
        time.sleep(1)
    assert not any(_alive(p) for p in server_pids)
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    assert results["progress"]["state"] == "stopped" and "SIGTERM" in results["progress"]["reason"]
    rows = {r["name"]: r for r in results["variants"]}
    assert rows["baseline"]["perplexity"]["value"] > 0 and rows["rtn-w4a16"]["perplexity"]["value"] > 0
    assert rows["baseline"]["vllm"]["status"] == "ok" and "vllm" not in rows["rtn-w4a16"]
    report = (out / "report.md").read_text()
    assert "Partial run: stopped (stopped by SIGTERM)" in report
    assert f"{rows['rtn-w4a16']['perplexity']['value']:.2f}" in report


@pytest.mark.parametrize("runtime, message", [
    ({"w4a9": True}, "runtime_variants: unknown ['w4a9']; expected some of ['w4a8']"),
    ({"w4a8": ["gtpq"]}, "runtime_variants.w4a8: ['gtpq'] are not variant names")])
def test_recipe_rejects_unknown_runtime_paths_and_rows(tmp_path, tiny_model, calib_file, runtime, message):
    from compress.recipe import load_recipe

    path = write_recipe(tmp_path, tiny_model, calib_file, [{"name": "baseline", "method": "baseline"}],
                        evaluation={"vllm": {"runtime_variants": runtime}})
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(path)


class _FastServer(_SlowServer):
    """A server that answers every request at once: each greedy request echoes its prompt's first token."""

    pids = staticmethod(lambda: [])
    port, name = 8000, "baseline"

    def greedy(self, prompt_ids, max_tokens):
        return [prompt_ids[0]] * max_tokens

    def stream(self, payload: dict, timeout_s: float = 600, deadline_s: float | None = None):
        n = payload["max_tokens"]
        return 0.0, [0.01 * (i + 1) for i in range(n)], n


def test_a_measured_row_with_tasks_through_vllm_is_a_valid_record(tmp_path, monkeypatch):
    """Everything served_row.measure writes for a fully measured row, tasks through vLLM included, is a field of
    the record's Served block (the run validates each row before it publishes it: an unknown key stopped a lab
    run after its first vLLM row)."""
    from types import SimpleNamespace

    from compress.options import Evaluation
    from compress.record import Served
    from eval import accuracy

    calls = {}

    def fake_tasks(url, name, folder, tasks, data_dir, **kwargs):
        calls.update(kwargs)
        return {t: {"metric": "acc", "value": 0.5, "stderr": 0.05, "n": 2, "items": [0.0, 1.0]} for t in tasks}

    monkeypatch.setattr(accuracy, "run_tasks_served", fake_tasks)
    ev = Evaluation(tasks=["arc_easy"], perplexity=None, data_dir=str(tmp_path),
                    vllm={"concurrency": [1], "tasks": True, "agreement_tokens": 2, "tasks_batch_size": 4})
    tokenizer = type("Tok", (), {"__call__": lambda self, text: SimpleNamespace(input_ids=[1, 2, 3]),
                                 "__len__": lambda self: 100})()
    reference = {"float32": {"greedy": [[1, 1]] * len(ev.selfcheck_prompts), "perplexity": None}}
    out = served_row.measure(_FastServer(tmp_path, 0.01), ev=ev,
                             record={"name": "baseline", "checkpoint": str(tmp_path)}, tokenizer=tokenizer,
                             ppl_ids=None, reference=reference, run_dtype="float32", bandwidth=None)
    assert out["status"] == "ok" and out["tasks"]["arc_easy"]["value"] == 0.5, out
    assert calls["concurrent"] == 8 and calls["batch_size"] == 4
    Served(**out)  # raises on any key the record does not know
