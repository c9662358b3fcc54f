"""eval/contention.py: the CPU time other processes take on our cores, and a timed row run beside a CPU burner."""

from __future__ import annotations

import os

import pytest

from eval import contention
from eval.contention import Snapshot, between

from conftest import burners


def test_shares_are_of_the_cores_capacity_over_the_window():
    hz = os.sysconf("SC_CLK_TCK")
    before = Snapshot(wall_s=0.0, busy=1000, steal=10, own=500, cores=2)
    # 1 s on 2 cores = 2 * hz jiffies; we used hz (one core), others hz / 2, the hypervisor stole hz / 20
    after = Snapshot(wall_s=1.0, busy=1000 + hz + hz // 2, steal=10 + hz // 20, own=500 + hz, cores=2)
    out = between(before, after)
    assert out["others_cpu_share"] == pytest.approx(0.25, abs=0.01)
    assert out["steal_share"] == pytest.approx(0.025, abs=0.01) and out["contended"] and out["judged"]
    quiet = Snapshot(wall_s=1.0, busy=1000 + hz, steal=10, own=500 + hz, cores=2)
    assert not between(before, quiet)["contended"] and between(before, quiet)["others_cpu_share"] == 0
    stolen = Snapshot(wall_s=1.0, busy=1000 + hz, steal=10 + hz // 2, own=500 + hz, cores=2)
    assert between(before, stolen)["contended"]  # steal alone is contention: the VM lost its CPU
    assert between(None, after) == {"others_cpu_share": None, "steal_share": None, "contended": False,
                                    "judged": False}


def test_a_row_timed_beside_a_cpu_burner_is_retried_then_flagged(tiny_model):
    """The issue's test: a timed decode row while a CPU-burning process runs on the same cores is re-measured
    (bounded) and, as the burner never stops, flagged; without the burner the same row is not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.engines.transformers import decode_benchmark

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    shape = dict(prompt_tokens=16, new_tokens=200, batch_sizes=(1,), repeats=2, device="cpu", retries=3)
    halt = burners()
    try:
        busy = decode_benchmark(model, tok, **shape)["batches"]["1"]["contention"]
    finally:
        halt()
    assert busy["contended"] and busy["judged"]
    assert busy["windows"] == 2 + 3 and busy["windows_contended"] >= 4  # every retry spent, then flagged
    assert busy["max_others_cpu_share"] > 0.3  # one burner per core: about half of the machine
    quiet = decode_benchmark(model, tok, **shape)["batches"]["1"]["contention"]
    assert not quiet["contended"] and quiet["windows_contended"] < quiet["windows"]


def test_timed_runs_replaces_contended_runs_with_quiet_ones(monkeypatch):
    """A contended run is not counted while retries remain: the figures come from the quiet runs only."""
    from eval.throughput import timed_runs

    verdicts = iter([True, False, True, False, False])
    monkeypatch.setattr(contention, "timed", lambda fn, threshold: (fn(), {"contended": next(verdicts),
                                                                            "others_cpu_share": 0.5,
                                                                            "steal_share": 0.0}))
    decode_s = iter([0.1, 9.0, 1.0, 9.0, 2.0, 4.0])  # warm-up, then the five timed runs (contended ones slow)
    out = timed_runs(lambda: (0.0, next(decode_s), 11), batch=1, new_tokens=11, repeats=3, retries=4)
    assert out["contention"]["windows"] == 5 and out["contention"]["windows_contended"] == 2
    assert not out["contention"]["contended"]  # three quiet runs were had
    assert (out["tok_per_sec_min"], out["tok_per_sec"], out["tok_per_sec_max"]) == pytest.approx((2.5, 5, 10))
