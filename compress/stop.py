"""How a run stops: by SIGTERM, or because a stage stopped making progress; and never by accident in a fork.

**Handlers act only in their own process.** compress turns SIGTERM into `Terminated` (a SystemExit), so that
`finally` blocks run: a vLLM server is stopped, staging is removed, results.json says the run was stopped. But the
libraries compress calls fork: lm-eval's bootstrap forks a multiprocessing pool, llm-compressor and datasets may,
joblib's multiprocessing backend does. A forked child inherits the Python-level handler, and `Pool.terminate`
SIGTERMs its workers. A worker hit while it is still inside an at-fork callback raised SystemExit where Python
ignores it ("Exception ignored in ... _after_fork ..."), lived on, and blocked on the queue lock its parent had
taken, so `terminate` joined it forever (issue 26: the lab hung in both of its lm-eval passes through vLLM). Every
handler installed here therefore checks the pid: in any other process it restores the default action and delivers
the signal again, so a forked worker dies as it would have without compress. (A reset at fork time would not do:
CPython drops a signal whose handler became SIG_DFL between its arrival and its handling, which is the same hang.)

**No stage waits forever.** The watchdog (armed by `compress run` in its main thread) watches each stage (a build,
a measurement, a served row) for progress: a step finished (any tqdm bar of this process moved, or `tick()`), or
CPU time used by this process and its children (a vLLM server included). A stage that is idle, with no step and
no CPU, for longer than its bound is stopped: the main thread gets `Stalled`, whose message names the stage, the
bound and where the main thread was waiting (its innermost frames). The bound comes from the stage's own rate:
`factor` x the longest step it has taken so far, at least `min_s`; before its first step, `first_step_s`. A busy
stage (computing without a progress bar) is never stopped; a hang as reported (the machine 100% idle, a join that
never returns) is. The forks the stage left behind (copies of this process, e.g. a pool worker stuck on a lock) are
killed: they are ours by construction (same executable and command line, our descendants, born during the stage).

The signal state is the process's, so this module keeps it: `arm()` once per run, `stage()` around each stage
(a no-op when nothing is armed, e.g. in a Ray task, whose thread may not be the main one).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import sysconfig
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("compress")

STALL_SIGNAL = signal.SIGUSR2  # the watchdog's way into a main thread blocked in a system call


class Terminated(SystemExit):
    """A SIGTERM (or SIGHUP) reached the run. A SystemExit, so no `except Exception` turns it into a failed row."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


class Stalled(RuntimeError):
    """A stage made no progress for its bound. An Exception: the variant it belongs to fails with this message, and
    the run goes on with the next one."""


def own_process_only(action):
    """A signal handler that runs `action(signum, frame)` in the process that installed it; in a fork of it (which
    inherits the handler), the signal's default action, as if compress had installed nothing."""
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # default action: SIGTERM and SIGUSR2 end the process here
            return
        action(signum, frame)

    handler.owner = owner
    return handler


def _raise_terminated(signum, frame):
    raise Terminated(signum)


# --- forks are born with the default action ------------------------------------------------------------------------
# The pid check alone leaves one window: a signal that reaches a child before CPython's fork bookkeeping has run is
# caught by the inherited C-level handler, and CPython then clears the pending flag (_PySignal_AfterFork), so the
# signal is lost and a pool worker lives on (a worker not yet scheduled when Pool.terminate signalled it: the
# `pid-only` mode of tests/compress/fork_race.py; benchmarks/results/fork_race.txt). So while compress's handlers
# are installed, every fork blocks them in the forking thread; the child sets their default action and unblocks (a
# pending SIGTERM then ends it at once), the parent unblocks (a pending one then reaches its handler: nothing is
# lost either side).
_OURS: dict[int, object] = {}  # signal -> the handler compress installed, which forks must not inherit
_fork_mask = threading.local()
_hooks_registered = False


def _before_fork() -> None:
    if _OURS:
        _fork_mask.old = signal.pthread_sigmask(signal.SIG_BLOCK, set(_OURS))


def _after_fork_in_parent() -> None:
    old = getattr(_fork_mask, "old", None)
    if old is not None:
        _fork_mask.old = None
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _after_fork_in_child() -> None:
    old = getattr(_fork_mask, "old", None)
    if old is None:
        return
    _fork_mask.old = None
    for sig in list(_OURS):
        if getattr(signal.getsignal(sig), "owner", None) is not None:
            signal.signal(sig, signal.SIG_DFL)
    _OURS.clear()
    signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _install(sig: int, handler) -> object:
    """signal.signal(sig, handler) for a handler of ours, which forks will not inherit; returns the old one."""
    global _hooks_registered
    if not _hooks_registered:
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
        _hooks_registered = True
    old = signal.signal(sig, handler)
    _OURS[sig] = handler
    return old


