"""What lm-eval's bootstrap standard error costs, in its forked pool and in process: the choice behind eval/accuracy.py
(no bootstrap for means, whose standard error is analytic; an in-process bootstrap for anything else).

    python benchmarks/lm_eval_bootstrap.py --items 200 --iters 1000 100000

lm-eval bootstraps the standard error of a non-mean metric (lambada's perplexity, wikitext's word perplexity) with
`bootstrap_iters` resamples in a multiprocessing pool unless DISABLE_MULTIPROC is set; the pool is what hung the lab
(issue 26). Times `lm_eval.api.metrics.bootstrap_stderr(perplexity, ...)` on random log-likelihoods of `--items`
documents both ways, median of `--repeats`, and prints the stderr each gives. JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--iters", type=int, nargs="+", default=[1000, 100000])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import contextlib
    import io

    import lm_eval.api.metrics as m

    rng = random.Random(0)
    xs = [-rng.random() * 5 for _ in range(args.items)]
    rows = []
    for iters in args.iters:
        for where in ("pool", "in process"):
            if where == "pool":
                os.environ.pop("DISABLE_MULTIPROC", None)
            else:
                os.environ["DISABLE_MULTIPROC"] = "1"
            times, value = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    value = m.bootstrap_stderr(m.perplexity, xs, iters)
                times.append(time.perf_counter() - t0)
            rows.append({"iters": iters, "where": where, "seconds_median": statistics.median(times),
                         "stderr": value})
            print(f"{iters:>7} resamples, {where:10s}: {statistics.median(times):.3f} s (median of {args.repeats}), "
                  f"stderr {value:.4f}", flush=True)
    from compress.environment import cpu_features, installed_version

    print(json.dumps({"items": args.items, "cpu": cpu_features(), "lm_eval": installed_version("lm_eval"),
                      "date": time.strftime("%Y-%m-%d"), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
