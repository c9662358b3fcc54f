"""eval/interleaved.py: ratios from alternating rounds, their distribution-free interval, and the verdict."""

from __future__ import annotations

import shutil
from math import comb

import pytest

from eval.engines import for_row
from eval.interleaved import fewest_rounds, interleave, median_interval, speed_ratio, verdict
from conftest import burners


def test_median_interval_is_the_order_statistic_one():
    assert median_interval([3, 1, 2, 5, 4, 8, 7, 6]) == (1, 8, pytest.approx(1 - 2 / 256))  # 8: [min, max]
    lo, hi, cov = median_interval(list(range(1, 13)))  # 12 values: [x(3), x(10)], 96.1%
    assert (lo, hi) == (3, 10) and cov == pytest.approx(1 - 2 * (1 + 12 + 66) / 4096)
    lo, hi, cov = median_interval([1.0, 2.0, 3.0])  # too few for 95%: [min, max] and its real coverage (75%)
    assert (lo, hi, cov) == (1.0, 3.0, pytest.approx(0.75))
    for n in range(6, 40):  # the coverage is what the binomial says, and never below 95% from 6 values on
        lo, hi, cov = median_interval(list(range(n)))
        assert cov >= 0.95 and cov == pytest.approx(1 - 2 * sum(comb(n, i) for i in range(lo + 1)) / 2 ** n)


def test_verdict():
    assert verdict(0.97, 1.03) == "no measurable difference" and verdict(1.0, 1.2) == "no measurable difference"
    assert verdict(1.05, 1.2) == "faster" and verdict(0.7, 0.9) == "slower"


def test_rounds_alternate_and_ratios_pair_the_same_round():
    """A B, B A, A B ...: each ratio divides the two runs of one round, so a machine that halves its speed
    midway (both sides at once) changes neither ratio nor verdict."""
    calls: list[str] = []
    speed = {"a": 100.0, "b": 150.0}

    def run(side):
        def one():
            calls.append(side)
            slow = 2.0 if len(calls) > 8 else 1.0  # the machine gets busy from round 4 on (call 9)
            return 0.0, 10 / speed[side] * slow, 11
        return one

    out = interleave(run("a"), run("b"), new_tokens=11, rounds=6)
    assert calls[:2] == ["a", "b"] and calls[2:6] == ["a", "b", "b", "a"]  # warm-up, then A B / B A
    assert out["rounds"] == out["rounds_run"] == 6 and [r["order"] for r in out["per_round"]] == ["ab", "ba"] * 3
    assert out["ratio"] == out["ratio_lo"] == out["ratio_hi"] == pytest.approx(1.5) and out["verdict"] == "faster"
    assert out["tok_per_sec"] == pytest.approx(112.5) and out["baseline_tok_per_sec"] == pytest.approx(75)


def test_identical_checkpoints_show_no_measurable_difference(tiny_model, tmp_path):
    """The issue's test: the interleaved ratio of two identical checkpoints has an interval containing 1.0."""
    twin = tmp_path / "twin"
    shutil.copytree(tiny_model, twin)
    a, b = (for_row({"checkpoint": str(f)}).decoder_spec(None, "cpu", "float32") for f in (tiny_model, twin))
    out = speed_ratio(a, b, prompt_tokens=16,
                      new_tokens=64, rounds=8, retries=24)  # retries: short bursts of kernel work right after the
    # vLLM tests (a steady share of a core in a full local run) once contended all of 8 retries
    assert out["ratio_lo"] <= 1.0 <= out["ratio_hi"] and out["verdict"] == "no measurable difference"
    assert out["rounds"] == 8 and out["coverage"] >= 0.95 and len(out["per_round"]) == out["rounds_run"]
    assert out["engine"]["engine"] == out["baseline_engine"]["engine"] == "transformers-eager"


def test_under_a_cpu_burner_the_ratio_holds_and_the_row_is_flagged(tiny_model, tmp_path):
    """With a CPU burner on every core for the whole measurement, every round is contended: the retries are spent
    and the ratio is flagged, but taken within rounds it still says what a quiet machine says (no difference)."""
    twin = tmp_path / "twin"
    shutil.copytree(tiny_model, twin)
    a, b = (for_row({"checkpoint": str(f)}).decoder_spec(None, "cpu", "float32") for f in (tiny_model, twin))
    halt = burners()
    try:
        out = speed_ratio(a, b, prompt_tokens=16,
                          new_tokens=200, rounds=8, retries=2)
    finally:
        halt()
    assert out["contention"]["contended"] and out["rounds_run"] == 10 and out["rounds"] == 10
    assert out["ratio_lo"] <= 1.0 <= out["ratio_hi"]


def test_rounds_stop_early_only_when_the_interval_is_tight():
    """With `width`, a steady ratio stops at the fewest rounds whose [min, max] covers 95% (6); a noisy one, whose
    interval stays wider than `width` x its median, runs every round; without `width`, every round."""
    def pair(ratios):  # the baseline decodes in 1 s; the variant's k-th call is ratios[k] times as fast
        step = iter(ratios)
        return (lambda: (0.0, 1.0, 11)), (lambda: (0.0, 1.0 / next(step), 11))

    steady = [1.0] + [1.50, 1.51, 1.49, 1.50, 1.52, 1.48, 1.50, 1.50]  # warm-up, then 8 rounds' ratios
    out = interleave(*pair(steady), new_tokens=11, rounds=8, width=0.05)
    assert out["rounds_run"] == out["rounds"] == 6 and out["rounds_max"] == 8 and out["stopped_early"]
    assert out["ratio_lo"] == pytest.approx(1.48) and out["ratio_hi"] == pytest.approx(1.52)
    noisy = [1.0] + [1.2, 1.6, 1.4, 1.5, 1.3, 1.7, 1.5, 1.5]
    out = interleave(*pair(noisy), new_tokens=11, rounds=8, width=0.05)
    assert out["rounds_run"] == 8 and not out["stopped_early"]
    out = interleave(*pair(steady), new_tokens=11, rounds=8)
    assert out["rounds_run"] == 8 and not out["stopped_early"]
    assert fewest_rounds(0.95) == 6 and fewest_rounds(0.99) == 8
