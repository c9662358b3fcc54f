"""eval/serving.py: percentiles, per-request metrics and a level's summary, against hand-computed values."""

import math

import numpy as np
import pytest

from eval.serving import percentile, request_metrics, summarize_level


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 1, 17))])
@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_nan():
    assert math.isnan(percentile([], 50))


def test_request_metrics():
    # sent at 10.0; 5 chunks; first at 10.5, last at 11.3; 5 tokens -> TPOT = 0.8 / 4
    m = request_metrics(10.0, [10.5, 10.7, 10.9, 11.1, 11.3], 5)
    assert m["ttft_s"] == pytest.approx(0.5)
    assert m["e2e_s"] == pytest.approx(1.3)
    assert m["tpot_s"] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        request_metrics(0.0, [], 0)


def test_summarize_level_goodput_needs_both_limits():
    reqs = [{"ttft_s": 0.1, "tpot_s": 0.05, "e2e_s": 1.0, "output_tokens": 10},   # good
            {"ttft_s": 2.0, "tpot_s": 0.05, "e2e_s": 2.5, "output_tokens": 10},   # TTFT too slow
            {"ttft_s": 0.1, "tpot_s": 0.50, "e2e_s": 4.6, "output_tokens": 10},   # TPOT too slow
            {"ttft_s": 0.2, "tpot_s": 0.09, "e2e_s": 1.0, "output_tokens": 10}]   # good
    s = summarize_level(reqs, concurrency=2, wall_s=4.0, slo_ttft_s=1.0, slo_tpot_s=0.1)
    assert s["requests"] == 4 and s["concurrency"] == 2
    assert s["output_tok_per_sec"] == pytest.approx(40 / 4.0)
    assert s["requests_per_sec"] == pytest.approx(1.0)
    assert s["goodput_requests_per_sec"] == pytest.approx(0.5)
    assert s["slo_met_share"] == pytest.approx(0.5)
    assert s["ttft_s_p99"] >= s["ttft_s_p50"] and s["tpot_s_p99"] >= s["tpot_s_p50"]
    assert s["ttft_s_p50"] == pytest.approx(float(np.percentile([0.1, 2.0, 0.1, 0.2], 50)))
    loose = summarize_level(reqs, concurrency=2, wall_s=4.0, slo_ttft_s=None, slo_tpot_s=None)
    assert loose["slo_met_share"] == 1.0