def _restore(sig: int, old) -> None:
    _OURS.pop(sig, None)
    signal.signal(sig, old if old is not None else signal.SIG_DFL)


def reclaim() -> None:
    """Install compress's handlers again after a library replaced them. ray.init installs a SIGTERM handler of its
    own (Python's `sys.exit`, and its core worker's at the C level), and ray.shutdown resets the C-level one to the
    default action while Python still reports the old handler: without this, a SIGTERM after ray.shutdown killed
    compress outright (no `finally`, results.json not marked stopped). Main thread only; a no-op when none is ours."""
    if threading.current_thread() is threading.main_thread():
        for sig, handler in list(_OURS.items()):
            signal.signal(sig, handler)


@contextmanager
def terminate_raises(signals=(signal.SIGTERM, signal.SIGHUP)):
    """While inside: SIGTERM/SIGHUP raise `Terminated` in this process's main thread (and only in this process);
    what was there is restored on exit. A handler someone else installed is replaced meanwhile, since what Python
    reports is not always what is live (Ray's, after ray.shutdown: see `reclaim`); one of ours is installed again for
    the same reason. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for sig in signals:
        current = signal.getsignal(sig)
        if getattr(current, "owner", None) == os.getpid():
            signal.signal(sig, current)  # an outer terminate_raises (or arm) of this process: made live again
        else:
            old[sig] = _install(sig, own_process_only(_raise_terminated))
    try:
        yield
    finally:
        for sig, handler in old.items():
            _restore(sig, handler)


# --- the process tree ----------------------------------------------------------------------------------------------

def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc (Linux); [] elsewhere."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit() and (fields := _stat(entry)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def tree_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by `pid` (default: this process) and its live descendants, plus what
    its reaped children used."""
    pid = pid or os.getpid()
    ticks = 0
    for i, p in enumerate([pid, *descendants(pid)]):
        if (fields := _stat(p)) is not None:
            ticks += int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if i == 0 else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int | str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def forks() -> set[int]:
    """This process's descendants that are copies of it (forked, never exec'd: same command line), e.g. the workers
    of a multiprocessing pool."""
    me = _cmdline("self")
    return {p for p in descendants(os.getpid()) if _cmdline(p) == me}


def kill_forks(before: set[int]) -> list[int]:
    """SIGKILL the forks of this process that were not there in `before`; returns their pids."""
    killed = []
    for p in sorted(forks() - before):
        try:
            os.kill(p, signal.SIGKILL)
            killed.append(p)
        except OSError:
            pass
    return killed  # not reaped here: the multiprocessing objects they belong to wait for them


def where(frame) -> str:
    """Where a thread is waiting, in one phrase: its innermost frame, and the innermost one of another file that is
    not the standard library (the caller that asked for the wait)."""
    stdlib = sysconfig.get_paths()["stdlib"]

    def short(f) -> str:
        path = f.f_code.co_filename
        for marker in ("site-packages/", "/compress/", "/eval/", "/distill/"):
            if marker in path:
                path = (marker.strip("/") + "/" if marker != "site-packages/" else "") + path.split(marker, 1)[1]
                break
        else:
            path = os.path.relpath(path, stdlib) if path.startswith(stdlib) else os.path.basename(path)
        return f"{path}:{f.f_code.co_name}"

    inner, caller, f = frame, None, frame
    while f is not None:
        if f.f_code.co_filename != inner.f_code.co_filename and not f.f_code.co_filename.startswith(stdlib) \
                and f.f_code.co_filename != __file__:
            caller = f
            break
        f = f.f_back
    return short(inner) + (f", called from {short(caller)}" if caller is not None else "")


# --- the watchdog --------------------------------------------------------------------------------------------------

@dataclass
class _Stage:
    what: str
    started: float
    forks_before: set[int]
    last_step: float
    last_active: float
    longest_step_s: float = 0.0
    steps: int = 0
    stalls: int = 0
    message: str | None = None


