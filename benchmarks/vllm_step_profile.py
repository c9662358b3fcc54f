"""Where a served decode step goes on a CPU: vLLM's own torch profiler around one batch-1 request, its operators'
self time per step, and what is left outside them (Python, scheduling, sampling bookkeeping).

    python benchmarks/vllm_step_profile.py runs/smollm2-135m-lab/baseline runs/smollm2-135m-lab/gptq-w4a16

Each checkpoint is served as compress serves it (the card's line, --enforce-eager, compress's CPU switches and
binding: eval/served_setup.env_vars), with `--profiler-config` set to vLLM's torch profiler (CPU activities, no stacks).
After a warm-up request, POST /start_profile, one streamed request of `--new-tokens` tokens at concurrency 1,
POST /stop_profile; the trace vLLM's worker writes is read back here. Per decode step: the wall time (the engine's
own inter-token latency, from /metrics, over the profiled request), the self time of every operator the profiler
saw, summed by operator and grouped (GEMM, attention, the rest), and the remainder. The roofline bound's step time
(the bytes vLLM reads per token / read bandwidth) is printed beside, so the account reads: of X ms per step, the
memory traffic needs Y, the matrix multiplications take Z, everything else W. Profiling slows the step itself;
shares, not absolute times, are the result. Prints a table, then JSON last.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from compress.environment import configure_cpu, cpu_features  # noqa: E402

GEMM = ("mm", "addmm", "linear", "matmul", "bmm", "onednn", "gemm", "scaled_mm", "weight_packed_linear",
        "int4_scaled_mm", "wna16")
ATTENTION = ("attention", "attn", "paged", "sdpa")


def group(name: str) -> str:
    low = name.lower()
    if any(k in low for k in GEMM):
        return "GEMM"
    if any(k in low for k in ATTENTION):
        return "attention"
    return "other ops"


def self_times(events: list[dict]) -> dict[str, float]:
    """Self time (µs) per operator name from a chrome trace's complete events: each event's duration minus that
    of the events nested directly inside it on the same thread."""
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function") and "dur" in e:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out: dict[str, float] = defaultdict(float)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, children's duration]
        for e in evs:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
                done, kids = stack.pop()
                if done.get("cat") == "cpu_op":
                    out[done["name"]] += done["dur"] - kids
            if stack:
                stack[-1][1] += e["dur"]
            stack.append([e, 0.0])
        for done, kids in stack:
            if done.get("cat") == "cpu_op":
                out[done["name"]] += done["dur"] - kids
    return out


def _post(port: int, path: str, body: dict | None = None) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, json.dumps(body or {}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status}")


def profile(env, folder: Path, args, work: Path, bandwidth: float) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from compress.options import VLLMSettings
    from compress.planner import kv_bytes
    from eval import served_row, served_setup
    from eval.engines import vllm
    from eval.serving import random_prompt

    trace_dir = work / f"trace-{folder.name}"
    config = {"profiler": "torch", "torch_profiler_dir": str(trace_dir), "torch_profiler_with_stack": False,
              "torch_profiler_use_gzip": False, "ignore_frontend": True}
    card_flags = vllm.served_flags(json.loads((folder / "manifest.json").read_text())["record"]["serve"])
    s = VLLMSettings(kv_cache_space_gb=1)
    server = vllm.Server(env, folder, card_flags, name=folder.name, log_path=work / f"{folder.name}.log",
                         extra_flags=["--enforce-eager", "--profiler-config", json.dumps(config)],
                         env_vars=served_setup.env_vars(s, env), ready_timeout_s=1200)
    import random

    prompt = random_prompt(random.Random(0), len(AutoTokenizer.from_pretrained(folder)), args.prompt_tokens)
    payload = {"prompt": prompt, "max_tokens": args.new_tokens, "min_tokens": args.new_tokens, "temperature": 0,
               "ignore_eos": True}
    with server:
        server.stream({**payload, "max_tokens": 8, "min_tokens": 8})
        _post(server.port, "/start_profile")
        before = server.itl_counters()
        t0 = time.perf_counter()
        sent, times, tokens = server.stream(payload)
        wall = time.perf_counter() - t0
        after = server.itl_counters()
        _post(server.port, "/stop_profile")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(trace_dir.rglob("*.json")):
            time.sleep(2)
        time.sleep(3)
    files = sorted(trace_dir.rglob("*.json"))
    if not files:
        raise RuntimeError(f"vLLM wrote no trace under {trace_dir}")
    events = []
    for f in files:
        events += json.loads(f.read_text()).get("traceEvents", [])
    per_op = self_times(events)
    steps = tokens - 1
    itl_ms = 1000 * (after[0] - before[0]) / (after[1] - before[1])
    ops_ms = {name: us / 1000 / steps for name, us in per_op.items()}
    groups = defaultdict(float)
    for name, ms in ops_ms.items():
        groups[group(name)] += ms
    dtype = served_setup.served_dtype(card_flags, None)
    weight = served_row.served_weight_bytes(folder, dtype)
    kv = kv_bytes(AutoConfig.from_pretrained(folder), args.prompt_tokens + args.new_tokens // 2, 1, 2)
    bound_ms = 1000 * (weight + kv) / bandwidth
    top = sorted(ops_ms.items(), key=lambda kv_: -kv_[1])[:args.top]
    return {"checkpoint": folder.name, "itl_ms": itl_ms, "request_s": wall, "steps": steps,
            "groups_ms": dict(groups), "ops_total_ms": sum(ops_ms.values()), "top_ops_ms": top,
            "bound_ms": bound_ms, "trace_files": len(files)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    configure_cpu()
    from eval.engines import vllm_env
    from eval.throughput import measure_bandwidth

    env = vllm_env.ensure("cpu")
    bandwidth = measure_bandwidth(device="cpu")["bytes_per_sec"]
    cpu = cpu_features()
    print(f"# vLLM {env['vllm']} ({env['build']}), {cpu['model']}, flags {', '.join(cpu['flags'])}; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; profiled with vLLM's torch profiler (slows each step)", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(prefix="compress-vllm-profile-") as tmp:
        for folder in args.folders:
            r = profile(env, folder, args, Path(tmp), bandwidth)
            results.append(r)
            g = r["groups_ms"]
            print(f"\n{folder.name}: {r['itl_ms']:.1f} ms per step (profiled), {r['steps']} steps; read-bandwidth "
                  f"bound {r['bound_ms']:.2f} ms", file=sys.stderr)
            print(f"  operators' self time {r['ops_total_ms']:.1f} ms: GEMM {g.get('GEMM', 0):.1f}, attention "
                  f"{g.get('attention', 0):.1f}, other ops {g.get('other ops', 0):.1f}; outside any operator "
                  f"{r['itl_ms'] - r['ops_total_ms']:.1f} ms", file=sys.stderr)
            for name, ms in r["top_ops_ms"]:
                print(f"    {ms:7.2f} ms  {name}", file=sys.stderr)
    print("\n| checkpoint | step ms (profiled) | bound ms | GEMM ms | attention ms | other ops ms | outside ops ms |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        g = r["groups_ms"]
        print(f"| {r['checkpoint']} | {r['itl_ms']:.1f} | {r['bound_ms']:.2f} | {g.get('GEMM', 0):.1f} | "
              f"{g.get('attention', 0):.1f} | {g.get('other ops', 0):.1f} | {r['itl_ms'] - r['ops_total_ms']:.1f} |")
    print(json.dumps({"cpu": cpu, "bandwidth_bytes_per_sec": bandwidth, "vllm": env["vllm"], "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
