"""Several continuations of one context scored in one forward pass: what a multiple-choice task asks of a model.

lm-eval scores a question with k answer choices as k requests, (context, choice_i), and its transformers backend
runs each as its own sequence: the context's tokens go through the model k times. Here the context goes through
once, and the choices ride after it in the same sequence, each seeing the context and itself but not the others:

    tokens     c0 c1 c2 c3 | a0 a1 | b0 b1 b2
    positions   0  1  2  3 |  4  5 |  4  5  6      each branch continues the context's positions
    a1 attends  c0..c3, a0, a1 (never b*)          a 4-D attention mask, one per sequence in the batch

A branch holds its choice without the last token: the last context position predicts a choice's first token, and
a branch token predicts the next one, exactly as in the separate sequence (context + choice)[:-1]. Each choice's
log-probability is the sum over its tokens, and it is greedy when every token is the argmax, as lm-eval defines
both: the same arithmetic on fewer tokens (benchmarks/lm_eval_speed.py times both ways on a checkpoint and counts
the items they score alike).

Pure tensor functions over token ids: `groups` batches requests by context, `pack` builds one batch, `score` runs
it. eval/accuracy.py plugs `score_requests` into lm-eval.
"""

from __future__ import annotations

from collections import defaultdict


def groups(requests: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """The requests (context tokens, continuation tokens) grouped by context, in first-seen order: [(context,
    [indices of its requests])]."""
    by_context: dict[tuple, list[int]] = defaultdict(list)
    for i, (ctx, _) in enumerate(requests):
        by_context[tuple(ctx)].append(i)
    return [(list(ctx), idx) for ctx, idx in by_context.items()]


def packed_length(ctx: list[int], conts: list[list[int]]) -> int:
    return len(ctx) + sum(len(c) - 1 for c in conts)


def pack(batch: list[tuple[list[int], list[list[int]]]], pad_id: int, dtype):
    """One batch of (context, continuations) as model inputs: input_ids and position_ids [B, L], the additive 4-D
    attention mask [B, 1, L, L] in `dtype` (0 where a token may attend, the dtype's minimum elsewhere; a padding
    token attends to itself only), and per sequence, per continuation, the positions whose logits predict it."""
    import torch

    length = max(packed_length(ctx, conts) for ctx, conts in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    pos = torch.zeros((len(batch), length), dtype=torch.long)
    allowed = torch.zeros((len(batch), length, length), dtype=torch.bool)
    where: list[list[list[int]]] = []
    for b, (ctx, conts) in enumerate(batch):
        c = len(ctx)
        ids[b, :c] = torch.tensor(ctx)
        pos[b, :c] = torch.arange(c)
        allowed[b, :c, :c] = torch.ones(c, c, dtype=torch.bool).tril()
        offset, rows = c, []
        for cont in conts:
            n = len(cont) - 1  # the branch: the continuation without its last token
            if n:
                ids[b, offset:offset + n] = torch.tensor(cont[:-1])
                pos[b, offset:offset + n] = torch.arange(c, c + n)
                allowed[b, offset:offset + n, :c] = True
                allowed[b, offset:offset + n, offset:offset + n] = torch.ones(n, n, dtype=torch.bool).tril()
            rows.append([c - 1, *range(offset, offset + n)])
            offset += n
        for p in range(offset, length):  # padding: itself only (a row with nothing to attend to is NaN)
            allowed[b, p, p] = True
        where.append(rows)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, pos, mask.unsqueeze(1), where


def score(model, batch: list[tuple[list[int], list[list[int]]]], pad_id: int) -> list[list[tuple[float, bool]]]:
    """(log-probability, greedy) of every continuation in `batch`, per context, from one forward pass of `model` (a
    transformers causal LM). The log-softmax is taken in the logits' dtype, as lm-eval takes it."""
    import torch
    import torch.nn.functional as F

    ids, pos, mask, where = pack(batch, pad_id, model.dtype)  # the model's float dtype, whatever its packed weights
    device = model.device
    # the output layer only from the first position any continuation needs: the vocabulary-wide logits of the
    # contexts' other positions are never read (transformers' `logits_to_keep`: the last n positions)
    start = min(len(ctx) for ctx, _ in batch) - 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
                       logits_to_keep=ids.shape[1] - start).logits
    out = []
    for b, (_, conts) in enumerate(batch):
        row = []
        for cont, positions in zip(conts, where[b], strict=True):
            lp = F.log_softmax(logits[b, [p - start for p in positions]], dim=-1)
            target = torch.tensor(cont, device=lp.device)
            greedy = bool((lp.argmax(dim=-1) == target).all())
            row.append((float(lp.gather(1, target[:, None]).sum()), greedy))
        out.append(row)
    return out


def score_requests(model, requests: list[tuple[list[int], list[int]]], *, pad_id: int,
                   batch_requests: int) -> list[tuple[float, bool]]:
    """Every request's (log-probability, greedy), in order: requests grouped by context, the longest packed
    sequences first (batches of similar length, little padding), about `batch_requests` requests per forward."""
    found = groups(requests)
    found.sort(key=lambda g: -packed_length(g[0], [requests[i][1] for i in g[1]]))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    batch: list[tuple[list[int], list[int]]] = []

    def flush():
        scored = score(model, [(ctx, [requests[i][1] for i in idx]) for ctx, idx in batch], pad_id)
        for (_, idx), row in zip(batch, scored, strict=True):
            for i, r in zip(idx, row, strict=True):
                results[i] = r
        batch.clear()

    count = 0
    for group in found:
        batch.append(group)
        count += len(group[1])
        if count >= batch_requests:
            flush()
            count = 0
    if batch:
        flush()
    return results
