"""`verify: strict` for method `auto`: a target checked on held-out data, and a miss builds another point.

The choice (compress/backends/auto.py) meets a max_kl target on the *predicted* KL: the sum of one-unit damages on
calibration windows. Damage is not quite additive and calibration text is not the evaluation's, so the KL the
evaluation measures on the perplexity file can land above the target. With `verify: report` the row says by how
much; with `verify: strict` the run steps up the frontier and builds again, until the measured KL meets the target,
no larger point is left, or `max_steps` builds were spent. A min_recovery target (the mean task score as % of the
baseline's) has no prediction at all: its search starts at the smallest choice and steps up the same way, the
points of recovery lost standing in for the KL (`MEASURED`).

Where to step: one frontier point at a time would be many builds on a dense frontier (a point differs from the next
by one unit's format). The miss itself says how far to go: the measured/predicted ratio r of the point just built
corrects the prediction, so the next point is the smallest one whose predicted KL is at most target / r, and at
least one point better than the last (each step makes progress; none repeats a point). The ratio is re-read at
every step, from that step's own measurement.

Each step is a variant with `predicted_cap` set (a keyed field: another checkpoint, built and cached as any
variant), and the step reached is kept in OUTPUT/.verify/<name>.json with the history, under the key of the
recipe's own variant: a run killed mid-search, or run again, continues from the last point rather than building
the first point again.
"""

from __future__ import annotations

import json
import logging
import math

from compress import ownership

log = logging.getLogger("compress")


def strict(v) -> bool:
    return getattr(v, "verify", None) == "strict"


def _rel(name: str) -> str:
    return f".verify/{name}.json"


def _kl(record: dict) -> float | None:
    return (record.get("kl") or {}).get("mean")


def _recovery_pct(record: dict) -> float | None:
    return ((record.get("recovery") or {}).get("average") or {}).get("pct")


def _recovery_loss(record: dict) -> float | None:
    pct = _recovery_pct(record)
    return None if pct is None else 100.0 - pct


# per target kind: its measured error (lower is better) from the record, the error the target allows, and its name;
# the search treats both the same way (a max_kl target's error is the KL; a min_recovery's, the points of mean task
# score lost against the baseline)
MEASURED = {
    "max_kl": (_kl, lambda target: target, "KL"),
    "min_recovery": (_recovery_loss, lambda target: 100.0 - target, "recovery loss (points)"),
}


def _target(record: dict) -> tuple[str, float] | None:
    (kind, value), = ((record.get("auto") or {}).get("target") or {"": None}).items()
    return (kind, value) if kind in MEASURED else None


def measured(record: dict) -> float | None:
    """The record's measured error for its target (None: not a measured target, or not measured)."""
    t = _target(record)
    return None if t is None else MEASURED[t[0]][0](record)


def missed(record: dict) -> float | None:
    """How far the measured error is above what the target allows (KL in nats, or recovery points); None when met
    or not measured."""
    t, err = _target(record), measured(record)
    if t is None or err is None:
        return None
    over = err - MEASURED[t[0]][1](t[1])
    return over if over > 0 else None


def next_cap(record: dict) -> float | None:
    """The predicted-KL cap of the next point to build after `record` missed its target (module docstring); None when
    no point of the frontier is predicted to meet the target once corrected by the measured/predicted ratio. The point
    with no predicted damage (every unit unquantized: the baseline itself) is never a step."""
    a = record["auto"]
    kind, value = _target(record)
    predicted, allowed = a["predicted"]["value"], MEASURED[kind][1](value)
    ratio = measured(record) / predicted if predicted > 0 else math.inf
    want = allowed / ratio
    better = [c for _, c in a["frontier"] if 0 < c < predicted]
    reach = [c for c in better if c <= want]
    if not reach:
        return None
    return max(reach) * (1 + 1e-9)  # the smallest such point (a float sum may differ from the solver's by an ulp)


