"""The time-left estimate: the stage's own mean row time so far, times the rows to go."""

from eval import pace


def test_estimate_is_the_mean_row_time_times_the_rows_left(monkeypatch):
    clock = iter([0.0, 120.0, 360.0, 420.0, 500.0, 510.0])
    monkeypatch.setattr(pace.time, "perf_counter", lambda: next(clock))
    p = pace.Pace("evaluate", 4)
    assert p.row_done("a") == ("stage evaluate: a done in 2.0 min (1 of 4 rows, 2.0 min so far); about 6 min left "
                               "for 3 more at this stage's pace")
    assert p.row_done("b").endswith("(2 of 4 rows, 6.0 min so far); about 6 min left for 2 more at this stage's pace")
    p.row_done("c")
    assert p.done == 3 and "left" not in pace.Pace("x", 1).row_done("only")


def test_work_spent_before_the_first_row_counts_in_the_pace(monkeypatch):
    """The vLLM stage computes every row's transformers reference first: 4 rows, 240 s of references, then a
    2-minute row is 3 minutes of the stage's pace, so 9 minutes are left for the other 3 (not 6)."""
    clock = iter([0.0, 120.0])
    monkeypatch.setattr(pace.time, "perf_counter", lambda: next(clock))
    p = pace.Pace("vllm", 4, spent_s=240.0)
    assert p.row_done("a") == ("stage vllm: a done in 2.0 min (1 of 4 rows, 6.0 min so far); about 9 min left "
                               "for 3 more at this stage's pace")
