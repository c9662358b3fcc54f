"""The run's estimate of the time left in a stage, from the stage's own measured cost so far.

A lab run is an hour of rows measured one after another; a user watching it wants to know whether to wait. The
estimate is the mean wall time of the rows this stage has finished times the rows still to go: no fixed guess, and
on a rerun whose rows come from the cache it falls to seconds with them. It is logged, never stored: the stored
times are each row's stage_seconds (eval/measure.stage_seconds)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("compress")


class Pace:
    def __init__(self, stage: str, rows: int, spent_s: float = 0.0):
        """`spent_s`: what the stage spent on all its rows before the first one started (the vLLM stage computes
        every row's transformers reference first): each row's share of it is counted in the pace, so the first
        estimate is not low by it."""
        self.stage, self.rows, self.done, self.upfront_s = stage, rows, 0, spent_s
        self.t0 = self.t_row = time.perf_counter()

    def row_done(self, name: str) -> str:
        """Log and return one line: this row's time, the stage's so far, and the estimate of what is left."""
        now = time.perf_counter()
        self.done += 1
        row_s, rows_s = now - self.t_row, now - self.t0
        self.t_row = now
        left = self.rows - self.done
        line = f"stage {self.stage}: {name} done in {row_s / 60:.1f} min ({self.done} of {self.rows} rows, " \
               f"{(rows_s + self.upfront_s) / 60:.1f} min so far)"
        if left:
            per_row_s = rows_s / self.done + self.upfront_s / max(self.rows, 1)
            line += f"; about {per_row_s * left / 60:.0f} min left for {left} more at this stage's pace"
        log.info(line)
        return line
