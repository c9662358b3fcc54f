"""lm-eval's tasks through one vLLM server under several client settings, side by side: how many requests are in
flight (`num_concurrent`) and how many prompts each request carries (`batch_size`), the two knobs of lm-eval's
`local-completions` model (issue 29: the vLLM stage's task passes, the same figures, faster).

    python benchmarks/lm_eval_served_speed.py runs/smollm2-135m-lab/baseline \
        [--configs 4x1 16x1 2x16] [--tasks hellaswag ...] [--limit 200]

Each config is CONCURRENTxBATCH; a config may be named twice (e.g. `8x8 4x1 8x8`: the first pass also warms the
server, so compare the later ones). One server is started for the checkpoint as the vLLM stage starts it (its model
card's serve line, the harness flags and environment of the lab's vllm settings), then every config runs the tasks
through it in turn (the same documents, 0-shot), timed, with the other processes' CPU share over the config
(eval/contention, the server's processes counted as ours). Then each config against the first: every task's figure,
the items both scored alike, and the time ratio. JSON last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.lm_eval_speed import LAB_TASKS  # noqa: E402  the lab's six tasks, as the transformers benchmark


def main() -> int:
    from compress.environment import cpu_features
    from compress.options import VLLMSettings
    from eval import contention
    from eval.accuracy import run_tasks_served
    from eval.engines import vllm, vllm_env
    from eval.served_setup import env_vars, harness_flags

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--configs", nargs="+", default=["4x1", "16x1", "2x16"])
    ap.add_argument("--tasks", nargs="+", default=LAB_TASKS)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    args = ap.parse_args()

    env = vllm_env.ensure("cpu")
    settings = VLLMSettings()
    serve_line = json.loads((args.checkpoint / "manifest.json").read_text())["record"]["serve"]
    tmp = Path(tempfile.mkdtemp(prefix="lm-eval-served-"))
    server = vllm.Server(env, args.checkpoint, vllm.served_flags(serve_line), name=args.checkpoint.name,
                         log_path=tmp / "vllm.log", extra_flags=harness_flags(settings),
                         env_vars=env_vars(settings, env))
    print(f"cpu: {cpu_features()}")
    print(f"vLLM {env.get('vllm')} ({env.get('build')}); serve: {' '.join(server.command[3:])}")
    results: list[tuple[str, dict]] = []
    with server:
        print(f"server ready in {server.load_s:.0f} s")
        url = f"http://127.0.0.1:{server.port}/v1/completions"
        for config in args.configs:
            concurrent, batch = (int(x) for x in config.split("x"))
            t0 = time.perf_counter()
            scores, seen = contention.timed(
                lambda: run_tasks_served(url, server.name, args.checkpoint, args.tasks, args.data_dir.expanduser(),
                                         num_fewshot=0, limit=args.limit, concurrent=concurrent, batch_size=batch),
                pids=server.pids)
            seconds = time.perf_counter() - t0
            results.append((config, {"seconds": seconds, "tasks": scores, "contended": seen["contended"],
                                     "others_cpu_share": seen["others_cpu_share"]}))
            print(f"{config}: {seconds:.1f} s{' CONTENDED' if seen['contended'] else ''} "
                  + ", ".join(f"{t} {100 * s['value']:.1f}" for t, s in scores.items()), flush=True)
    first, ref = results[0]
    print(f"\nagainst the first pass, {first} (items scored alike = same per-item score):")
    print("| config | seconds | x time | " + " | ".join(args.tasks) + " |")
    print("|---|---|---|" + "---|" * len(args.tasks))
    for config, r in results:
        cells = []
        for t in args.tasks:
            a, b = ref["tasks"][t], r["tasks"][t]
            same = sum(x == y for x, y in zip(a["items"], b["items"], strict=True))
            cells.append(f"{100 * b['value']:.1f} ({same}/{len(a['items'])} alike)")
        print(f"| {config} | {r['seconds']:.1f} | {r['seconds'] / ref['seconds']:.2f} | "
              + " | ".join(cells) + " |")
    print(json.dumps([{"config": c, "seconds": r["seconds"], "contended": r["contended"],
                       **{t: r["tasks"][t]["value"] for t in args.tasks}} for c, r in results]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
