"""Perplexity, KL and top-1 against independent computations on a tiny random model."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.perplexity import evaluate_tokens, window_spans


@pytest.fixture(scope="module")
def models(tiny_model):
    a = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.02, alpha=1.0)
    return a, b


def _ids(n=200):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(0))


def test_window_spans_score_every_token_once():
    for n, ctx, stride in ((200, 64, 64), (200, 64, 16), (65, 64, 64), (10, 64, 32)):
        scored = [t for _, end, first in window_spans(n, ctx, stride) for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - begin <= ctx for begin, end, _ in window_spans(n, ctx, stride))
    assert len(window_spans(200, 64, 64, max_windows=2)) == 2


def _plain_ppl(model, ids, windows):
    """Perplexity from a plain loop over hand-written (begin, end, first_scored) windows."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in windows:
            logits = model(ids[None, begin:end]).logits[0]
            for t in range(first, end):
                nll -= float(torch.log_softmax(logits[t - begin - 1], -1)[ids[t]])
                count += 1
    return math.exp(nll / count), count


def test_perplexity_matches_a_plain_loop(models):
    model, _ = models
    ids = _ids()
    got = evaluate_tokens(model, ids, context=200, stride=200, max_windows=None)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:])
    assert got["tokens"] == 199 and got["value"] == pytest.approx(math.exp(float(ce)), rel=1e-5)

    got = evaluate_tokens(model, ids, context=50, stride=50, max_windows=None)
    want, count = _plain_ppl(model, ids, [(0, 50, 1), (49, 99, 50), (98, 148, 99), (147, 197, 148),
                                          (196, 200, 197)])
    assert got["tokens"] == count == 199 and got["value"] == pytest.approx(want, rel=1e-5)

    got = evaluate_tokens(model, ids, context=64, stride=32, max_windows=2)
    want, count = _plain_ppl(model, ids, [(0, 64, 1), (32, 96, 64)])
    assert got["tokens"] == count and got["windows"] == 2 and got["value"] == pytest.approx(want, rel=1e-5)


def test_kl_zero_against_itself_and_matches_hand_computation(models):
    a, b = models
    ids = _ids(120)
    same = evaluate_tokens(a, ids, context=60, stride=60, max_windows=None, reference=a)
    assert same["kl"]["mean"] == pytest.approx(0.0, abs=1e-7) and same["kl"]["top1_agreement"] == 1.0

    got = evaluate_tokens(b, ids, context=120, stride=120, max_windows=None, reference=a)
    with torch.no_grad():
        p = torch.log_softmax(a(ids[None]).logits[0, :-1], -1)
        q = torch.log_softmax(b(ids[None]).logits[0, :-1], -1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert got["kl"]["mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert got["kl"]["top1_agreement"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()))
    assert got["kl"]["mean"] > 0


def test_reference_file_gives_the_figures_of_both_models_loaded(models, tmp_path):
    """The baseline's pass saves its log-probabilities; a variant scored against that file gets exactly (bit for
    bit) the KL and top-1 of scoring it beside the loaded baseline, with one model in memory."""
    from eval.perplexity import ReferenceFile, scored_rows

    a, b = models
    ids = _ids(230)
    path = tmp_path / "ref.f32"
    with open(path, "wb") as f:
        base = evaluate_tokens(a, ids, context=64, stride=48, max_windows=4,
                               keep=lambda logp: f.write(logp.contiguous().numpy().tobytes()))
    rows = scored_rows(len(ids), 64, 48, 4)
    assert rows == base["tokens"] and path.stat().st_size == rows * a.config.vocab_size * 4
    ref = ReferenceFile(path)
    assert ref.complete(rows) and not ReferenceFile(tmp_path / "missing").complete(rows)
    from_file = evaluate_tokens(b, ids, context=64, stride=48, max_windows=4, reference=ref.open(rows))
    side_by_side = evaluate_tokens(b, ids, context=64, stride=48, max_windows=4, reference=a)
    assert from_file == side_by_side and from_file["kl"]["mean"] > 0
