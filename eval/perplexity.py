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
from pathlib import Path

from compress.checkpoint import kl_per_token, sha256_file


def ppl_file_digest(ev) -> str | None:
    """The first 16 hex digits of the evaluation's perplexity text's sha256 (None without perplexity): in the keys
    of every figure measured on it (eval/measure.py, eval/served.py)."""
    return sha256_file(Path(ev.data_dir).expanduser() / ev.perplexity.file)[:16] if ev.perplexity else None


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


def evaluate_tokens(model, ids, *, context: int, stride: int, max_windows: int | None, reference=None,
                    keep=None, prefix_windows: int | None = None) -> dict:
    """Perplexity of `model` on token ids (1-D tensor); with `reference`, also KL and top-1 against the baseline.

    `reference` is the baseline model (run on the same windows: two models in memory), or a `ReferenceFile` of the
    log-probabilities its own pass saved with `keep(logp)` (which receives each window's scored log-probabilities
    in order): then a variant is scored with one model in memory, and the figures are the same, since the stored
    numbers are the very float32 values the baseline computes on the same windows.

    `prefix_windows`: also the perplexity of the first that many windows alone (`out["prefix"]`), the very figure a
    pass with `max_windows=prefix_windows` gives (the same windows, summed in the same order): what the vLLM stage
    compares its served perplexity with (eval/agreement.py), taken here instead of in a second pass.
    """
    import torch
    from tqdm import tqdm

    nll_sum, count = 0.0, 0
    kl_values, agree = [], 0
    spans = window_spans(len(ids), context, stride, max_windows)
    prefix = None
    with torch.no_grad():
        desc = "perplexity" + (" + KL" if reference is not None else "")
        for i, (begin, end, first) in enumerate(tqdm(spans, desc=desc, unit="window", leave=False)):
            window = ids[begin:end].unsqueeze(0).to(model.device)
            logp = torch.log_softmax(window_logits(model, window)[:-1].float(), dim=-1)
            targets = window[0, 1:].to(logp.device)
            scored = slice(first - begin - 1, end - begin - 1)  # logits at position t predict token t + 1
            nll_sum -= float(logp[scored].gather(1, targets[scored, None]).sum())
            rows = scored.stop - scored.start
            if keep is not None:
                keep(logp[scored])
            if reference is not None:
                if isinstance(reference, ReferenceFile):
                    ref_logp = reference(count, count + rows).to(logp.device)
                else:  # a model, run on the same window
                    ref_logp = torch.log_softmax(window_logits(reference, window.to(reference.device))[:-1].float(),
                                                 dim=-1)[scored].to(logp.device)
                q_logp = logp[scored]
                kl_values.append(kl_per_token(ref_logp, q_logp).cpu())
                agree += int((ref_logp.argmax(-1) == q_logp.argmax(-1)).sum())
            count += rows
            if prefix_windows is not None and i + 1 == min(prefix_windows, len(spans)):
                prefix = {"value": math.exp(nll_sum / count), "tokens": count, "windows": i + 1, "context": context,
                          "stride": stride}
    out = {"value": math.exp(nll_sum / count), "tokens": count, "windows": len(spans), "context": context,
           "stride": stride}
    if prefix is not None:
        out["prefix"] = prefix
    if reference is not None:
        kl = torch.cat(kl_values).double()
        out["kl"] = {"mean": float(kl.mean()), "stderr": float(kl.std() / math.sqrt(len(kl))) if len(kl) > 1 else 0.0,
                     "top1_agreement": agree / count, "tokens": count}
    return out


class ReferenceFile:
    """The baseline's next-token log-probabilities at every scored position, float32, row after row, in one file:
    what every variant's KL and top-1 agreement are computed against (llama.cpp's `--kl-divergence-base` idea,
    without its 16-bit rounding, so the figures equal those of both models loaded side by side).

    Size: scored tokens x vocabulary x 4 bytes (the lab: 20,440 x 49,152 x 4 = 4.0 GB; a 128k-vocabulary model at
    the same windows: 10.5 GB). It is written once by the baseline's pass and read by every variant a window at a
    time (memory-mapped), so no process holds the baseline and a variant at once, and a variant measured on another
    machine of a cluster needs only this file on the shared filesystem, not the baseline's weights in its memory.

    The file name carries the baseline's evaluation key (same checkpoint, same text, same windows), and it is
    complete when its size is rows x vocab x 4 (it is written under a temporary name and renamed).
    """

    def __init__(self, path):
        from pathlib import Path

        self.path = Path(path)
        self._mm = None

    def complete(self, rows: int) -> bool:
        try:
            size = self.path.stat().st_size
        except OSError:
            return False
        return size > 0 and size % (rows * 4) == 0

    def open(self, rows: int) -> "ReferenceFile":
        import numpy as np

        vocab = self.path.stat().st_size // (rows * 4)
        self._mm = np.memmap(self.path, dtype=np.float32, mode="r", shape=(rows, vocab))
        return self

    def __call__(self, begin: int, end: int):
        import numpy as np
        import torch

        return torch.from_numpy(np.array(self._mm[begin:end]))

    def close(self) -> None:
        self._mm = None


def scored_rows(n_tokens: int, context: int, stride: int, max_windows: int | None) -> int:
    """How many positions `evaluate_tokens` scores (the rows of a ReferenceFile)."""
    return sum(end - first for _, end, first in window_spans(n_tokens, context, stride, max_windows))
