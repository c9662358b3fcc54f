"""`compress run RECIPE.yaml [--dry-run] [--remeasure-speed] [--cluster ADDRESS]`, `compress plan RECIPE.yaml`, `compress report RUN_DIR [...]`.

Exit codes: 0 every variant ok, 1 some variant failed (the others are still written), 2 bad input (nothing
written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from compress.recipe import InputError, load_recipe


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks (by default an error is one sentence)")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common],
                         help="build (or reuse) every variant's checkpoint and write results.json")
    run.add_argument("recipe", type=Path)
    run.add_argument("--dry-run", action="store_true", help="validate and print the plan; load no weights")
    run.add_argument("--cluster", metavar="ADDRESS", default=None,
                     help="run each variant's build and measurement as Ray tasks: 'local' (a Ray instance on this "
                          "machine), 'auto' (RAY_ADDRESS), ray://HOST:PORT or HOST:PORT; overrides the recipe's "
                          "cluster.address. Same results as a serial run")
    run.add_argument("--remeasure-speed", action="store_true",
                     help="time every row's decode speed again (e.g. on a quieter machine); accuracy stays cached")
    plan = sub.add_parser("plan", parents=[common],
                          help="the plan and the GPU memory planner (weights + KV per GPU); no weights loaded")
    plan.add_argument("recipe", type=Path)
    report = sub.add_parser("report", parents=[common],
                            help="rebuild report.md/.html and results.csv from one or more run directories")
    report.add_argument("runs", nargs="+", type=Path)
    report.add_argument("--out", type=Path, default=None, help="where the merged report goes (needed for 2+ runs)")
    formats = sub.add_parser("formats", parents=[common],
                             help="the schemes a recipe can ask for: methods that write each, bits per weight, what "
                                  "serves it (vLLM's kernels, read from its source)")
    formats.add_argument("--json", action="store_true", help="the table as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s compress %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("compress").setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        return _main(args)
    except Exception as e:  # a failure outside any one variant (e.g. the disk filled while writing the report)
        if args.debug:
            raise
        from compress.resources import one_line

        print(f"error: {one_line(e, Path(getattr(args, 'recipe', None) or '.'))}\n"
              f"(run again with --debug for the traceback)", file=sys.stderr)
        return 1


def _formats(as_json: bool) -> int:
    from compress.backends.llmcompressor import METHODS, scheme_table

    table = scheme_table()
    if as_json:
        print(json.dumps({"schemes": table, "methods": {n: {"schemes": list(m.schemes), "calibrates": m.calibrates,
                                                            "options": m.options, "what": m.what}
                                                        for n, m in METHODS.items()}}, indent=2))
        return 0
    print("scheme       bits/w  calibrated  methods                          served by (vLLM 0.32, REFERENCE: read from "
          "its source, not measured)")
    for row in table:
        print(f"{row['scheme']:<12} {row['bits_per_weight']:>6.3g}  {'yes' if row['calibrated'] else 'no':<10}  "
              f"{', '.join(row['methods']):<32} {row['vllm_reference']}")
    print("\nbits/w: stored bits per weight with scales (integer schemes at group_size 64, bf16 scales); "
          "methods:")
    for name, m in METHODS.items():
        print(f"  {name:<17} {m.what}")
    return 0


def _main(args) -> int:
    if args.command == "formats":
        return _formats(args.json)
    if args.command == "report":
        from compress.report import main_report

        return main_report(args.runs, args.out)
    try:
        recipe = load_recipe(args.recipe)
        if args.command == "plan" or args.dry_run:
            from compress.plan import plan as make_plan

            plan = make_plan(recipe, args.recipe, measure_distill=args.command == "run")
            print(plan.pop("memory_plan_table"), file=sys.stderr)  # the human table; JSON last on stdout
            for names, e in (plan.get("distill_estimates") or {}).items():
                print(f"distillation ({names}): {e['step_seconds']:.2f} s per step measured on {e['device']}, "
                      f"about {e['estimated_train_seconds'] / 60:.1f} min for {e['steps']} steps", file=sys.stderr)
            print(json.dumps(plan, indent=2))
            return 0
        from compress import stop
        from compress.run import run

        with stop.arm(recipe.watchdog):  # SIGTERM -> Terminated (this process only), stalled stages stopped
            return run(recipe, args.recipe, remeasure_speed=args.remeasure_speed, cluster=args.cluster)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed variants are kept; run the same command again to continue", file=sys.stderr)
        return 130
    except SystemExit as e:  # compress.stop.Terminated: SIGTERM or SIGHUP
        if getattr(e, "signum", None) is None:
            raise
        print(f"{e}: what was measured is in results.json and the report, marked partial; run the same command "
              f"again to continue", file=sys.stderr)
        return e.code
