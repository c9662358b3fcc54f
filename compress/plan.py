"""What a run would do, without doing it (`compress plan`, `compress run --dry-run`): the variants, their
calibration, their checkpoint folders, and whether each fits on common GPUs (compress/planner.py), from the config
alone. Only a distillation estimate loads weights, because a training step's cost depends on this machine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from compress.checks import check_inputs
from compress.keys import calibration_settings
from compress.load import load_config, resolve_device_dtype
from compress.recipe import Recipe

log = logging.getLogger("compress")


def plan(recipe: Recipe, recipe_path: Path, measure_distill: bool = False) -> dict:
    """The plan as a dict (JSON on stdout) with `memory_plan_table` (the human table). With `measure_distill`
    (`compress run --dry-run`), distillation variants also get an estimated training time from a measured step."""
    from compress.planner import format_plan, kv_bytes_per_token, plan_rows

    source = check_inputs(recipe, recipe_path, prepare=False)
    device, dtype = resolve_device_dtype(recipe.model)
    p = recipe.evaluation.planner
    config = load_config(source)
    memory = plan_rows(config, [(v.name, *v.weight_format()) for v in recipe.variants],
                       context=p.context, batch=p.batch, headroom=p.headroom,
                       kv_bytes_per_token={v.name: kv_bytes_per_token(config, v.kv_cache) for v in recipe.variants})
    rows = []
    for v in recipe.variants:
        cal = calibration_settings(recipe, v)
        rows.append({"name": v.name, "method": v.method, "scheme": v.label, "ignore": v.ignore,
                     "calibration": f"{cal['samples']} x {cal['seq_len']} tokens of {cal['source']}" if cal else None,
                     "checkpoint": str(Path(recipe.output) / v.name)})
    out = {"model": source.description, "note": source.note, "device": device,
           "dtype": str(dtype).removeprefix("torch."), "output": recipe.output, "variants": rows,
           "memory_plan": memory, "memory_plan_table": format_plan(memory)}
    if measure_distill and any(v.distill and v.distill.steps for v in recipe.variants):
        out["distill_estimates"] = estimate_distillation(recipe, device, dtype)
    return out


def estimate_distillation(recipe: Recipe, device: str, dtype) -> dict:
    """Time a few distillation steps per distinct distill setting (`python -m distill estimate`, which loads the
    teacher): a step's cost depends on this machine, so it is measured, not guessed."""
    from compress.worker import run_worker

    out: dict = {}
    for v in recipe.variants:
        if v.distill and v.distill.steps:
            key = json.dumps(v.distill.model_dump(), sort_keys=True)
            if key not in out:
                log.info("stage dry-run: timing distillation steps for %s", v.name)
                out[key] = {"variants": [], **run_worker(
                    "distill", {"estimate": True, "teacher": recipe.model.model_dump(),
                                "settings": v.distill.model_dump(), "device": device,
                                "dtype": str(dtype).removeprefix("torch.")},
                    f"distillation estimate for {v.name}", show_log=True)}
            out[key]["variants"].append(v.name)
    return {"+".join(e["variants"]): {k: val for k, val in e.items() if k != "variants"} for e in out.values()}
