"""Served batch-1 decode of checkpoints in vLLM's CPU build under each server setting, against the read-bandwidth
bound: which thread binding, stream interval and compile mode a small-CPU deployment should use.

    python benchmarks/vllm_cpu_settings.py runs/smollm2-135m-lab/{baseline,w8a8-int8,gptq-w4a16} --rounds 2

Each (checkpoint, setting) is a fresh `vllm serve` (its model card's line, as eval/served.py serves it, with
compress's CPU switches: VLLM_CPU_INT4_W4A8=0 so W4A16 stays W4A16) plus the setting's flags and environment; then
`--requests` streamed requests at concurrency 1 (128 random prompt tokens, 64 output tokens, a warm-up first). It
reports the client's TPOT p50 and vLLM's own mean inter-token latency (/metrics) beside it, the decode tok/s (1 /
TPOT p50) as a share of the bound (read bandwidth / the bytes vLLM reads per token: its tensors at the served dtype
plus the KV cache), the load time, and vLLM's binding line. Settings run in turn, `--rounds` times, so that a slow
moment of the machine hits every setting alike; the table shows the median over rounds and each round's figure.
Every measured level goes through eval/contention (the server counted as ours) and says when it was contended.

Prints a table, then JSON last; results/ keeps the output of the runs the README cites.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from compress.environment import configure_cpu, cpu_features  # noqa: E402

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"  # apt-get install libtcmalloc-minimal4

# name -> (extra flags, extra environment, what it tests). compress's harness default (evaluation.vllm
# cpu_threads_bind: all) is "all cores, eager"; the others override its binding.
SETTINGS = {
    "auto-bind, eager": ([], {"VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_CPU_NUM_OF_RESERVED_CPU": None},
                         "vLLM's default binding: OpenMP on all cores but the one reserved for the engine loop (1 of "
                         "2 here); --enforce-eager"),
    "all cores, eager": ([], {"VLLM_CPU_OMP_THREADS_BIND": "all", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
                         "OpenMP on every core, nothing reserved: the engine loop and the API server share them"),
    "no binding, eager": ([], {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_NUM_OF_RESERVED_CPU": None},
                          "vLLM binds nothing (OpenMP's own defaults)"),
    "auto-bind, stream-interval 8": (["--stream-interval", "8"],
                                     {"VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_CPU_NUM_OF_RESERVED_CPU": None},
                                     "the API server sends every 8th token: less per-token work on the shared core"),
    "all cores, eager, tcmalloc": ([], {"VLLM_CPU_OMP_THREADS_BIND": "all", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                                        "LD_PRELOAD": TCMALLOC},
                                   "vLLM's CPU docs' allocator (LD_PRELOAD of Debian's libtcmalloc-minimal4)"),
    "all cores, compiled": (["--no-enforce-eager"], {"VLLM_CPU_OMP_THREADS_BIND": "all",
                                                     "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
                            "torch.compile (inductor, C++ on a CPU): minutes to load"),
}


def measure_one(env, folder: Path, setting: str, args, bandwidth: float, log_dir: Path) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from compress.options import VLLMSettings
    from compress.planner import kv_bytes
    from eval import served_row, served_setup
    from eval.engines import vllm
    from eval.serving import run_level
    from eval.throughput import roofline

    flags, extra_env, _ = SETTINGS[setting]
    card = json.loads((folder / "manifest.json").read_text())["record"]["serve"]
    card_flags = vllm.served_flags(card)
    harness = [f for f in ["--enforce-eager"] if "--no-enforce-eager" not in flags] + \
        [f for f in flags if f != "--no-enforce-eager"]
    s = VLLMSettings(concurrency=[args.concurrency], requests_min=args.requests, kv_cache_space_gb=1)
    cpu_all = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    switches = {**served_setup.env_vars(s, env), **{k: (cpu_all if v == "all" else v) for k, v in extra_env.items()}}
    server = vllm.Server(env, folder, card_flags, name=folder.name, log_path=log_dir / f"{folder.name}.log",
                         extra_flags=harness, env_vars={k: v for k, v in switches.items() if v is not None},
                         ready_timeout_s=1200)
    with server:
        level, sample = run_level(server, server.pids, concurrency=args.concurrency, settings=s,
                                  vocab=len(AutoTokenizer.from_pretrained(folder)), seed=1)
        log_text = server.log()
    dtype = served_setup.served_dtype(card_flags, None)
    weight = served_row.served_weight_bytes(folder, dtype)
    kv = kv_bytes(AutoConfig.from_pretrained(folder), s.prompt_tokens + s.output_tokens // 2, 1, 2)
    tok_per_sec = 1 / level["tpot_s_p50"]
    rf = roofline(weight, kv, bandwidth, tok_per_sec)
    path = vllm.compute_path(vllm.layer_facts(log_text), vllm.declared_activations(served_setup.quantization(folder)))
    return {"checkpoint": folder.name, "setting": setting, "load_s": round(server.load_s, 1),
            "concurrency": args.concurrency, "output_tok_per_sec": level["output_tok_per_sec"],
            "tpot_ms_p50": 1000 * level["tpot_s_p50"], "server_itl_ms": 1000 * level.get("server_itl_s_mean", 0),
            "tok_per_sec": tok_per_sec, "bound_tok_per_sec": rf["bound_tok_per_sec"], "utilisation": rf["utilisation"],
            "contended": sample["contended"], "binding": vllm.binding(log_text),
            "computed": path["label"] if path else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--requests", type=int, default=8, help="measured requests per (checkpoint, setting, round)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests in flight (the roofline columns are for 1; above it, read output tok/s)")
    args = p.parse_args(argv)
    if any("LD_PRELOAD" in SETTINGS[x][1] for x in args.settings) and not Path(TCMALLOC).is_file():
        p.error(f"{TCMALLOC} not found: apt-get install libtcmalloc-minimal4, or leave out the tcmalloc setting")
    configure_cpu()
    from eval.engines import vllm_env
    from eval.throughput import measure_bandwidth

    env = vllm_env.ensure("cpu")
    bandwidth = measure_bandwidth(device="cpu")["bytes_per_sec"]
    cpu = cpu_features()
    print(f"# vLLM {env['vllm']} ({env['build']}), {cpu['model']}, flags {', '.join(cpu['flags'])}, "
          f"{cpu['logical_cpus']} logical CPUs, {cpu['threads_per_core']} thread(s) per core; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s", file=sys.stderr)
    runs = []
    with tempfile.TemporaryDirectory(prefix="compress-vllm-settings-") as tmp:
        for r in range(args.rounds):
            for folder in args.folders:
                for setting in args.settings:
                    one = measure_one(env, folder, setting, args, bandwidth, Path(tmp))
                    one["round"] = r
                    runs.append(one)
                    print(f"round {r}: {folder.name:16s} {setting:30s} c={args.concurrency} "
                          f"{one['output_tok_per_sec']:6.1f} out tok/s, TPOT {one['tpot_ms_p50']:6.1f} ms "
                          f"(server {one['server_itl_ms']:5.1f}) {one['tok_per_sec']:5.1f} tok/s = "
                          f"{100 * one['utilisation']:3.0f}% of {one['bound_tok_per_sec']:.0f}; load "
                          f"{one['load_s']:.0f} s{' CONTENDED' if one['contended'] else ''}; {one['computed']}",
                          file=sys.stderr, flush=True)
    print("\n| checkpoint | setting | TPOT p50 ms (median; per round) | server ITL ms | tok/s | % of bound | load s |")
    print("|---|---|---|---|---|---|---|")
    for folder in args.folders:
        for setting in args.settings:
            mine = [x for x in runs if x["checkpoint"] == folder.name and x["setting"] == setting]
            med = {k: statistics.median(x[k] for x in mine) for k in ("tpot_ms_p50", "server_itl_ms", "tok_per_sec",
                                                                      "utilisation", "load_s")}
            flag = " ⚠" if any(x["contended"] for x in mine) else ""
            each = ", ".join(f"{x['tpot_ms_p50']:.1f}" for x in mine)
            print(f"| {folder.name} | {setting} | {med['tpot_ms_p50']:.1f} ({each}){flag} | "
                  f"{med['server_itl_ms']:.1f} | {med['tok_per_sec']:.1f} | {100 * med['utilisation']:.0f}% | "
                  f"{med['load_s']:.0f} |")
    print(json.dumps({"cpu": cpu, "bandwidth_bytes_per_sec": bandwidth, "vllm": env["vllm"],
                      "settings": {k: SETTINGS[k][2] for k in args.settings}, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
