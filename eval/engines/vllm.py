"""The vLLM engine: a checkpoint served by vLLM's OpenAI-compatible server, in a subprocess, from vLLM's own
environment (eval/engines/vllm_env.py), and the client calls every vLLM figure is made of.

Why a server and not `vllm.LLM` in-process: vLLM cannot share compress's environment (eval/engines/vllm_env.py
says why), and a server is how it is deployed: what is measured here is the `vllm serve` command the model card
prints, run as written, plus only what a harness must add (the address, a model name, eager mode on a CPU, which
loads several times faster than torch.compile's warm-up and decodes somewhat slower:
benchmarks/results/vllm_cpu_settings_spr_compiled.txt); the report lists both.

The server's life: a free port on 127.0.0.1; its output to a log file; ready when GET /health answers 200
(or failed when the process exits first: the log's last error is the reason, and the row says it); stopped with
SIGTERM to its whole process group (the API server and its engine-core and worker processes), SIGKILL after a
grace period. It also dies with compress: the API server gets SIGTERM when its parent dies (PR_SET_PDEATHSIG),
and a SIGTERM to compress runs the same stop, so a killed run leaves no server holding the port and the memory.

The client is the standard library's http.client: completions with token-id prompts (so every engine reads the
same tokens), `return_token_ids` for greedy agreement, `prompt_logprobs` for perplexity, and streamed responses
(server-sent events) timed chunk by chunk for TTFT and TPOT.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from compress.stop import descendants, terminate_raises

ENTRYPOINT = "vllm.entrypoints.openai.api_server"
# vLLM's log line naming the kernel of each quantized linear method, e.g.
# "Using CPUWNA16LinearKernel for CompressedTensorsWNA16", "Using MacheteLinearKernel for CompressedTensorsWNA16"
_KERNEL = re.compile(r"(?:Using|Selected) (\w+) for ([\w-]+(?: [\w-]+)*)")
# compress's own thread settings (compress/environment.configure_cpu sets OMP_NUM_THREADS etc. to every core) must
# not reach vLLM: its CPU worker binds its OpenMP threads to the cores it picks (VLLM_CPU_OMP_THREADS_BIND; one of
# two here), and an inherited OMP_NUM_THREADS=2 on that one core oversubscribes it: decode became many times slower
# (tests/eval/engines/test_vllm.py checks that these never reach the server's environment)
INHERITED_THREAD_VARS = frozenset({"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "COMPRESS_THREADS",
                                   "GOMP_CPU_AFFINITY", "KMP_AFFINITY"})
_ERROR = re.compile(r"(Error|Exception|error:|ValueError|NotImplementedError|RuntimeError)")


def served_flags(serve_command: str) -> list[str]:
    """The flags of a model card's `vllm serve FOLDER [flags]` line (what is measured is served with exactly
    these)."""
    parts = shlex.split(serve_command)
    if parts[:2] != ["vllm", "serve"] or len(parts) < 3:
        raise ValueError(f"not a `vllm serve FOLDER ...` command: {serve_command!r}")
    return parts[3:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kernels(log_text: str) -> list[str]:
    """The kernels vLLM says it picked for its quantized linear layers, each once, with the last thing it named
    it for (vLLM logs the kernel for 'mixed-precision linear', then for the scheme:
    'CPUWNA16LinearKernel for CompressedTensorsWNA16'); [] for an unquantized model (plain GEMM)."""
    picked: dict[str, str] = {}
    for kernel, what in _KERNEL.findall(log_text):
        if "kernel" in kernel.lower():
            picked[kernel] = what
    return [f"{kernel} for {what}" for kernel, what in picked.items()]


# --- what vLLM computes on a CPU: its switches, set by compress, recorded with every row ---------------------------

# Every CPU server compress starts gets these, so that a row measures the checkpoint's own scheme: vLLM 0.32 would
# otherwise run a W4A16 checkpoint as W4A8 on a CPU with AMX tiles (VLLM_CPU_INT4_W4A8 defaults to 1; see
# kernels/linear/mixed_precision/cpu.py). COMPRESS_VLLM_PROBE makes the server log what each layer computes.
OWN_SCHEME_ENV = {"VLLM_CPU_INT4_W4A8": "0", "COMPRESS_VLLM_PROBE": "1"}


@dataclass(frozen=True)
class RuntimePath:
    """A faster vLLM path on some hardware that changes the arithmetic; a recipe asks for it by name
    (evaluation.vllm.runtime_variants) and gets a second served row of the same checkpoint, measured in full."""

    env: dict
    what: str  # the arithmetic, in words
    applies_to: str  # which checkpoints (declared weight-only int4, ...)
    needs: str  # the hardware, as vLLM decides it
    cpu_flags: tuple[str, ...]  # any one of these /proc/cpuinfo flags is enough
    source: str  # where vLLM decides it (reference, read from vLLM's code, not measured)

    def applies(self, quantization: dict | None) -> bool:
        """Whether a checkpoint's quantization_config is one this path changes."""
        groups = (quantization or {}).get("config_groups") or {}
        integer = all((g.get("weights") or {}).get("type") == "int" for g in groups.values())  # not NVFP4A16's fp4
        return self.applies_to == "int4 weight-only" and declared_weight_bits(quantization) == 4 and integer \
            and declared_activations(quantization) is None