def _step(record: dict, cap: float | None) -> dict:
    a = record["auto"]
    return {"predicted_cap": cap, "effective_bits": a["effective_bits"], "predicted_kl": a["predicted"]["value"],
            "measured_kl": _kl(record), "recovery_pct": _recovery_pct(record), "met": missed(record) is None}


def resume(state) -> None:
    """Before any build: each strict `auto` variant continues at the cap its last verify step chose, when the recipe's
    variant is the one that search began from (same cache key). Updates state.recipe.variants and state.keys."""
    for i, v in enumerate(state.recipe.variants):
        if not strict(v):
            continue
        state.verify_from[v.name] = state.keys[v.name]
        saved = _read(state, v.name)
        if saved and saved.get("key") == state.keys[v.name] and saved.get("cap") is not None:
            log.info("stage verify: %s continues at its last frontier point (predicted KL <= %.4g; %s)", v.name,
                     saved["cap"], state.output / _rel(v.name))
            _use(state, i, saved["cap"])


def _read(state, name: str) -> dict | None:
    path = state.output / _rel(name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _use(state, i: int, cap: float):
    from compress.keys import cache_key, variant_versions

    v = state.recipe.variants[i].model_copy(update={"predicted_cap": cap})
    state.recipe.variants[i] = v
    state.keys[v.name] = cache_key(state.recipe, v, state.source, state.device, state.dtype,
                                   variant_versions(v, state.versions, state.env))
    return v


def step_up(state, records: dict[str, dict], build_and_measure) -> None:
    """After the run's measurement: every strict `auto` variant that missed its target is built again at the next
    point and measured (`build_and_measure(name)` updates `records`), until met, out of points or of `max_steps`.
    Each row's record gets the search (`auto.verify`), with the steps a resumed run had taken before."""
    for i, v in enumerate(list(state.recipe.variants)):
        if not strict(v):
            continue
        key = state.verify_from.get(v.name, state.keys[v.name])  # the recipe's own variant's
        saved = _read(state, v.name) or {}
        steps = list(saved.get("steps", [])) if saved.get("key") == key else []
        outcome = None
        while (rec := records.get(v.name)) and rec.get("status") == "ok" and measured(rec) is not None:
            if not steps or steps[-1]["predicted_cap"] != v.predicted_cap:
                steps.append(_step(rec, v.predicted_cap))
            over = missed(rec)
            kind, value = _target(rec)
            what = MEASURED[kind][2]
            if over is None:
                outcome = f"met: measured {what} {measured(rec):.4f}, target {kind} {value:g}"
                break
            cap = next_cap(rec)
            if cap is None:
                outcome = (f"missed by {over:.4f} ({what}): no point of the frontier is predicted to meet the target "
                           f"once corrected by this point's measured {what} / predicted KL ratio "
                           f"{measured(rec) / rec['auto']['predicted']['value']:.3g}")
                break
            builds = len(steps) - 1  # every step after the first was a build of this search (a resumed one's too)
            if builds >= v.max_steps:
                outcome = f"missed by {over:.4f} ({what}) after {builds} more builds (max_steps {v.max_steps})"
                break
            log.info("stage verify: %s measured %s %.4f, over its target by %.4f: building the point with predicted "
                     "KL <= %.4g (step %d of at most %d)", v.name, what, measured(rec), over, cap, builds + 1,
                     v.max_steps)
            ownership.write_owned(state.output, _rel(v.name), json.dumps(
                {"key": key, "cap": cap, "steps": steps}, indent=2) + "\n")
            v = _use(state, i, cap)
            build_and_measure(v.name)
        rec = records.get(v.name)
        if rec is not None and rec.get("auto") is not None:
            rec["auto"]["verify"] = {"mode": "strict", "steps": steps,
                                     "outcome": outcome or f"not measured ({rec.get('error') or 'no figure'})"}
            if outcome:
                log.info("stage verify: %s %s", v.name, outcome)
