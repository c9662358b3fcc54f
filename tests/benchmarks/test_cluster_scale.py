"""benchmarks/cluster_scale.py: the task graph of a cluster run scheduled on N workers (arithmetic on its times)."""

from __future__ import annotations

import importlib.util

from conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("cluster_scale", ROOT / "benchmarks" / "cluster_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_makespan_respects_the_graph_and_the_workers():
    m = _module()
    rows = [("base", 10.0, 100.0), ("a", 50.0, 40.0), ("b", 30.0, 60.0)]
    # one worker does every task one after another
    assert m.makespan("base", rows, 1) == sum(b + s for _, b, s in rows)
    # unlimited workers: the critical path, base build -> base measure -> the longest measurement after it
    assert m.makespan("base", rows, 100) == 10 + 100 + 60
    # two workers: the baseline is built and measured first (the critical path), a and b are built beside it
    assert m.makespan("base", rows, 2) == 10 + 100 + 60
    assert m.makespan("base", rows, 1) > m.makespan("base", rows, 2)