RUNTIME_PATHS = {
    "w4a8": RuntimePath(
        env={"VLLM_CPU_INT4_W4A8": "1"},
        what="int4 weights x activations quantized to uint8 per token (sgl-kernel int4_scaled_mm_cpu)",
        applies_to="int4 weight-only", needs="AMX tiles (Intel Sapphire Rapids and later) or RISC-V",
        cpu_flags=("amx_tile",),
        source="vllm/model_executor/kernels/linear/mixed_precision/cpu.py, vLLM 0.32: use_w4a8 = VLLM_CPU_INT4_W4A8 "
               "and bf16 activations and (AMX or RISC-V)"),
}


def declared_weight_bits(quantization: dict | None) -> int | None:
    groups = (quantization or {}).get("config_groups") or {}
    bits = {(g.get("weights") or {}).get("num_bits") for g in groups.values()}
    return bits.pop() if len(bits) == 1 else None


def declared_activations(quantization: dict | None) -> str | None:
    """What a compressed-tensors config says its quantized layers' activations are ("int8, token, dynamic"), None
    for weight-only (16-bit activations) or no quantization."""
    for g in ((quantization or {}).get("config_groups") or {}).values():
        a = g.get("input_activations")
        if a:
            return f"{a.get('type', '?')}{a.get('num_bits', '')}, {a.get('strategy', '?')}, " \
                   f"{'dynamic' if a.get('dynamic') else 'static'}"
    return None


_BINDING = re.compile(r"OpenMP thread binding info:.*?reserved_cpus=\[[^\]]*\]", re.S)


def binding(log_text: str) -> str | None:
    """vLLM's OpenMP binding, from its log ("VLLM_CPU_OMP_THREADS_BIND='auto' ... local_rank=0, core ids=[0]
    reserved_cpus=[1]"), on one line."""
    m = _BINDING.search(log_text)
    if not m:
        return None
    lines = [ln.split("]", 1)[-1].strip() if "INFO" in ln else ln.strip() for ln in m.group(0).splitlines()]
    return "; ".join(ln for ln in lines if ln and not ln.endswith("binding info:"))


PROBE_MARKER = "COMPRESS_VLLM_LAYERS"  # eval/engines/vllm_probe.py's line in the server log
PROBE_SOURCE = ("vLLM's own layer attributes after loading, logged by compress's probe plugin "
                "(eval/engines/vllm_probe.py)")


def layer_facts(log_text: str) -> dict | None:
    """What the probe plugin logged about the served model's linear layers (the last such line), or None."""
    found = None
    for line in log_text.splitlines():
        if PROBE_MARKER in line:
            found = line.split(PROBE_MARKER, 1)[1].strip()
    if found is None:
        return None
    try:
        return json.loads(found)
    except ValueError:
        return None


