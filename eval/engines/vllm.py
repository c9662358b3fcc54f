"""The vLLM engine: a checkpoint served by vLLM's OpenAI-compatible server, in a subprocess, from vLLM's own
environment (eval/engines/vllm_env.py), and the client calls every vLLM figure is made of.

Why a server and not `vllm.LLM` in-process: vLLM cannot share compress's environment (eval/engines/vllm_env.py
says why), and a server is how it is deployed: what is measured here is the `vllm serve` command the model card
prints, run as written, plus only what a harness must add (the address, a model name, eager mode on a CPU to
keep loading at ~30 s instead of ~3 min of torch.compile); the report lists both.

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

import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

ENTRYPOINT = "vllm.entrypoints.openai.api_server"
# vLLM's log line naming the kernel of each quantized linear method, e.g.
# "Using CPUWNA16LinearKernel for CompressedTensorsWNA16", "Using MacheteLinearKernel for CompressedTensorsWNA16"
_KERNEL = re.compile(r"(?:Using|Selected) (\w+) for ([\w-]+(?: [\w-]+)*)")
# compress's own thread settings (compress/environment.configure_cpu sets OMP_NUM_THREADS etc. to every core) must
# not reach vLLM: its CPU worker binds its OpenMP threads to the cores it picks (VLLM_CPU_OMP_THREADS_BIND; one of
# two here), and an inherited OMP_NUM_THREADS=2 on that one core made decode 20x slower (a W4A16 row: 0.33 tok/s
# against 6.8 tok/s without it, measured on the 2-core VM this was written on)
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


def failure_reason(log_text: str) -> str:
    """The last error of a server log that died (vLLM's own reason), with the indented line that details it when
    there is one (a pydantic error names its cause there), or the log's last line."""
    lines = [ln.rstrip() for ln in log_text.splitlines() if ln.strip()]
    at = max((i for i, ln in enumerate(lines) if _ERROR.search(ln)), default=None)
    if at is None:
        return (lines or ["no output"])[-1].strip()[-400:]
    text = lines[at].strip()
    if at + 1 < len(lines) and lines[at + 1].startswith((" ", "\t")) and "File " not in lines[at + 1]:
        text += " — " + lines[at + 1].strip()
    return text[:400]


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
        self._old_term = None

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
        if self._old_term is None and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            # a SIGTERM to compress must stop the server too: turn it into SystemExit, so `finally`/`__exit__` run
            self._old_term = signal.signal(signal.SIGTERM, _exit_on_term)
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
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None

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

    def stream(self, payload: dict, timeout_s: float = 600) -> tuple[float, list[float], int]:
        """A streamed completion: (time sent, arrival time of each chunk that carried text, output tokens as the
        server counted them), all from time.perf_counter()."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        body = json.dumps({"model": self.name, **payload, "stream": True, "stream_options": {"include_usage": True}})
        sent = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"vLLM answered {resp.status}: {resp.read()[:300].decode(errors='replace')}")
        times, tokens = [], 0
        while line := resp.readline():
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
        conn.close()
        return sent, times, tokens

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


def _exit_on_term(signum, frame):
    raise SystemExit(128 + signum)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc (Linux); [] elsewhere."""
    children: dict[int, list[int]] = {}
    try:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            ppid = int(text[text.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    except OSError:
        return []
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


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
