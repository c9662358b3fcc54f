"""compress/stop.py: handlers that act only in their own process (the race of issue 26, made deterministic), and the
watchdog that stops a stage which makes no progress."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from compress import stop
from compress.options import WatchdogSettings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _race(mode: str, rounds: int, timeout_s: float) -> subprocess.CompletedProcess | None:
    """tests/compress/fork_race.py in a subprocess; None when it ran past `timeout_s` (hung)."""
    try:
        return subprocess.run([sys.executable, str(HERE / "fork_race.py"), mode, str(rounds)], capture_output=True,
                              text=True, timeout=timeout_s, cwd=ROOT, start_new_session=True)
    except subprocess.TimeoutExpired:
        return None
    finally:
        subprocess.run(["pkill", "-9", "-f", f"fork_race.py {mode}"], capture_output=True)


def test_the_race_hangs_under_a_handler_that_raises_in_every_process():
    """The control: the old handler (SystemExit in whatever process runs it) hangs the very first pool, every time,
    so the test below can fail (this is what eval/engines/vllm.py installed before)."""
    assert _race("naive", 2, timeout_s=15) is None


def test_pools_terminated_at_once_never_hang_under_compress_handlers():
    """Under compress.stop.arm (what `compress run` installs) and a served stage's terminate_raises: 2 x 12 pools
    created and terminated at once, joblib's multiprocessing backend and a loky executor, all end in seconds."""
    for attempt in range(3):  # the race had a second, rarer window (a signal lost before fork bookkeeping): repeat
        proc = _race("compress", 12, timeout_s=60)
        assert proc is not None, f"a pool's terminate hung (attempt {attempt + 1})"
        assert proc.returncode == 0 and "done 12 pool rounds" in proc.stdout, proc.stderr[-2000:]
        assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_fork_dies_of_sigterm_while_the_parent_raises_terminated():
    before = signal.getsignal(signal.SIGTERM)
    with stop.arm(WatchdogSettings()):
        pid = os.fork()
        if pid == 0:  # the child: SIGTERM's default action (with the parent's handler it would raise instead)
            try:
                time.sleep(30)
            finally:
                os._exit(3)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        with pytest.raises(stop.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def _reset_c_level_handler(sig: int) -> None:
    """What ray.shutdown does (its core worker restores the default action under Python's feet): the live handler
    becomes SIG_DFL while signal.getsignal still reports the Python one."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal(ctypes.c_int(sig), ctypes.c_void_p(0))  # 0 = SIG_DFL


def test_a_library_that_replaced_the_handler_does_not_disable_terminated():
    """Seen in CI: after a test called ray.init/ray.shutdown in the pytest process, Python reported Ray's handler
    but the live one was the default action, so compress left it alone and the next SIGTERM killed pytest."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # ray.init's handler, as Python reports it
        _reset_c_level_handler(signal.SIGTERM)  # ... and ray.shutdown's reset of the live one
        with stop.terminate_raises():
            with pytest.raises(stop.Terminated):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
        with stop.arm(None):
            signal.signal(signal.SIGTERM, lambda signum, frame: None)  # ray.init inside a run (compress/cluster.py)
            _reset_c_level_handler(signal.SIGTERM)  # ray.shutdown
            stop.reclaim()  # what compress/cluster.py calls after each
            with pytest.raises(stop.Terminated):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, before)


# --------------------------------------------------------------------------------------------- the watchdog

FAST = WatchdogSettings(factor=4, min_s=1.0, first_step_s=2.0, poll_s=0.2)


def test_an_idle_stage_is_stopped_with_where_it_waited():
    event = threading.Event()
    t0 = time.monotonic()
    with stop.arm(FAST):
        with pytest.raises(stop.Stalled) as e:
            with stop.stage("measuring x's tasks"):
                event.wait(30)  # a join that never returns
    took = time.monotonic() - t0
    assert 2.0 <= took < 8, took
    msg = str(e.value)
    assert msg.startswith("measuring x's tasks made no progress for") and "2 s before a first step" in msg
    assert "threading.py:wait" in msg and "test_stop.py:test_an_idle_stage_is_stopped" in msg, msg