def _precision(group: dict, dtype: str) -> tuple[str, str, bool | None]:
    """(activations, GEMM, activations quantized: None when unknown) of one group of layers, from vLLM's resolved
    attributes: the mapping of vLLM 0.32's CPU kernels (kernels/linear/mixed_precision/cpu.py, scaled_mm/cpu.py,
    scaled_mm/pytorch.py, layers/utils.dispatch_cpu_unquantized_gemm) to the arithmetic they do."""
    kernel, method, scheme = group.get("kernel") or "", group.get("method") or "", group.get("scheme") or ""
    if kernel == "CPUWNA16LinearKernel":
        if group.get("use_w4a8"):
            return "uint8, per token, dynamic", "int4_scaled_mm_cpu (W4A8)", True
        return dtype, f"cpu_gemm_wna16 (W4A16, isa {group.get('isa_hint', '?')})", False
    if "Int8" in kernel:
        scope = "per tensor, static" if group.get("is_static_input_scheme") else "per token, dynamic"
        sym = "" if group.get("input_symmetric", True) else ", asymmetric"
        gemm = "sgl-kernel int8 GEMM (AMX)" if "sgl" in (group.get("kernel_method") or "") else "oneDNN int8 GEMM"
        return f"int8, {scope}{sym}", gemm, True
    if "FP8" in kernel or "Fp8" in method or "Fp8" in scheme:
        scope = "per tensor" if group.get("act_per_tensor", "PerTensor" in kernel) else "per token"
        how = "static" if group.get("is_static_input_scheme") else "dynamic"
        gemm = f"{kernel} (torch._scaled_mm, emulated on a CPU)" if "Torch" in kernel else kernel or "unknown kernel"
        return f"fp8 e4m3, {scope}, {how}", gemm, True
    if method.startswith("Unquantized"):
        if "Embedding" in method and not str(group.get("layers", "")).endswith("lm_head"):
            return dtype, "embedding lookup", False
        gemm = {"weight_packed_linear_cpu": "sgl-kernel (AMX)", "onednn_mm": "oneDNN",
                "linear": "torch"}.get(group.get("cpu_linear"), "plain GEMM")
        return dtype, gemm, False
    return f"unknown ({scheme or method} {kernel})".replace(" )", ")"), kernel or method, None


def compute_path(facts: dict | None, declared_activations: str | None) -> dict | None:
    """What vLLM computed, in words, per group of linear layers, and whether it is the checkpoint's own scheme:
    `declared_activations` is what the checkpoint's quantization_config says its quantized layers take (None:
    weight-only, 16-bit activations). None when the probe logged nothing (a server of an older environment)."""
    if not facts or "layers" not in facts:
        return None
    dtype = str(facts.get("dtype", "")).removeprefix("torch.")
    groups, quantized_acts = [], set()
    for g in facts["layers"]:
        acts, gemm, act_quantized = _precision(g, dtype)
        quantized = not str(g.get("method", "")).startswith("Unquantized")
        groups.append({"layers": g["layers"], "count": g.get("count"), "activations": acts, "gemm": gemm,
                       "quantized": quantized})
        if quantized:  # None: the layer's dtype; an unknown path is named as such, never taken for the dtype
            quantized_acts.add(None if act_quantized is False else acts)
    own = all((a is None) == (declared_activations is None) and not (a or "").startswith("unknown")
              for a in quantized_acts)
    runs = sorted(a or dtype for a in quantized_acts)
    label = ("unquantized, " + dtype) if not quantized_acts else ", ".join(runs) + " activations"
    return {"dtype": dtype, "groups": groups, "own_scheme": own, "label": label, "source": PROBE_SOURCE,
            "declared_activations": declared_activations or f"none (weight-only: {dtype})"}


_DIED = re.compile(r"Worker proc (\S+) died unexpectedly \(exit code: (-?\d+)\)")


def worker_death(log_text: str) -> str | None:
    """vLLM's own line when a worker process died under it, with the signal named ("its worker VllmWorker-0 died of
    SIGILL (illegal instruction)"), or None."""
    m = _DIED.search(log_text)
    if not m:
        return None
    code = int(m.group(2))
    if code < 0:
        try:
            sig = signal.Signals(-code)
            return f"vLLM's worker {m.group(1)} died of {sig.name} ({signal.strsignal(sig).lower()})"
        except ValueError:
            pass
    return f"vLLM's worker {m.group(1)} died (exit code {code})"


# vLLM's prefix on a process's log lines, e.g. "(Worker pid=10350) ERROR 12-07 13:21:34 [multiproc_executor.py:953] "
_LOG_PREFIX = re.compile(r"^\((?:[\w ]+ )?pid=\d+\) [A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]+\] ?")
_EXCEPTION = re.compile(r"^[\w.]*(Error|Exception)\b:?")
# errors that only wrap the real one, which vLLM logged before them
_WRAPPER = re.compile(r"root cause")  # "See root cause above", "See stack trace for root cause"


