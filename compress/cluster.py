"""A recipe's variants as Ray tasks: `compress run RECIPE --cluster ADDRESS` (or the recipe's `cluster:` key).

The only module that imports Ray. What runs where:

    driver (this process)   checks the recipe, computes every cache key, checks that each node sees the output
                            folder and the inputs, submits the tasks, writes results.json as they finish, the report
    build task, per variant compress/build.build_variant: the same function as a serial run, so the same cache key,
                            the same staging-then-rename checkpoint, the same failed row for a variant's own error
    measure task, per variant eval/measure.evaluate_variant (+ the vLLM stage of that row): it depends on its own
                            build and on the baseline's measurement, which Ray passes to it

Ray does the scheduling (resource requests from the recipe: CPUs, GPUs, memory), the retries of a task whose worker
died (`max_retries`; an exception of the variant's own is never retried) and the forwarding of the workers' logs.
Nothing here queues, schedules or talks over sockets.

Why the results are a serial run's: the keys are computed once, on the driver; a task gets the recipe and the keys
and runs the serial code; the caches (checkpoint manifests, eval/<variant>.json) live on the shared output folder.
A retried task finds what the killed attempt finished (a complete checkpoint is reused; staging of a dead writer is
never renamed into place), and a rerun after the driver was killed submits tasks that find their results cached.

The baseline without two models in memory: its measurement saves its log-probabilities on the perplexity windows
to the output folder (eval/perplexity.ReferenceFile), and each variant's KL reads them a window at a time; the
baseline's figures the others need (its speed, for the ratios' bound) reach them as the baseline task's result.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from compress import stop
from compress.backends.unchanged import REFERENCE
from compress.options import ClusterSettings, InputError

log = logging.getLogger("compress")

PROBE_PREFIX = ".compress-cluster-probe-"


def settings_for(recipe, address: str | None) -> ClusterSettings | None:
    """The run's cluster settings: the recipe's `cluster:`, with `--cluster ADDRESS` setting the address (and
    turning the cluster on); None when neither asks for one (a serial run)."""
    if address is None:
        return recipe.cluster
    base = recipe.cluster.model_dump() if recipe.cluster else {}
    try:
        return ClusterSettings(**{**base, "address": address})
    except ValidationError as e:
        raise InputError(f"--cluster: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("cluster: Ray is not installed; pip install 'compress[cluster]' (ray), or run without "
                         "--cluster and the recipe's `cluster:` key") from None
    return ray


def _reachable(host_port: str, timeout_s: float = 5.0) -> str | None:
    """None when a TCP connection to HOST:PORT opens, else why not (Ray itself would retry for a minute)."""
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


@dataclass
class Connection:
    """A connected Ray cluster: its address as given, the dashboard address (when it runs one), its nodes."""

    settings: ClusterSettings
    dashboard: str | None
    gpus: float
    nodes: list[dict]

    def info(self) -> dict:
        """What results.json records of the cluster."""
        return {"engine": "ray", "address": self.settings.address, "dashboard": self.dashboard, "gpus": self.gpus,
                "nodes": self.nodes, "settings": self.settings.model_dump()}


def connect(settings: ClusterSettings) -> Connection:
    """Join (or, for "local", start) the cluster. A cluster that cannot be reached is an InputError (exit 2), before
    anything is written."""
    ray = _import_ray()
    import torch

    threads = settings.threads or torch.get_num_threads()  # the driver's, as configure_cpu set them
    settings = settings.model_copy(update={"threads": threads, "cpus_per_variant": settings.cpus_per_variant or threads})
    address = settings.address
    if address == "auto" and not os.environ.get("RAY_ADDRESS") and not _local_cluster_running():
        raise InputError("cluster.address: 'auto' found no cluster: RAY_ADDRESS is not set and no `ray start` "
                         "cluster runs on this machine (expected RAY_ADDRESS=HOST:PORT, or 'local' to start one)")
    if address not in ("local", "auto"):
        why = _reachable(address.removeprefix("ray://"))
        if why:
            raise InputError(f"cluster.address: cannot reach a Ray cluster at {address} ({why}); expected the "
                             f"head's address (`ray start --head` prints it), 'auto' for RAY_ADDRESS, or 'local'")
    kwargs: dict = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address == "local":
        kwargs["num_cpus"] = settings.local_cpus or os.cpu_count()
    else:
        kwargs["address"] = address
    try:
        context = ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise InputError(f"cluster.address: could not join the Ray cluster at {address}: "
                         f"{str(e).strip().splitlines()[0]}") from None
    finally:
        stop.reclaim()  # ray.init replaced compress's SIGTERM handler with its own
    dashboard = getattr(context, "dashboard_url", None) or None
    gpus = float(ray.cluster_resources().get("GPU", 0))
    nodes = _nodes()
    log.info("stage cluster: Ray %s at %s: %d node(s), %g CPUs, %g GPUs%s", ray.__version__, address, len(nodes),
             sum(n["Resources"].get("CPU", 0) for n in nodes), gpus,
             f"; dashboard http://{dashboard}" if dashboard else " (no dashboard: pip install 'ray[default]')")
    shown = [{"node_id": n["NodeID"], "node_ip": n["NodeManagerAddress"], "hostname": n.get("NodeManagerHostname"),
              "cpus": n["Resources"].get("CPU", 0), "gpus": n["Resources"].get("GPU", 0)} for n in nodes]
    return Connection(settings, f"http://{dashboard}" if dashboard else None, gpus, shown)


def _local_cluster_running() -> bool:
    return Path("/tmp/ray/ray_current_cluster").is_file()


def _nodes() -> list[dict]:
    """The alive nodes that can run a variant (they have CPUs or GPUs)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and
            (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        try:
            ray.shutdown()
        finally:
            stop.reclaim()  # ray.shutdown reset the live SIGTERM handler to the default action


# ------------------------------------------------------------------------------------------- before any work


def _probe(paths: dict[str, str]) -> dict:
    """On one node: what it sees of `paths` (name -> path): a probe file's content, or whether a path exists."""
    seen = {}
    for name, path in paths.items():
        p = Path(path)
        if p.name.startswith(PROBE_PREFIX):
            try:
                seen[name] = p.read_text()
            except OSError:
                seen[name] = None
        else:
            seen[name] = p.exists()
    return {"seen": seen, "hostname": socket.gethostname()}


def check_visible(output: Path, inputs: dict[str, Path]) -> None:
    """Every node must see the output folder (a file the driver writes there now, read back on each node) and the
    run's inputs (the model, the data, the folder relative paths resolve against). Else InputError (exit 2)
    naming the node and the path: a shared filesystem is what a cluster run writes to."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    made = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    probe = output / f"{PROBE_PREFIX}{token}"
    probe.write_text(token)
    try:
        paths = {"output": str(probe), **{k: str(Path(v).resolve()) for k, v in inputs.items()}}
        task = ray.remote(_probe)
        nodes = _nodes()
        refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")":
                task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                    n["NodeID"], soft=False)).remote(paths) for n in nodes}
        problems = []
        for node, ref in refs.items():
            try:
                seen = ray.get(ref, timeout=180)
            except Exception as e:  # noqa: BLE001 - a node that cannot even run the probe is named with its error
                problems.append(f"node {node} could not run the check: {type(e).__name__}")
                continue
            where = f"node {node} ({seen['hostname']})"
            if seen["seen"]["output"] != token:
                problems.append(f"{where} does not see the output folder {output.resolve()} (the file compress "
                                f"just wrote there is missing on it)")
            problems += [f"{where} does not see {name} {paths[name]}"
                         for name in inputs if not seen["seen"][name]]
        if problems:
            raise InputError("cluster: " + "; ".join(problems) + ". Every node must see the output folder and the "
                             "inputs at the same paths (a shared filesystem; the model source is under "
                             "COMPRESS_CACHE, which can point there too)")
        log.info("stage cluster: %d node(s) see the output folder %s and the inputs", len(refs), output.resolve())
    finally:
        probe.unlink(missing_ok=True)
        if made:
            try:
                output.rmdir()  # a refused run leaves nothing behind; an accepted one makes the folder again
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------ the tasks


def _placement(stage: str, started: float) -> dict:
    """Where a task ran: node, host, process, GPUs Ray gave it, when it started (Unix time) and its wall time."""
    import ray

    ctx = ray.get_runtime_context()
    gpus = ctx.get_accelerator_ids().get("GPU", [])
    return {"stage": stage, "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(), "pid": os.getpid(), "gpus": list(gpus), "started": round(started, 1),
            "seconds": round(time.time() - started, 1)}


def _worker_start(state, stage: str, name: str) -> dict:
    """A task's first steps: the driver's working directory (relative recipe paths), the run's log format, the CPU
    threads Ray gave it, this node's environment, which must have the versions the cache keys were computed with."""
    from compress.environment import configure_cpu, environment

    os.chdir(state.cwd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s compress %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    configure_cpu()
    env = environment(state.device, state.dtype)
    differ = {k: (env.get(k), v) for k, v in state.versions.items() if env.get(k) != v}
    if differ:
        shown = ", ".join(f"{k} {mine} (the driver has {theirs})" for k, (mine, theirs) in differ.items())
        raise InputError(f"cluster: node {socket.gethostname()} runs {shown}: every node needs the driver's "
                         f"versions, or its checkpoints would not be the ones the cache keys describe")
    log.info("variant %s: stage %s on %s (%s), pid %d, %d thread(s)", name, stage, socket.gethostname(),
             _node_ip(), os.getpid(), env["cpu_threads"])
    return env


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def build_task(state, name: str) -> tuple[dict, dict]:
    """A Ray task: one variant's checkpoint, built (or reused) exactly as a serial run builds it."""
    from compress.build import build_variant

    started = time.time()
    env = _worker_start(state, "build", name)
    v = next(v for v in state.recipe.variants if v.name == name)
    return build_variant(state, v, env, windows={}), _placement("build", started)


def measure_task(state, name: str, built: tuple, base_built: tuple | None, base_measured: tuple | None):
    """A Ray task: one built variant's measurement, evaluate then serve (eval/measure.measure_rows, as the serial run
    does for every row); `base_*`: the baseline's build and measurement results (None for the baseline itself). A
    row whose measurement failed raises, and the driver makes it a failed row."""
    from eval.measure import RowFailed, measure_rows

    record = built[0]
    if record["status"] != "ok":
        return None, None
    started = time.time()
    _worker_start(state, "measure", name)
    if base_built is None and record["method"] == REFERENCE:
        base = record  # the baseline's own measurement: its KL is 0, and it saves the others' KL reference
    else:
        base = base_built[0] if base_built and base_built[0]["status"] == "ok" else None
    records = {name: record, **({base["name"]: base} if base else {})}
    measured = {base["name"]: base_measured[0]} if base and base_measured else {}  # None for the baseline's own
    measure_rows(state.recipe, state.output, records, [name], base["name"] if base else None, measured, state.device,
                 state.dtype, state.remeasure_speed, keep_reference=not state.only_baseline)
    if name not in measured:
        raise RowFailed(records[name]["error"])
    return measured[name], _placement("measure", started)


# ---------------------------------------------------------------------------------------------- the driver


def _options(settings: ClusterSettings, device: str, name: str, stage: str) -> dict:
    """A task's resource requests (from the recipe), retries, threads, and its name in Ray's logs and dashboard."""
    gpus = settings.gpus_per_variant if settings.gpus_per_variant is not None else (1 if device == "cuda" else 0)
    opts = {"name": f"{stage} {name}", "num_cpus": settings.cpus_per_variant, "num_gpus": gpus,
            "max_retries": settings.max_retries, "retry_exceptions": False,
            "runtime_env": {"env_vars": {"COMPRESS_THREADS": str(settings.threads)}}}
    if settings.memory_gb:
        opts["memory"] = int(settings.memory_gb * 1e9)
    return opts


def check_fits(settings: ClusterSettings, device: str) -> None:
    """A task no node can ever hold would wait forever: refuse it now (exit 2) with the figures."""
    opts = _options(settings, device, "", "")
    ask = {"CPU": opts["num_cpus"], "GPU": opts["num_gpus"], "memory": opts.get("memory", 0)}
    for n in _nodes():
        if all(n["Resources"].get(k, 0) >= v for k, v in ask.items() if v):
            return
    have = [{k: n["Resources"].get(k, 0) for k in ask} for n in _nodes()]
    raise InputError(f"cluster: no node can run a variant's task, which asks for {ask} (cluster.cpus_per_variant, "
                     f"gpus_per_variant, memory_gb); the nodes have {have}. Lower the request or add a node")


def run_variants(conn: Connection, state, on_record, on_measured=None) -> tuple[dict[str, dict], dict[str, dict],
                                                                                 list[str]]:
    """Submit every variant's build and measurement; as each finishes, hand its record to `on_record(name,
    record)` (the driver writes results.json), and the figures measured so far to `on_measured(measured)`. Returns
    (records, measured figures, errors of measurements that failed). A task whose worker died is retried by Ray; one that is still lost after `max_retries` is the
    variant's failed row."""
    import ray

    from compress.build import cached_record

    s = conn.settings
    check_fits(s, state.device)
    # a fresh worker process per task (max_calls=1): a process's peak memory never goes down, so each variant's
    # figure is its own, as in a serial run's subprocesses; and nothing one variant loaded stays for the next
    build = ray.remote(max_calls=1)(build_task)
    measure = ray.remote(max_calls=1)(measure_task)
    names = [v.name for v in state.recipe.variants]
    base_name = next(v.name for v in state.recipe.variants if v.is_reference)
    state.only_baseline = len(names) == 1
    records: dict[str, dict] = {}
    build_refs = {}
    measure_refs = {}
    # submitted in the order they are best started: the baseline's build and measurement first (every other
    # measurement waits for it), then the other builds, then their measurements
    ordered = sorted(state.recipe.variants, key=lambda v: v.name != base_name)
    for v in ordered:  # a complete checkpoint is reused here: no task, no worker started for it
        cached = cached_record(state.output / v.name, state.keys[v.name])
        if cached is not None:
            log.info("stage cached: %s (%s) unchanged, checkpoint %s verified", v.name, v.label, state.output / v.name)
            records[v.name] = {**cached, "cached": True, "cluster": {"address": s.address}}
            on_record(v.name, records[v.name])
            build_refs[v.name] = ray.put((records[v.name], None))
        else:
            build_refs[v.name] = build.options(**_options(s, state.device, v.name, "build")).remote(state, v.name)
        if v.name == base_name and state.recipe.evaluation.enabled:
            measure_refs[base_name] = measure.options(**_options(s, state.device, base_name, "measure")).remote(
                state, base_name, build_refs[base_name], None, None)
    pending = {ref: ("build", n) for n, ref in build_refs.items() if n not in records}
    if state.recipe.evaluation.enabled:
        base_ref = measure_refs[base_name]
        for n in names:
            if n != base_name:
                measure_refs[n] = measure.options(**_options(s, state.device, n, "measure")).remote(
                    state, n, build_refs[n], build_refs[base_name], base_ref)
        pending.update({ref: ("measure", n) for n, ref in measure_refs.items()})
    log.info("stage cluster: %d build and %d measure task(s) submitted (%g CPU, %g GPU each%s)%s",
             len(build_refs) - len(records),
             len(measure_refs), s.cpus_per_variant, _options(s, state.device, "", "")["num_gpus"],
             f", {s.memory_gb:g} GB" if s.memory_gb else "", f"; dashboard {conn.dashboard}" if conn.dashboard else "")
    measured: dict[str, dict] = {}
    placements: dict[str, dict] = {n: {} for n in names}
    errors: list[str] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        stage, name = pending.pop(done[0])
        try:
            value, where = ray.get(done[0])
        except _task_failures() as e:
            error = _task_error(e, state, s, stage)
            if stage == "build":
                records[name] = _failed(state, name, error)
                on_record(name, records[name])
            elif records.get(name, {}).get("status") != "failed":  # a failed build's measurement says nothing new
                errors.append(f"{name}: {error}")
            log.error("variant %s: %s FAILED: %s", name, stage, error)
            continue
        if where is not None:
            placements[name][stage] = where
            log.info("variant %s: %s done on %s (%s) in %.0f s", name, stage, where["hostname"], where["node_ip"],
                     where["seconds"])
        if stage == "build":
            records[name] = value
            records[name]["cluster"] = {"address": s.address, **placements[name]}
            on_record(name, records[name])
        elif value is not None:
            measured[name] = value
            records[name]["cluster"] = {"address": s.address, **placements[name]}
            if on_measured is not None:
                on_measured(measured)
    return {n: records[n] for n in names if n in records}, measured, errors


def run_one(conn: Connection, state, name: str, base: dict | None,
            base_measured: dict | None) -> tuple[dict, dict | None, str | None]:
    """One variant's build and measurement as two tasks, waited for (compress/verify.py's next point): (record,
    measured figures or None, the measurement's error or None)."""
    import ray

    s = conn.settings
    build_ref = ray.remote(max_calls=1)(build_task).options(**_options(s, state.device, name, "build")).remote(
        state, name)
    base_refs = (ray.put((base, None)), ray.put((base_measured, None))) if base and base_measured else (None, None)
    measure_ref = ray.remote(max_calls=1)(measure_task).options(**_options(s, state.device, name, "measure")).remote(
        state, name, build_ref, *base_refs)
    try:
        record, where = ray.get(build_ref)
    except _task_failures() as e:
        return _failed(state, name, _task_error(e, state, s, "build")), None, None
    record["cluster"] = {"address": s.address, **({"build": where} if where else {})}
    try:
        figures, where = ray.get(measure_ref)
        if where:
            record["cluster"]["measure"] = where
        return record, figures, None
    except _task_failures() as e:
        return record, None, _task_error(e, state, s, "measure")


def _task_failures() -> tuple[type, ...]:
    """What `ray.get` raises for a task that failed: its own exception, or its worker or node lost every retry."""
    import ray

    return (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
            ray.exceptions.TaskUnschedulableError, ray.exceptions.RaySystemError)


def _task_error(e: BaseException, state, s: ClusterSettings, stage: str) -> str:
    """The row's error for a failed task (`_task_failures`): the variant's own, raised in its task (an InputError
    is the run's: raised again), or its worker lost `max_retries + 1` times."""
    import ray

    from compress.resources import one_line
    from eval.measure import RowFailed

    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
        if isinstance(cause, InputError):
            raise cause from None
        return str(cause) if isinstance(cause, RowFailed) else one_line(cause, state.output)
    return (f"its {stage} task's worker was lost {s.max_retries + 1} time(s) ({type(e).__name__}); "
            f"cluster.max_retries: {s.max_retries}")


def _failed(state, name: str, error: str) -> dict:
    from compress.build import failed_record

    return failed_record(next(v for v in state.recipe.variants if v.name == name), error, state.env)
