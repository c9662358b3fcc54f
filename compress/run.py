"""The run, top to bottom: check -> build each variant (or reuse it) -> measure -> report.

    compress/checks.py      everything checkable before weights are loaded (exit 2, nothing written)
    compress/backends/*     one module per method family builds a variant's checkpoint (compress/build.py: the
                            steps they share: save, self-check, model card, manifest last, rename into place)
    eval/measure.py         perplexity, KL, tasks, recovery, throughput of every saved checkpoint
    compress/report/        the comparison table, plots and provenance

Caching: a variant whose checkpoint carries the same cache key (compress/keys.py) and whose files still match their
sha256 is reused, so a second run is a no-op and a killed run continues with the first variant it had not finished.
results.json and the report are rewritten after every variant is built and after every row is measured, marked
partial (`progress`) until the run ends: a run that is stopped, fails or hangs shows everything it measured so far.
compress/stop.py stops a stage that makes no progress (its variant fails, the run goes on) and turns SIGTERM into
an orderly stop.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from compress import checkpoint, ownership, resources, verify
from compress.build import RunState, build_variant
from compress.checks import check_inputs, check_resources
from compress.keys import cache_key, variant_versions
from compress.load import Source, load_config, resolve_device_dtype
from compress.options import InputError
from compress.record import RESULTS, Record, Results
from compress.recipe import Recipe

log = logging.getLogger("compress")


def run(recipe: Recipe, recipe_path: Path, remeasure_speed: bool = False, cluster: str | None = None) -> int:
    """Build every variant, measure it, write results.json and the report. Returns the exit code: 0 all ok, 1 some
    variant (or the evaluation) failed. `remeasure_speed`: time every row again, reusing the cached accuracy.
    `cluster`: a Ray address (compress/cluster.py) overriding the recipe's `cluster.address`; with either, each
    variant's build and measurement is a Ray task, and the results are the same."""
    from compress.environment import configure_cpu, environment

    configure_cpu()
    log.info("stage check-inputs: %s", recipe_path)
    source = check_inputs(recipe, recipe_path, prepare=True)
    conn = None
    from compress import cluster as ray_cluster

    settings = ray_cluster.settings_for(recipe, cluster)
    if settings is not None:
        conn = ray_cluster.connect(settings)
    try:
        device, dtype = resolve_device_dtype(recipe.model, cluster_gpus=conn.gpus if conn else None)
        env = environment(device, dtype)
        versions = {k: env[k] for k in ("compress", "torch", "transformers", "llmcompressor", "compressed_tensors")}
        output = Path(recipe.output)
        config = load_config(source)
        keys = {v.name: cache_key(recipe, v, source, device, dtype, variant_versions(v, versions, env))
                for v in recipe.variants}
        needs = check_resources(recipe, source, config, device, dtype, output, keys)
        if conn is not None:
            ray_cluster.check_visible(output, _inputs(recipe, source))
        output.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_staging(output)
        # transformers runs no code shipped with a model unless trust_remote_code=True, which compress never passes
        source_info = {"kind": source.kind, "description": source.description, "path": source.path,
                       "note": source.note, "trust_remote_code": False}
        state = RunState(recipe, recipe_path, source, source_info, device, dtype, env, versions, output, keys, needs,
                         remeasure_speed)
        results = Results(recipe=str(recipe_path), model=source_info, environment=env, variants=[],
                          progress={"state": "running", "stage": "build"})
        try:
            if conn is not None:
                failed = _run_on_cluster(conn, state, results, config)
            else:
                failed = _run_here(state, results, config)
        except BaseException as e:  # stopped (SIGTERM, Ctrl-C) or broken: what is measured stays readable
            if results.variants and not isinstance(e, InputError):
                results.progress = {**(results.progress or {}), "state": "stopped", "reason": _why_stopped(e)}
                try:
                    _publish(results, output)
                except Exception as again:  # e.g. the disk is still full: the files from before stay whole
                    log.warning("results.json and the report keep their previous state: %s",
                                resources.one_line(again, output))
            raise
    finally:
        if conn is not None:
            ray_cluster.disconnect()
    results.progress = {"state": "complete"}
    paths = _publish(results, output)
    log.info("stage done: %d variants, %d failed; results in %s, report in %s", len(results.variants), failed,
             output / RESULTS, paths["md"])
    return 1 if failed else 0