def failure_reason(log_text: str) -> str:
    """vLLM's own reason from the log of a server that died: the last error line that is not a wrapper around an
    earlier one ("Engine core initialization failed. See root cause above"), with the indented lines that detail it
    (a pydantic error's cause, the kernels vLLM tried and why each refused), or the log's last line."""
    lines = [_LOG_PREFIX.sub("", ln.rstrip()) for ln in log_text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if ln.strip()]
    # an exception's own line ("ValueError: ...") before any line that merely mentions one (a warning, the
    # traceback's `raise ValueError(` source line, which is indented)
    errors = ([i for i, ln in enumerate(lines) if _EXCEPTION.match(ln)] or
              [i for i, ln in enumerate(lines) if _ERROR.search(ln) and not ln.startswith((" ", "\t"))])
    at = max((i for i in errors if not _WRAPPER.search(lines[i])), default=max(errors, default=None))
    if at is None:
        return (lines or ["no output"])[-1].strip()[-400:]
    text = lines[at].strip()
    details = []
    for ln in lines[at + 1:]:
        if not ln.startswith((" ", "\t")) or "File " in ln or ln.strip().startswith("For further information"):
            break
        details.append(ln.strip())
    if details:
        # "CPUWNA16LinearKernel cannot implement due to: Quant type ..." -> "CPUWNA16LinearKernel: Quant type ...",
        # so that every kernel's reason fits (the CPU kernel's, which says what it takes, comes last)
        text = text.rstrip(": ") + " — " + "; ".join(_REFUSED.sub(": ", d) for d in details)
    elif text.endswith("Reasons:"):  # vLLM lists none when no kernel of that kind exists on its platform
        text += " none listed"
    return _clip(text, REASON_CHARS)


REASON_CHARS = 400  # a reason is a table cell: vLLM's exception line and its details, at most this long
_REFUSED = re.compile(r" cannot implement due to: ")


