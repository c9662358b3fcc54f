"""The student a variant asks for, built once and cached (`python -m distill` is how a compress run asks).

`<output>/.students/<key>/` holds a student while it trains (train-state.pt, resumable) and, once finished, the
student as a Hugging Face folder plus `info.json`, written last: a folder with info.json is complete. Two variants
with the same distill settings ("distilled" and "distilled + W4A16") share one student, keyed by the teacher, the
settings, the data file and the library versions.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch

from compress.options import Calibration, Distill
from distill.prune import block_influence, decoder_layers, layers_to_drop, prune_layers
from distill.train import STATE, train

log = logging.getLogger("compress")

INFO = "info.json"
HISTORY_POINTS = 200  # loss-curve points kept in results.json (every step stays in info.json)


def training_windows(cfg: Distill, tokenizer) -> tuple[list[list[int]], list[list[int]], dict]:
    """(importance windows, training windows, data facts) cut from cfg.data: documents shuffled with cfg.seed,
    joined with EOS, cut into seq_len windows; the first importance_samples windows measure block influence, the
    rest are trained on (wrapping around, i.e. more than one epoch, if the run needs more than the file has)."""
    from compress.calibration import load_texts

    texts = load_texts(Calibration(source=cfg.data, text_field=cfg.text_field, seed=cfg.seed))
    need = (cfg.importance_samples + max(cfg.steps * cfg.batch, cfg.batch)) * cfg.seq_len
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"] + sep)
        if len(ids) >= need:
            break
    windows = [ids[k * cfg.seq_len:(k + 1) * cfg.seq_len] for k in range(len(ids) // cfg.seq_len)]
    if len(windows) < cfg.importance_samples + cfg.batch:
        raise ValueError(f"distill.data {cfg.data}: {len(ids)} tokens make {len(windows)} windows of {cfg.seq_len}; "
                         f"need at least importance_samples + batch = {cfg.importance_samples + cfg.batch}")
    importance, train_windows = windows[:cfg.importance_samples], windows[cfg.importance_samples:]
    facts = {"data": cfg.data, "train_windows": len(train_windows), "seq_len": cfg.seq_len,
             "tokens_trained": cfg.steps * cfg.batch * cfg.seq_len,
             "epochs": round(cfg.steps * cfg.batch / len(train_windows), 3)}
    return importance, train_windows, facts


def build_student(teacher, tokenizer, cfg: Distill, folder: Path, device: str, dtype) -> tuple[object, dict]:
    """The student for `cfg`: loaded from `folder` if complete, else pruned from `teacher` (measuring block
    influence), distilled for cfg.steps steps (resuming a killed run), saved, and returned with its info."""
    from transformers import AutoModelForCausalLM

    done = folder / "student"
    info = finished(folder)
    if info is not None:
        student = AutoModelForCausalLM.from_pretrained(done, dtype=dtype, device_map=device).eval()
        return student, info
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    importance, train_windows, facts = training_windows(cfg, tokenizer)
    n = len(decoder_layers(teacher))
    log.info("stage distill: block influence of %d layers on %d x %d tokens", n, len(importance), cfg.seq_len)
    scores = block_influence(teacher, importance, batch_size=cfg.micro_batch)
    drop = layers_to_drop(scores, cfg.student.layers) if cfg.student.layers else sorted(cfg.student.drop)
    if cfg.student.drop and max(cfg.student.drop) >= n:
        raise ValueError(f"distill.student.drop: {cfg.student.drop} names layers beyond the teacher's 0..{n - 1}")
    importance_seconds = time.perf_counter() - t0
    student = prune_layers(teacher, drop)
    log.info("stage distill: student keeps %d of %d layers, dropping %s", n - len(drop), n, drop)
    history: list[dict] = []
    if cfg.steps:
        for p in teacher.parameters():
            p.requires_grad_(False)
        log.info("stage distill: %d steps x %d sequences x %d tokens on %s", cfg.steps, cfg.batch, cfg.seq_len,
                 cfg.data)
        history = train(student, teacher, train_windows, cfg, folder, device=device)
    student.eval()
    staging = folder / ".tmp-student"
    shutil.rmtree(staging, ignore_errors=True)
    student.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(done, ignore_errors=True)
    staging.rename(done)
    info = {
        "teacher_layers": n, "student_layers": n - len(drop), "dropped_layers": drop,
        "chosen_by": "lowest block influence" if cfg.student.layers else "recipe list",
        "block_influence": scores, "importance_windows": len(importance), "importance_seconds": importance_seconds,
        "steps": cfg.steps, **facts,
        "train_seconds": sum(h["seconds"] for h in history),
        "tok_per_sec_median": _median([h["tok_per_sec"] for h in history]) if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "first_loss": history[0]["loss"] if history else None,
        "history": history,
        "settings": cfg.model_dump(),
    }
    (folder / INFO).write_text(json.dumps(info, indent=1) + "\n")  # written last: the student is complete
    (folder / STATE).unlink(missing_ok=True)  # optimizer state is 3x the model; the finished student replaces it
    return student, {**info, "cached": False}


def finished(folder: Path) -> dict | None:
    """The info of a finished student in `folder` (info.json is written last), marked cached; None if unfinished."""
    if (folder / INFO).is_file() and (folder / "student").is_dir():
        log.info("stage distill: reusing the finished student in %s", folder)
        return {**json.loads((folder / INFO).read_text()), "cached": True}
    return None


def summary(info: dict) -> dict:
    """What goes into results.json: everything but the per-step history, thinned to HISTORY_POINTS points."""
    history = info.get("history") or []
    every = max(1, len(history) // HISTORY_POINTS)
    thinned = [{"step": h["step"], "loss": h["loss"]} for h in history[::every]]
    if history and thinned[-1]["step"] != history[-1]["step"]:
        thinned.append({"step": history[-1]["step"], "loss": history[-1]["loss"]})
    return {**{k: v for k, v in info.items() if k != "history"}, "loss_curve": thinned}


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def estimate(teacher, cfg: Distill, device: str, measured_steps: int = 2) -> dict:
    """Seconds per optimizer step, measured on random tokens with a student of the requested depth (after one
    warm-up step), and the estimated training time for cfg.steps. Nothing is saved."""
    import tempfile

    n = len(decoder_layers(teacher))
    keep = cfg.student.layers or n - len(cfg.student.drop)
    student = prune_layers(teacher, list(range(n - keep)))
    vocab = teacher.config.vocab_size
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, vocab, ((measured_steps + 1) * cfg.batch, cfg.seq_len), generator=g).tolist()
    probe = cfg.model_copy(update={"steps": measured_steps + 1, "warmup_steps": 1})
    with tempfile.TemporaryDirectory() as tmp:
        history = train(student, teacher, windows, probe, Path(tmp), device=device, checkpoints=False)
    step_s = _median([h["seconds"] for h in history[1:]])
    del student
    return {"step_seconds": step_s, "steps": cfg.steps, "estimated_train_seconds": step_s * cfg.steps,
            "student_layers": keep, "measured_steps": measured_steps, "device": device}
