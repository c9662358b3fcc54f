"""How often a pool's terminate hangs under each SIGTERM handler: tests/compress/fork_race.py run `--runs` times per
mode (each run: ROUNDS pools created and terminated at once, joblib's multiprocessing backend and a loky executor),
a run that does not end within `--timeout` seconds counted as hung.

    python benchmarks/fork_race_count.py --runs 20

Modes: naive (SystemExit raised in every process: the handler compress had before issue 26), pid-only (compress's
pid-checking handler, without the fork-time mask), compress (compress.stop.arm, as `compress run` installs it).
Load on the machine makes the rarer window (a worker not yet scheduled when it is signalled) more likely: say what
ran beside it. Prints one line per mode, then JSON last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--modes", nargs="+", default=["naive", "pid-only", "compress"])
    args = p.parse_args(argv)
    out = {}
    for mode in args.modes:
        hung = 0
        for _ in range(args.runs):
            try:
                subprocess.run([sys.executable, str(ROOT / "tests" / "compress" / "fork_race.py"), mode,
                                str(args.rounds)], capture_output=True, timeout=args.timeout, cwd=ROOT,
                               start_new_session=True)
            except subprocess.TimeoutExpired:
                hung += 1
            finally:
                subprocess.run(["pkill", "-9", "-f", f"fork_race.py {mode}"], capture_output=True)
        out[mode] = {"runs": args.runs, "hung": hung}
        print(f"{mode:9s} hung in {hung} of {args.runs} runs ({args.rounds} rounds each)", flush=True)
    import time

    from compress.environment import cpu_features

    print(json.dumps({"rounds": args.rounds, "timeout_s": args.timeout, "cpu": cpu_features(),
                      "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"), "modes": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