def _clip(text: str, limit: int) -> str:
    """`text` within `limit` characters, cut after its last whole detail ("; ") or word, marked with "…"."""
    if len(text) <= limit:
        return text
    head = text[:limit - 2]
    cut = max(head.rfind("; "), head.rfind(" — "))
    return (head[:cut] if cut > limit // 2 else head.rsplit(" ", 1)[0]).rstrip(" ;,") + " …"


def server_env(parent: dict, extra: dict) -> dict:
    """The server's environment: ours without our thread settings (INHERITED_THREAD_VARS) and PYTHONPATH (vLLM's
    environment is its own), plus `extra`."""
    env = {k: v for k, v in parent.items() if k not in INHERITED_THREAD_VARS and k != "PYTHONPATH"}
    return {**env, **extra, "PYTHONUNBUFFERED": "1"}


def _term_with_parent() -> None:
    """In the server process: SIGTERM when compress dies (then vLLM stops its own children), own process group."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerFailed(RuntimeError):
    """vLLM could not serve the checkpoint (its process exited, or never became healthy); the message is why."""


class Server:
    """`vllm serve FOLDER FLAGS` from vLLM's environment, as a context manager (start, wait healthy, stop)."""

    def __init__(self, env: dict, folder: Path, flags: list[str], *, name: str, log_path: Path,
                 extra_flags: list[str] = (), env_vars: dict | None = None, ready_timeout_s: float = 900):
        self.env, self.folder, self.name, self.log_path = env, Path(folder), name, Path(log_path)
        self.port = free_port()
        self.flags = list(flags)  # the model card's
        self.extra_flags = list(extra_flags)  # what the harness adds beside the address and the model name
        self.harness_flags = ["--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port),
                              *self.extra_flags]
        self.env_vars = dict(env_vars or {})
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.load_s: float | None = None
        self._term: contextlib.ExitStack | None = None

    @property
    def command(self) -> list[str]:
        return [self.env["python"], "-m", ENTRYPOINT, "--model", str(self.folder.resolve()), *self.flags,
                *self.harness_flags]

    def start(self) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        env = server_env(os.environ, self.env_vars)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, preexec_fn=_term_with_parent)
        log.close()
        if self._term is None:
            # a SIGTERM to compress must stop the server too: it raises compress.stop.Terminated (a SystemExit) in
            # this process, so `finally`/`__exit__` run; in a fork of this process (lm-eval's bootstrap pool) it
            # keeps its default action (compress/stop.py says why)
            self._term = contextlib.ExitStack()
            self._term.enter_context(terminate_raises())
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.load_s = time.perf_counter() - t0
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"vLLM exited with code {self.proc.returncode}: {failure_reason(self.log())}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise ServerFailed(f"vLLM did not answer /health within {self.ready_timeout_s:.0f} s "
                           f"({failure_reason(self.log())})")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """The server's process tree now (API server, engine core, workers): their CPU time is ours, not
        contention, when eval/contention judges a window."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]

    def stop(self, grace_s: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._term is not None:
            self._term.close()
            self._term = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the client ---------------------------------------------------------------------------------------------

    def post(self, payload: dict, timeout_s: float = 600) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        conn.request("POST", "/v1/completions", json.dumps({"model": self.name, **payload}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"vLLM answered {resp.status}: {body[:300].decode(errors='replace')}")
        return json.loads(body)

    def stream(self, payload: dict, timeout_s: float = 600,
               deadline_s: float | None = None) -> tuple[float, list[float], int]:
        """A streamed completion: (time sent, arrival time of each chunk that carried text, output tokens as the
        server counted them), all from time.perf_counter(). `timeout_s` bounds each wait for the next bytes;
        `deadline_s` the whole response: past it the connection is closed (vLLM aborts the request) and
        TimeoutError raised."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        body = json.dumps({"model": self.name, **payload, "stream": True, "stream_options": {"include_usage": True}})
        sent = time.perf_counter()
        end = sent + deadline_s if deadline_s is not None else None

        def wait_bound() -> None:  # the next read may wait until the deadline, never past it
            if end is not None:
                left = end - time.perf_counter()
                if left <= 0:
                    raise TimeoutError(f"the response took longer than {deadline_s:g} s")
                sock.settimeout(min(timeout_s, left))

        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        sock = conn.sock  # the response reads from it after the connection hands it over (conn.sock is then None)
        resp = None
        times, tokens = [], 0
        try:
            wait_bound()
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"vLLM answered {resp.status}: {resp.read()[:300].decode(errors='replace')}")
            while True:
                wait_bound()
                if not (line := resp.readline()):
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
        except TimeoutError:  # the deadline, or one wait past timeout_s: hang up, so that vLLM aborts the request
            if resp is not None:
                resp.close()
            sock.close()
            raise
        conn.close()
        return sent, times, tokens

    def itl_counters(self) -> tuple[float, int] | None:
        """vLLM's own inter-token latency so far: (sum of seconds, count) of its histogram on /metrics."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode(errors="replace")
        except OSError:
            return None
        total = count = None
        for line in text.splitlines():
            if line.startswith("vllm:inter_token_latency_seconds_sum"):
                total = float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:inter_token_latency_seconds_count"):
                count = int(float(line.rsplit(" ", 1)[1]))
        return (total, count) if total is not None and count is not None else None

    def greedy(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation (temperature 0, EOS ignored) of a token-id prompt, as token ids."""
        out = self.post({"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                         "return_token_ids": True})
        return out["choices"][0]["token_ids"]

    def prompt_logprobs(self, ids: list[int]) -> list[float | None]:
        """log p(token t | tokens < t) of every prompt token, as vLLM computes it (None for the first)."""
        out = self.post({"prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
        values = []
        for tok, entry in zip(ids, out["choices"][0]["prompt_logprobs"]):
            values.append(None if entry is None else entry[str(tok)]["logprob"])
        return values


def open_decoder(server: Server, *, prompt_ids: list[int], new_tokens: int):
    """A running server as a batch-1 timed decode `one_run() -> (ttft_s, decode_s, tokens)` of exactly
    `new_tokens` streamed greedy tokens, its close() (the server's owner stops it) and what it runs on; the same
    shape as the other engines' decoders, so eval/interleaved times vLLM rows against their baseline the same way.
    decode_s runs from the first token to the last, the tokens counted by the server."""
    from eval.throughput import check_new_tokens

    check_new_tokens(new_tokens)
    payload = {"prompt": prompt_ids, "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0,
               "ignore_eos": True}

    def one_run() -> tuple[float, float, int]:
        sent, times, tokens = server.stream(payload)
        if not times:
            raise RuntimeError("vLLM streamed no tokens")
        return times[0] - sent, times[-1] - times[0], tokens

    return one_run, (lambda: None), {"engine": "vllm", "device": "cpu" if server.env.get("build") == "cpu" else "cuda",
                                      "engine_version": f"vLLM {server.env.get('vllm')} ({server.env.get('build')})"}
