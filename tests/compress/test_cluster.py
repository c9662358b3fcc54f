"""`compress run --cluster`: the variants as Ray tasks, on a local Ray cluster of two one-CPU worker nodes (Ray's own
cluster_utils) and the tiny model. A cluster run gives the serial run's checkpoints (sha256) and figures exactly;
a worker killed mid-variant is retried and its variant completes; a killed driver's rerun continues; a cluster that
cannot be reached, or whose nodes do not see the output folder, is exit 2 with nothing written."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compress import run as run_mod
from compress.cli import main
from compress.recipe import load_recipe
from conftest import ROOT, task_data, write_recipe

ray = pytest.importorskip("ray")

VARIANTS = [{"name": "baseline", "method": "baseline"},
            {"name": "rtn-w4", "method": "rtn", "bits": 4, "group_size": 32},
            {"name": "gptq-w4", "method": "gptq", "bits": 4, "group_size": 32}]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Local files in the shared data's formats: an ARC-style task file and a perplexity text."""
    return task_data(tmp_path_factory.mktemp("data"))


def _recipe(folder: Path, tiny_model, calib_file, data_dir, serial: bool = False, **extra) -> Path:
    """The tiny sweep. Its `cluster:` section (not in the serial run's) has each task reserve one CPU, a node's;
    a task runs the serial run's torch threads (the default), so that the arithmetic is the same."""
    folder.mkdir(parents=True, exist_ok=True)
    if not serial:
        extra.setdefault("cluster", {"cpus_per_variant": 1})
    ev = {"data_dir": str(data_dir), "tasks": ["arc_easy"], "limit": 20, "batch_size": 4,
          "perplexity": {"file": "text.raw", "context": 64, "stride": 32, "max_windows": 6}, "throughput": None}
    return write_recipe(folder, tiny_model, calib_file, VARIANTS, evaluation=ev, **extra)


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory, tiny_model, calib_file, data_dir) -> Path:
    """The serial run every cluster run is compared with."""
    folder = tmp_path_factory.mktemp("serial")
    recipe = _recipe(folder, tiny_model, calib_file, data_dir, serial=True)
    assert run_mod.run(load_recipe(recipe), recipe) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def ray_cluster():
    """A head that runs no task and two worker nodes of one CPU each: two variants at a time, on two nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _start(recipe: Path, *args: str) -> subprocess.Popen:
    """`compress run RECIPE ARGS` as a driver process of its own, its log (and its workers') on one pipe."""
    return subprocess.Popen([sys.executable, "-m", "compress", "run", str(recipe), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, lines: list[str], timeout_s: float = 900) -> int:
    deadline = time.time() + timeout_s
    for line in proc.stdout:
        lines.append(line)
        assert time.time() < deadline, "the run took too long:\n" + "".join(lines[-40:])
    return proc.wait(timeout=60)


def _compare(a: Path, b: Path) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_runs.py"), str(a), str(b)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1].startswith("ALL_EQUAL"), out
    return out


def _records(run_dir: Path) -> dict:
    return {r["name"]: r for r in json.loads((run_dir / "results.json").read_text())["variants"]}


def test_cluster_run_equals_the_serial_run(tmp_path, tiny_model, calib_file, data_dir, serial_run, ray_cluster):
    recipe = _recipe(tmp_path, tiny_model, calib_file, data_dir)
    lines: list[str] = []
    code = _finish(_start(recipe, "--cluster", ray_cluster.address), lines)
    assert code == 0, "".join(lines[-40:])
    out = _compare(serial_run, tmp_path / "run")
    assert out.count('"weights_sha256_equal": true') == 3 and out.count('"figures_equal": true') == 3
    records = _records(tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["cluster"]["engine"] == "ray" and len(results["cluster"]["nodes"]) == 2
    tasks = [r["cluster"][stage] for r in records.values() for stage in ("build", "measure")]
    assert len({t["pid"] for t in tasks}) == 6  # one fresh worker per task
    assert len({t["node_id"] for t in tasks}) == 2  # both nodes worked
    # two tasks on two nodes wrote into the one output folder at the same time
    assert any(a["node_id"] != b["node_id"] and a["started"] < b["started"] + b["seconds"] and
               b["started"] < a["started"] + a["seconds"] for a in tasks for b in tasks)
    assert "rtn-w4: build done on" in "".join(lines) and "stage measure on" in "".join(lines)
    assert not list((tmp_path / "run" / "eval").glob("*.f32"))  # the KL reference is removed once all are measured
    # a rerun builds and measures nothing: every checkpoint and every figure is reused
    lines = []
    assert _finish(_start(recipe, "--cluster", ray_cluster.address), lines) == 0
    text = "".join(lines)
    assert text.count("stage cached:") == 3 and "stage build on" not in text
    assert text.count("unchanged, reusing") == 3


def test_a_killed_worker_is_retried_and_its_variant_completes(tmp_path, tiny_model, calib_file, data_dir,
                                                              serial_run, ray_cluster):
    recipe = _recipe(tmp_path, tiny_model, calib_file, data_dir)
    proc = _start(recipe, "--cluster", ray_cluster.address)
    lines, killed = [], None
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"\(build gptq-w4 pid=(\d+)", line)
        if killed is None and m and "stage build on" in line:
            time.sleep(1.0)  # into the build (its backend is being imported and run)
            killed = int(m.group(1))
            os.kill(killed, signal.SIGKILL)
    assert proc.wait(timeout=60) == 0, "".join(lines[-40:])
    text = "".join(lines)
    attempts = set(re.findall(r"\(build gptq-w4 pid=(\d+).*stage build on", text))
    assert killed is not None and str(killed) in attempts and len(attempts) == 2, text[-3000:]
    for name in ("baseline", "rtn-w4"):  # built once: a finished variant is never built again
        assert len(re.findall(rf"variant {name}: stage build on", text)) == 1
    assert _records(tmp_path / "run")["gptq-w4"]["status"] == "ok"
    _compare(serial_run, tmp_path / "run")


def test_a_killed_driver_is_continued_by_the_rerun(tmp_path, tiny_model, calib_file, data_dir, serial_run,
                                                   ray_cluster):
    recipe = _recipe(tmp_path, tiny_model, calib_file, data_dir)
    proc = _start(recipe, "--cluster", ray_cluster.address)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"variant \S+: build done on", line):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    finished = re.findall(r"variant (\S+): build done on", "".join(lines))
    lines = []
    assert _finish(_start(recipe, "--cluster", ray_cluster.address), lines) == 0, "".join(lines[-40:])
    text = "".join(lines)
    for name in finished:
        assert f"stage cached: {name} " in text and f"variant {name}: stage build on" not in text
    _compare(serial_run, tmp_path / "run")


def test_a_cluster_that_cannot_be_reached_is_exit_2_and_nothing_is_written(tmp_path, tiny_model, calib_file,
                                                                            data_dir, capsys):
    recipe = _recipe(tmp_path, tiny_model, calib_file, data_dir)
    assert main(["run", str(recipe), "--cluster", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in err and "Traceback" not in err
    assert main(["run", str(recipe), "--cluster", "ray://nowhere"]) == 2
    assert "--cluster: expected 'local', 'auto', 'ray://HOST:PORT' or 'HOST:PORT', got 'ray://nowhere'" in \
        capsys.readouterr().err
    bad = _recipe(tmp_path / "b", tiny_model, calib_file, data_dir, cluster={"address": "head", "cpus": 2})
    assert main(["run", str(bad), "--cluster", "local"]) == 2  # the recipe's cluster section is checked too
    capsys.readouterr()
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cluster.address: expected 'local'" in err and "cluster.cpus: unknown key" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "b" / "run").exists()


def test_a_task_no_node_can_hold_is_refused(tmp_path, tiny_model, calib_file, data_dir, ray_cluster, capsys):
    recipe = _recipe(tmp_path, tiny_model, calib_file, data_dir, cluster={"address": ray_cluster.address,
                                                                          "cpus_per_variant": 4})
    proc = _start(recipe)
    lines: list[str] = []
    assert _finish(proc, lines, timeout_s=300) == 2
    assert "no node can run a variant's task, which asks for {'CPU': 4" in "".join(lines)
    assert not (tmp_path / "run" / "baseline").exists()


def test_an_output_folder_a_node_does_not_see_is_exit_2(tmp_path, tiny_model, calib_file, data_dir):
    """A second node whose filesystem view hides the output's parent (a tmpfs mounted over it in a mount namespace
    of its own): what a node without the shared filesystem looks like."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs `unshare -m` (root or CAP_SYS_ADMIN) to give one node a filesystem view of its own")
    from ray.cluster_utils import Cluster

    hidden = tmp_path / "hidden"
    hidden.mkdir()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray_bin = Path(sys.executable).with_name("ray")
    node = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                             f"mount -t tmpfs none {hidden} && exec {ray_bin} start --address={cluster.address} "
                             f"--num-cpus=1 --block"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        ray.init(address=cluster.address)
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.time() < deadline and node.poll() is None, "the hidden node did not join"
            time.sleep(1)
        ray.shutdown()
        recipe = _recipe(tmp_path / "r", tiny_model, calib_file, data_dir)
        data = yaml.safe_load(recipe.read_text())
        data["output"] = str(hidden / "run")
        recipe.write_text(yaml.safe_dump(data))
        proc = _start(recipe, "--cluster", cluster.address)
        lines: list[str] = []
        assert _finish(proc, lines, timeout_s=300) == 2, "".join(lines[-30:])
        text = "".join(lines)
        assert f"does not see the output folder {hidden / 'run'}" in text and "Traceback" not in text
        assert not (hidden / "run").exists()  # nothing written, not even the folder
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
        cluster.shutdown()


def test_verify_strict_builds_its_next_points_as_cluster_tasks(tmp_path, tiny_model, calib_file, data_dir,
                                                               ray_cluster):
    """Method auto's verify strict on a cluster (compress/verify.py, cluster.run_one): a point that misses its
    max_kl target on held-out text is followed by a build task and a measure task of the next point."""
    auto = {"name": "auto-kl", "method": "auto", "formats": ["W4A16", "W8A16", "unquantized"], "group_size": 32,
            "target": {"max_kl": 1.0}, "analysis": {"windows": 2, "seq_len": 16}, "predicted_cap": 10.0}
    ev = {"data_dir": str(data_dir), "tasks": [], "throughput": None,
          "perplexity": {"file": "text.raw", "context": 64, "stride": 32, "max_windows": 6}}
    (tmp_path / "a").mkdir()
    first = write_recipe(tmp_path / "a", tiny_model, calib_file, [VARIANTS[0], auto], evaluation=ev)
    assert run_mod.run(load_recipe(first), first) == 0  # serial, verify report: the smallest point's measured KL
    kl0 = _records(tmp_path / "a" / "run")["auto-kl"]["kl"]["mean"]
    (tmp_path / "b").mkdir()
    recipe = write_recipe(tmp_path / "b", tiny_model, calib_file,
                          [VARIANTS[0], {**auto, "target": {"max_kl": kl0 / 2}, "verify": "strict"}], evaluation=ev,
                          cluster={"cpus_per_variant": 1})
    lines: list[str] = []
    assert _finish(_start(recipe, "--cluster", ray_cluster.address), lines) == 0, "".join(lines[-40:])
    r = _records(tmp_path / "b" / "run")["auto-kl"]
    steps = r["auto"]["verify"]["steps"]
    assert steps[0]["measured_kl"] == pytest.approx(kl0) and len(steps) >= 2, r["auto"]["verify"]
    assert r["cluster"]["build"]["hostname"] and r["kl"]["mean"] == steps[-1]["measured_kl"]
    assert "stage verify: auto-kl measured KL" in "".join(lines)
    assert not list((tmp_path / "b" / "run" / "eval").glob("*.f32"))  # the KL reference went at the end
