"""eval/shared_context.py: the packed layout on a hand-made batch, the scores against one sequence per request on
the tiny model, and lm-eval's tasks scored both ways (eval/accuracy.run_tasks) item for item."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import task_data
from eval.shared_context import groups, pack, score_requests


def test_the_branches_see_the_context_and_themselves_only():
    ids, pos, mask, where = pack([([5, 6, 7], [[8, 9, 4], [10]]), ([1, 2], [[3, 4]])], pad_id=0,
                                 dtype=torch.float32)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 0]]
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert allowed[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    # [10] has no branch: the last context position predicts it; 8 9 4 is predicted at 7, 8, 9
    assert where == [[[2, 3, 4], [2]], [[1, 2]]]
    assert groups([([1], [2]), ([3], [4]), ([1], [5])]) == [([1], [0, 2]), ([3], [1])]


def _one_sequence_each(model, requests):
    """What lm-eval's loop computes: each (context + continuation)[:-1] alone, log-softmax at the continuation."""
    out = []
    for ctx, cont in requests:
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont[:-1]])).logits[0, len(ctx) - 1:]
        lp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(cont)
        out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


@pytest.mark.parametrize("batch_requests", [1, 5, 64])
def test_every_request_scores_as_its_own_sequence(tiny_model, batch_requests):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rng = random.Random(0)
    requests = []
    for _ in range(12):  # questions of 1 to 4 choices, contexts and choices of different lengths
        ctx = [rng.randrange(3, 250) for _ in range(rng.randint(1, 30))]
        requests += [(ctx, [rng.randrange(3, 250) for _ in range(rng.randint(1, 6))]) for _ in range(rng.randint(1, 4))]
    rng.shuffle(requests)
    expected = _one_sequence_each(model, requests)
    got = score_requests(model, requests, pad_id=0, batch_requests=batch_requests)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)


def test_lm_eval_tasks_score_the_same_items_both_ways(tiny_model, tmp_path):
    """The whole path: lm-eval's requests for an ARC-style task, scored by lm-eval's loop and by the shared-context
    scorer, give the same items, value and stderr."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.accuracy import run_tasks

    data = task_data(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    runs = {s: run_tasks(model, tok, ["arc_easy"], data, num_fewshot=0, limit=None, batch_size=4, device="cpu",
                         scorer=s)["arc_easy"] for s in ("lm-eval", "shared-context")}
    a, b = runs["lm-eval"], runs["shared-context"]
    assert a["items"] == b["items"] and a["value"] == b["value"] and a["stderr"] == b["stderr"] and a["n"] == 24
    assert (a["scorer"], b["scorer"]) == ("lm-eval", "shared-context")
