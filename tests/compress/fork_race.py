"""Pools created and terminated at once, many times, under a SIGTERM handler:
`python fork_race.py compress|pid-only|naive [ROUNDS]`.

The race of issue 26 made deterministic: an at-fork callback that sleeps keeps every forked worker inside its
after-fork callbacks long enough for `Pool.terminate`'s SIGTERM to land there, every time. With a handler that
raises SystemExit in any process (`naive`, what eval/engines/vllm.py installed before), the worker's exception is
ignored there, the worker lives on blocked on the pool's queue lock, and `terminate` joins it forever. With
compress's handlers (`compress`: compress.stop.arm, as `compress run` installs them, plus a vLLM server's
terminate_raises) the worker dies of the signal and every pool ends. `pid-only` is compress's pid-checking handler
without the fork-time signal mask (compress/stop.py says why the mask is there: a signal that reaches a worker before
CPython's fork bookkeeping is lost; benchmarks/results/fork_race.txt counts how often each mode hung).
Prints "done N" at the end.
"""

import multiprocessing as mp
import os
import signal
import sys
import time


def _square(x):
    return x * x


def main(mode: str, rounds: int) -> None:
    if mode == "naive":
        def handler(signum, frame):
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, handler)
        guard = None
    elif mode == "pid-only":
        from compress import stop

        signal.signal(signal.SIGTERM, stop.own_process_only(stop._raise_terminated))
    else:
        from compress import stop
        from compress.options import WatchdogSettings

        guard = stop.arm(WatchdogSettings())
        guard.__enter__()
        served = stop.terminate_raises()  # what a vLLM server adds while it runs (a no-op under arm)
        served.__enter__()
    os.register_at_fork(after_in_child=lambda: time.sleep(0.3))
    ctx = mp.get_context("fork")
    for i in range(rounds):
        with ctx.Pool(2):  # created and terminated at once (Pool.__exit__ is terminate)
            pass
        pool = ctx.Pool(2)
        pool.terminate()
        pool.join()
    joblib_rounds = 0
    try:
        import joblib
        from joblib.externals.loky import get_reusable_executor
    except ImportError:
        joblib = None
    if joblib is not None:
        for i in range(max(1, rounds // 2)):
            # joblib's multiprocessing backend: a forked pool, terminated at the end of the call
            assert joblib.Parallel(n_jobs=2, backend="multiprocessing")(joblib.delayed(_square)(x)
                                                                        for x in range(4)) == [0, 1, 4, 9]
            executor = get_reusable_executor(max_workers=2)  # loky: workers started fresh (fork + exec)
            assert executor.submit(_square, 3).result() == 9
            executor.shutdown(wait=True, kill_workers=True)
            joblib_rounds += 1
    print(f"done {rounds} pool rounds, {joblib_rounds} joblib rounds", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10)
