"""Token perplexity on WikiText-2 test, and divergence from the baseline on the very same tokens.

Perplexity uses the sliding-window recipe: windows of at most `context` tokens; each token is scored once, with
`context - stride` tokens of left context at the start of its window (stride = context means back-to-back windows
that share one token, so that every token is predicted from at least one token of context). Token perplexity depends on the tokenizer, so it compares variants of one model, not
models with each other.

Small quantization differences move perplexity by less than its noise. The mean KL divergence KL(P_base || P_q)
of the next-token distributions, token by token, is far more sensitive (the idea behind llama.cpp's
`--kl-divergence`), and top-1 agreement says how often greedy decoding would pick the same token.
"""

from __future__ import annotations

import math

from compress.checkpoint import kl_per_token


def window_spans(n_tokens: int, context: int, stride: int, max_windows: int | None = None) -> list[tuple]:
    """(begin, end, first_scored) for each window; tokens [first_scored, end) are scored in that window.

    Every token but the very first is scored exactly once, with at least one token of context: a window keeps
    `context - stride` tokens of overlap (at least 1) before the tokens it scores, and is at most `context` long.
    """
    spans, first = [], 1  # the text's first token has no context and is never scored
    while first < n_tokens and not (max_windows and len(spans) == max_windows):
        begin = min(first - 1, max(0, first - (context - stride)))
        end = min(begin + context, n_tokens)
        spans.append((begin, end, first))
        first = end
    return spans


def window_logits(model, window):
    """Logits [T, vocab] of `model` for one window (a [1, T] tensor of ids).

    `model` is a transformers model, or any engine with `window_logits(ids) -> tensor [T, vocab]` that starts each
    window from an empty cache (eval/engines/llamacpp.py: llama.cpp's logits, for GGUF rows)."""
    if hasattr(model, "window_logits"):
        return model.window_logits(window[0].tolist())
    return model(window).logits[0]


def evaluate_tokens(model, ids, *, context: int, stride: int, max_windows: int | None, reference=None) -> dict:
    """Perplexity of `model` on token ids (1-D tensor); with `reference` (the baseline model), also KL and top-1.

    Both models see identical windows, so the per-token KL values pair exactly, whichever engine computes each.
    """
    import torch
    from tqdm import tqdm

    nll_sum, count = 0.0, 0
    kl_values, agree = [], 0
    spans = window_spans(len(ids), context, stride, max_windows)
    with torch.no_grad():
        for begin, end, first in tqdm(spans, desc="perplexity" + (" + KL" if reference is not None else ""),
                                      unit="window", leave=False):
            window = ids[begin:end].unsqueeze(0).to(model.device)
            logp = torch.log_softmax(window_logits(model, window)[:-1].float(), dim=-1)
            targets = window[0, 1:].to(logp.device)
            scored = slice(first - begin - 1, end - begin - 1)  # logits at position t predict token t + 1
            nll_sum -= float(logp[scored].gather(1, targets[scored, None]).sum())
            count += scored.stop - scored.start
            if reference is not None:
                ref_logp = torch.log_softmax(window_logits(reference, window.to(reference.device))[:-1].float(),
                                             dim=-1)
                ref_logp, q_logp = ref_logp[scored].to(logp.device), logp[scored]
                kl_values.append(kl_per_token(ref_logp, q_logp).cpu())
                agree += int((ref_logp.argmax(-1) == q_logp.argmax(-1)).sum())
    out = {"value": math.exp(nll_sum / count), "tokens": count, "windows": len(spans), "context": context,
           "stride": stride}
    if reference is not None:
        kl = torch.cat(kl_values).double()
        out["kl"] = {"mean": float(kl.mean()), "stderr": float(kl.std() / math.sqrt(len(kl))) if len(kl) > 1 else 0.0,
                     "top1_agreement": agree / count, "tokens": count}
    return out