def test_the_bound_follows_the_stages_own_steps():
    """Steps of ~0.3 s: bound max(1 s, 4 x 0.3 s); an idle wait after them is stopped within ~1.2 s + a poll."""
    from tqdm import tqdm

    with stop.arm(FAST):
        with pytest.raises(stop.Stalled) as e:
            with stop.stage("perplexity"):
                for _ in tqdm(range(4), disable=False, file=open(os.devnull, "w")):
                    time.sleep(0.3)
                t0 = time.monotonic()
                threading.Event().wait(30)
    assert time.monotonic() - t0 < 4
    assert "4x its longest step so far" in str(e.value), str(e.value)


def test_a_busy_stage_without_steps_is_not_stopped():
    with stop.arm(FAST):
        with stop.stage("computing"):
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4:  # twice the first-step bound, all CPU, no progress bar
                sum(i * i for i in range(10_000))


def test_a_stall_kills_the_stages_stuck_forks():
    with stop.arm(FAST):
        with pytest.raises(stop.Stalled):
            with stop.stage("a pool"):
                pid = os.fork()
                if pid == 0:
                    time.sleep(60)
                    os._exit(0)
                os.waitpid(pid, 0)  # waits for a child that would never end
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_no_stage_outside_an_armed_run():
    with stop.stage("anything") as st:
        assert st is None


# --------------------------------------------------------------------------------------------- in a whole run

def test_a_hung_measurement_fails_its_variant_the_run_goes_on_and_the_rerun_resumes(tmp_path, tiny_model, calib_file,
                                                                                       monkeypatch, capsys, caplog):
    """`compress run` with one variant's lm-eval pass made to hang (an idle wait, as the lab's bootstrap pool did):
    that variant is a failed row saying where it waited, the next variant is measured, results.json and the report
    have every figure measured, and the same command run again measures what is missing."""
    import json

    from compress.cli import main
    from conftest import task_data, write_recipe
    from eval import accuracy

    (tmp_path / "data").mkdir()
    data = task_data(tmp_path / "data")
    ev = {"data_dir": str(data), "tasks": ["arc_easy"], "limit": 8, "batch_size": 4, "throughput": None,
          "perplexity": {"file": "text.raw", "context": 64, "stride": 64, "max_windows": 3}}
    variants = [{"name": "baseline", "method": "baseline"},
                {"name": "rtn-w4", "method": "rtn", "bits": 4, "group_size": 32},
                {"name": "rtn-w8", "method": "rtn", "bits": 8}]
    recipe = write_recipe(tmp_path, tiny_model, calib_file, variants, evaluation=ev,
                          watchdog={"factor": 4, "min_s": 1, "first_step_s": 3, "poll_s": 0.2})
    real = accuracy.run_tasks

    def hangs_for_rtn_w4(model, tok, tasks, *a, **k):
        if model.config._name_or_path.endswith("rtn-w4"):
            threading.Event().wait(120)
        return real(model, tok, tasks, *a, **k)

    monkeypatch.setattr(accuracy, "run_tasks", hangs_for_rtn_w4)
    t0 = time.monotonic()
    assert main(["run", str(recipe)]) == 1
    assert time.monotonic() - t0 < 100
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["variants"]}
    assert results["progress"] == {"state": "complete"}
    bad = rows["rtn-w4"]
    assert bad["status"] == "failed" and "measuring rtn-w4's tasks (lm-eval) made no progress" in bad["error"]
    assert "waiting in threading.py:wait" in bad["error"], bad["error"]
    assert rows["baseline"]["tasks"] and rows["rtn-w8"]["tasks"] and rows["rtn-w8"]["status"] == "ok"
    report = (out / "report.md").read_text()
    assert "made no progress" in report
    assert "Traceback" not in capsys.readouterr().err

    monkeypatch.setattr(accuracy, "run_tasks", real)
    caplog.clear()
    assert main(["run", str(recipe)]) == 0
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["variants"]}
    assert all(r["status"] == "ok" and r["tasks"]["arc_easy"]["n"] == 8 for r in rows.values())
    assert "rtn-w8 unchanged, reusing" in caplog.text and "rtn-w4 from" in caplog.text