def _why_stopped(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(e, SystemExit):
        return str(e) if getattr(e, "signum", None) else f"exited ({e.code})"
    return resources.one_line(e, Path("."))


def _publish(results: Results, output: Path) -> dict:
    """results.json, then the report from it (both atomically, as compress/ownership writes every file)."""
    from compress.report import write_report

    ownership.write_owned(output, RESULTS, results.text())
    return write_report(results.dump(), output)


def _run_here(state: RunState, results: Results, config) -> int:
    """The serial run: every variant built (or reused) in this process, one after another, then measured."""
    from tqdm import tqdm

    records: dict[str, dict] = {}
    windows: dict[tuple, list[list[int]]] = {}  # (samples, seq_len) -> token windows, tokenized once per run
    verify.resume(state)
    bar = tqdm(state.recipe.variants, desc="variants", unit="variant")
    for v in bar:
        bar.set_postfix_str(v.name)
        records[v.name] = build_variant(state, v, state.env, windows)
        _write(results, records, state.output)
    add_kv_memory(state.recipe, records, config)
    if state.recipe.evaluation.enabled:
        searching = any(verify.strict(v) for v in state.recipe.variants)
        measure(state, records, results, more_rows=searching)

        def build_and_measure(name: str) -> None:  # verify strict: another frontier point of an auto variant
            v = next(v for v in state.recipe.variants if v.name == name)
            records[name] = build_variant(state, v, state.env, windows)
            add_kv_memory(state.recipe, records, config)
            measure(state, records, results, more_rows=True)

        verify.step_up(state, records, build_and_measure)
        if searching:  # every row is measured now: the baseline's KL reference goes (eval/measure.remove_reference)
            from eval.measure import evaluation_order, remove_reference

            remove_reference(state.recipe, state.output, records.get(evaluation_order(records)[1]), state.device,
                             state.dtype)
        _write(results, records, state.output)
    # every failed row (its build or its measurement), and the evaluation as a whole when it failed
    return sum(r["status"] != "ok" for r in records.values()) + bool(results.evaluation_error)


def _progress_writer(state: RunState, results: Results, records: dict[str, dict]):
    """The `on_row(measured, base_name, stage)` of eval/measure.evaluate_run: after every measured row, the figures
    so far copied into the records, results.json and the report rewritten, marked partial."""
    from eval.measure import finish

    def on_row(measured: dict[str, dict], base_name: str | None, stage: str) -> None:
        finish(measured, records, base_name)
        done = sum(1 for n in measured if records.get(n, {}).get("status") == "ok")
        results.progress = {"state": "running", "stage": stage, "rows_measured": done,
                            "rows": sum(r["status"] == "ok" for r in records.values())}
        _write(results, {v.name: records[v.name] for v in state.recipe.variants if v.name in records}, state.output)
        from compress.report import write_report

        write_report(results.dump(), state.output)
    return on_row


def _run_on_cluster(conn, state: RunState, results: Results, config) -> int:
    """The same run as Ray tasks (compress/cluster.py); results.json is written here, as each variant is built."""
    from compress import cluster as ray_cluster
    from eval.measure import evaluation_order, finish, remove_reference, run_info

    written: dict[str, dict] = {}

    def on_record(name: str, record: dict) -> None:
        written[name] = record
        _write(results, {v.name: written[v.name] for v in state.recipe.variants if v.name in written}, state.output)

    results.cluster = conn.info()
    verify.resume(state)
    on_row = _progress_writer(state, results, written)
    base_name = next(v.name for v in state.recipe.variants if v.is_reference)
    records, measured, errors = ray_cluster.run_variants(
        conn, state, on_record, on_measured=lambda measured: on_row(measured, base_name, "measure"))
    add_kv_memory(state.recipe, records, config)
    failed = 0
    if state.recipe.evaluation.enabled:
        names, base_name = evaluation_order(records)
        finish({n: measured[n] for n in names if n in measured}, records, base_name)

        def build_and_measure(name: str) -> None:  # verify strict: another frontier point of an auto variant
            records[name], figures, error = ray_cluster.run_one(conn, state, name, records.get(base_name),
                                                                measured.get(base_name))
            measured.pop(name, None)
            if figures is not None:
                measured[name] = figures
            elif error is not None:
                errors.append(f"{name}: {error}")
            add_kv_memory(state.recipe, records, config)
            finish({n: measured[n] for n in names if n in measured}, records, base_name)
            on_record(name, records[name])

        verify.step_up(state, records, build_and_measure)
        remove_reference(state.recipe, state.output, records.get(base_name), state.device, state.dtype)
        for key, value in run_info(state.recipe.evaluation, measured).items():
            setattr(results, key, value)
        if errors:
            failed += 1
            results.evaluation_error = "; ".join(errors)
        refresh_cards(records, state.source_info)
    _write(results, records, state.output)
    return failed + sum(r["status"] != "ok" for r in records.values())


def _inputs(recipe: Recipe, source: Source) -> dict[str, Path]:
    """What every node of a cluster must see besides the output: the model, the data, the working directory."""
    out = {"the model source": Path(source.path), "the working directory": Path.cwd()}
    if recipe.calibration is not None:
        out["calibration.source"] = Path(recipe.calibration.source)
    ev = recipe.evaluation
    if ev.tasks or ev.perplexity:
        out["evaluation.data_dir"] = Path(ev.data_dir).expanduser()
    for v in recipe.variants:
        if v.distill:
            out[f"{v.name}: distill.data"] = Path(v.distill.data)
    return out


def _write(results: Results, records: dict[str, dict], output: Path) -> None:
    """results.json through its schema: every record is validated as it is written."""
    results.variants = [Record.model_validate(r) for r in records.values()]
    ownership.write_owned(output, RESULTS, results.text())


def measure(state: RunState, records: dict[str, dict], results: Results, more_rows: bool = False) -> int:
    """Evaluate every ok variant (eval/measure.py), then refresh the model cards with the figures. Returns the
    number of failures: the variants whose measurement failed (each is a failed row with its reason; the others
    are measured), plus 1 when the evaluation as a whole failed (one line in results.json)."""
    from eval.measure import evaluate_run

    ok_before = {n for n, r in records.items() if r["status"] == "ok"}
    failed = 0
    results.evaluation_error = None  # this pass's, over every row
    try:
        for key, value in evaluate_run(state.recipe, state.output, records, state.device, state.dtype,
                                       state.remeasure_speed, on_row=_progress_writer(state, results, records),
                                       more_rows=more_rows).items():
            setattr(results, key, value)  # the run's evaluation settings and bandwidth
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as e:
        failed = 1
        error = resources.one_line(e, state.output / "eval")
        log.error("evaluation FAILED: %s", error)
        log.debug("evaluation traceback:\n%s", traceback.format_exc())
        results.evaluation_error = error
    refresh_cards(records, state.source_info)
    return failed + sum(records[n]["status"] != "ok" for n in ok_before)


def refresh_cards(records: dict[str, dict], source_info: dict) -> None:
    """The model cards gain the figures just measured."""
    from compress.card import model_card

    for record in records.values():
        folder = Path(record["checkpoint"] or "")
        if record["status"] == "ok" and {"perplexity", "tasks", "throughput", "vllm"} & set(record):
            record["size_bytes"] = checkpoint.refresh_card(folder, model_card(record, source_info, folder))


def add_kv_memory(recipe: Recipe, records: dict[str, dict], config) -> None:
    """Each ok variant's KV-cache figures at the planner's serving shape (config arithmetic, no weights loaded):
    bytes per token, bytes at context x batch, sequences that fit per GPU beside its weights vs a 16-bit cache."""
    from compress.options import KVCache
    from compress.planner import kv_memory, weight_bytes_estimate

    p = recipe.evaluation.planner
    for v in recipe.variants:
        record = records.get(v.name)
        if not record or record["status"] != "ok":
            continue
        weights = weight_bytes_estimate(config, *v.weight_format())
        record["kv_memory"] = kv_memory(config, KVCache(**record["kv_cache"]) if record.get("kv_cache") else None,
                                        weights, context=p.context, batch=p.batch, headroom=p.headroom)