class Watchdog:
    """See the module docstring. `settings`: factor, min_s, first_step_s, idle_cpu_share, poll_s."""

    def __init__(self, settings):
        self.s = settings
        self.current: _Stage | None = None
        self._ticks = 0
        self._lock = threading.RLock()  # the signal handler takes it in the main thread, which may hold it
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._watch, name="compress-watchdog", daemon=True)

    def bound_s(self, st: _Stage) -> float:
        if st.steps == 0:
            return self.s.first_step_s
        return max(self.s.min_s, self.s.factor * st.longest_step_s)

    def _progress(self) -> tuple:
        """What changes when any step finishes: our ticks and the counts of every live tqdm bar."""
        marks = [self._ticks]
        try:
            from tqdm import tqdm

            with tqdm.get_lock():
                marks += sorted((id(b), b.n) for b in list(tqdm._instances))
        except Exception:  # tqdm absent, or a bar closing as we read: no marks from it this time
            pass
        return tuple(marks)

    def _watch(self) -> None:
        mark, cpu = self._progress(), tree_cpu_s()
        while not self._stop.wait(self.s.poll_s):
            now, new_mark, new_cpu = time.monotonic(), self._progress(), tree_cpu_s()
            with self._lock:
                st = self.current
                if st is None or st.message is not None:
                    mark, cpu = new_mark, new_cpu
                    continue
                if new_mark != mark:
                    st.longest_step_s = max(st.longest_step_s, now - st.last_step)
                    st.steps += 1
                    st.last_step = st.last_active = now
                elif new_cpu - cpu > self.s.idle_cpu_share * self.s.poll_s:
                    st.last_active = now  # computing: not a stall, though no step finished
                mark, cpu = new_mark, new_cpu
                idle_s, bound = now - st.last_active, self.bound_s(st)
                if idle_s <= bound:
                    continue
                frame = sys._current_frames().get(self._main)
                rule = (f"{self.s.factor:g}x its longest step so far ({st.longest_step_s:.1f} s), at least "
                        f"{self.s.min_s:g} s" if st.steps else f"{self.s.first_step_s:g} s before a first step")
                st.message = (f"{st.what} made no progress for {idle_s:.0f} s (no step finished and no CPU used; the "
                              f"bound is {rule}), waiting in {where(frame) if frame else 'an unknown place'}")
                st.stalls += 1
            log.error("stage stalled: %s", st.message)
            signal.pthread_kill(self._main, STALL_SIGNAL)

    def _on_signal(self, signum, frame) -> None:
        with self._lock:
            st = self.current
            message = st.message if st is not None else None
            if st is not None:  # armed again: a library that swallows the exception gets another one a bound later
                st.message, st.last_active = None, time.monotonic()
        if message is not None:
            raise Stalled(message)

    def tick(self) -> None:
        self._ticks += 1

    @contextmanager
    def stage(self, what: str):
        now = time.monotonic()
        outer = self.current
        st = _Stage(what, now, forks(), now, now)
        with self._lock:
            self.current = st
        try:
            yield st
        except Stalled:
            if killed := kill_forks(st.forks_before):
                log.warning("stage stalled: killed %d stuck fork(s) of this process: %s", len(killed), killed)
            raise
        finally:
            with self._lock:
                self.current = outer
                if outer is not None:  # the inner stage's time was progress of the outer one
                    outer.last_step = outer.last_active = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


_armed: Watchdog | None = None


@contextmanager
def arm(settings):
    """The run's signal handling: SIGTERM/SIGHUP raise `Terminated`, and, with `settings` (the recipe's `watchdog`),
    a watchdog over every `stage()`. In the main thread only; elsewhere (a Ray task's thread) it does nothing."""
    global _armed
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    with terminate_raises():
        if settings is None or _armed is not None:
            yield _armed
            return
        dog = Watchdog(settings)
        old = _install(STALL_SIGNAL, own_process_only(dog._on_signal))
        _armed = dog
        dog.start()
        try:
            yield dog
        finally:
            dog.stop()
            _armed = None
            _restore(STALL_SIGNAL, old)


@contextmanager
def stage(what: str):
    """Watch the enclosed work as one stage (`what` names it in a stall's message: "measuring gptq-w4a16's
    tasks"); a no-op when no watchdog is armed."""
    if _armed is None or threading.current_thread() is not threading.main_thread():
        yield None
        return
    with _armed.stage(what) as st:
        yield st


def tick() -> None:
    """One step of the current stage finished (for loops that have no tqdm bar)."""
    if _armed is not None:
        _armed.tick()
