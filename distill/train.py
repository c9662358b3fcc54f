"""Logit distillation in plain PyTorch: the student learns the teacher's whole next-token distribution.

    loss = (1 - w) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + w * CE(z_s, next token)

averaged over every position of every window. The teacher's distribution says not only which token is right but
how plausible every other token is ("dark knowledge"); a temperature T > 1 flattens it so that those small
probabilities carry gradient, and T^2 keeps the gradient scale independent of T (Hinton et al. 2015). The optional
cross-entropy term (weight w) anchors the student to the text itself.

Optimizer: AdamW, linear warm-up then cosine decay to lr x min_lr_ratio, gradient clipping, `batch / micro_batch`
accumulation steps. The teacher's logits are computed on the fly: every window is seen once, so a cache of teacher
logits would cost as many teacher forwards as it saves (and top-k logits of a 49k vocabulary per token are large).

A killed run resumes: every `checkpoint_every` steps the student, optimizer, schedule and loss history are written
atomically to `state_dir/train-state.pt`, and the data order is a pure function of the step, so a resumed run sees
exactly the windows the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.options import Distill

STATE = "train-state.pt"


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            ce_weight: float = 0.0, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The distillation loss over (batch, tokens, vocab) logits, and its parts as floats.

    `targets` (batch, tokens) are the next tokens for the cross-entropy term; positions with target -100 are
    ignored by it (the last position of a window has no next token)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * t * t
    loss = (1 - ce_weight) * kl
    parts = {"kl": float(kl.detach())}
    if ce_weight > 0:
        if targets is None:
            raise ValueError("ce_weight > 0 needs targets")
        ce = F.cross_entropy(student_logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss = loss + ce_weight * ce
        parts["ce"] = float(ce.detach())
    return loss, parts


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up over `warmup` steps, then cosine to min_ratio."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_windows(windows: list[list[int]], step: int, batch: int) -> list[list[int]]:
    """The windows of optimizer step `step`: consecutive, wrapping around when the data is shorter than the run."""
    n = len(windows)
    return [windows[(step * batch + i) % n] for i in range(batch)]


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, device: str) -> dict | None:
    """The resume state, loaded with `weights_only=True`: tensors, numbers, strings and containers only, so a file
    planted in the output folder cannot run code (a full unpickle can). A state that does not load (truncated by a
    kill during an older, non-atomic save; or not ours) is renamed aside (unreadable-<time>-train-state.pt), never
    deleted, and training starts again from step 0."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        aside = path.with_name(f"unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{path.name}")
        os.replace(path, aside)
        import logging

        logging.getLogger("compress").warning("distill: %s does not load as a training state (%s: %s); moved it to "
                                              "%s and training from step 0", path, type(e).__name__,
                                              str(e).splitlines()[0][:200], aside.name)
        return None


def train(student, teacher, windows: list[list[int]], cfg: Distill, state_dir: Path, *, device: str = "cpu",
          stop_after: int | None = None, checkpoints: bool = True) -> list[dict]:
    """Distill `teacher` into `student` for cfg.steps optimizer steps on `windows`; returns the per-step history.

    Resumes from `state_dir/train-state.pt` if a previous run left one. `stop_after` ends the call after that many
    steps of this call (for tests of resumption; a real interruption is a kill)."""
    from tqdm import tqdm

    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / STATE
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 10)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, warmup, cfg.min_lr_ratio))
    history: list[dict] = []
    start = 0
    state = _load_state(path, device)
    if state is not None:
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = state["history"], state["step"]
    teacher.eval()
    student.train()
    # bf16 autocast on GPU; fp32 on CPU, which has no bf16 units here (emulated bf16 is several times slower)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    bar = tqdm(range(start, cfg.steps), desc="distill", unit="step", initial=start, total=cfg.steps)
    done_here = 0
    for step in bar:
        t0 = time.perf_counter()
        batch = step_windows(windows, step, cfg.batch)
        parts_sum: dict[str, float] = {}
        loss_sum = 0.0
        for m in range(cfg.accumulation):
            ids = torch.tensor(batch[m * cfg.micro_batch:(m + 1) * cfg.micro_batch], device=device)
            targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
            with autocast:
                with torch.no_grad():
                    t_logits = teacher(ids, use_cache=False).logits
                s_logits = student(ids, use_cache=False).logits
                loss, parts = kd_loss(s_logits, t_logits, cfg.temperature, cfg.ce_weight, targets)
            (loss / cfg.accumulation).backward()
            loss_sum += float(loss.detach()) / cfg.accumulation
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.accumulation
            del t_logits, s_logits, loss
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        tok_per_sec = cfg.batch * cfg.seq_len / seconds
        history.append({"step": step + 1, "loss": loss_sum, **parts_sum, "lr": lr, "grad_norm": grad_norm,
                        "seconds": seconds, "tok_per_sec": tok_per_sec})
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tok_per_sec:.0f}")
        done_here += 1
        last = step + 1 == cfg.steps
        if checkpoints and ((step + 1) % cfg.checkpoint_every == 0 or last
                            or (stop_after and done_here >= stop_after)):
            _save_state(path, {"step": step + 1, "student": student.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "history": history})
        if stop_after and done_here >= stop_after and not last:
            break
    student.eval()
    return history
