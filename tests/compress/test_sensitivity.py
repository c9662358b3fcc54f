"""Per-unit sensitivity on the tests' tiny Llama: the units vLLM fuses, an exact replay from any decoder layer, and
the measured KL against a whole-model forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.backends.llmcompressor import fake_quantize_weights
from compress.sensitivity import LayerInputs, measure_fisher, measure_kl, spearman, units

FORMATS = [("W4A16", 32), ("W8A16", None), ("W4A16", 96), (None, None)]  # 96 divides no width of the tiny model


@pytest.fixture(scope="module")
def model(tiny_model):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def windows(model):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, model.config.vocab_size, (24,), generator=g).tolist() for _ in range(3)]


def test_units_follow_vllms_fused_matrices(model):
    per_linear = units(model, "linear")
    assert [u.name for u in per_linear[:4]] == ["layers.0.qkv_proj", "layers.0.o_proj", "layers.0.gate_up_proj",
                                                "layers.0.down_proj"]
    assert per_linear[0].modules == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                     "model.layers.0.self_attn.v_proj")
    assert per_linear[3].widths == (128,) and len(per_linear) == 8
    per_layer = units(model, "decoder-layer")
    assert [u.name for u in per_layer] == ["layers.0", "layers.1"] and len(per_layer[0].modules) == 7
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert sum(u.weights for u in per_linear) == sum(u.weights for u in per_layer) == linears
    with pytest.raises(ValueError, match="granularity"):
        units(model, "head")


def test_replay_from_any_layer_is_the_baseline(model, windows):
    recorded = LayerInputs(model, windows)
    for layer in range(len(model.model.layers)):
        assert recorded.kl_from(layer) == pytest.approx(0.0, abs=1e-6)


def _whole_model_kl(model, windows, unit, scheme, group):
    """The same figure without the replay: every window through the whole model, that unit quantized."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        base = [torch.log_softmax(model(torch.tensor([w])).logits, -1) for w in windows]
        old = [modules[n].weight.data for n in unit.modules]
        for n, q in zip(unit.modules, fake_quantize_weights(old, scheme, group)):
            modules[n].weight.data = q
        try:
            new = [torch.log_softmax(model(torch.tensor([w])).logits, -1) for w in windows]
        finally:
            for n, w in zip(unit.modules, old):
                modules[n].weight.data = w
    kl = [(b.exp() * (b - n)).sum(-1).flatten() for b, n in zip(base, new)]
    return float(torch.cat(kl).mean())


def test_measured_kl(model, windows):
    the_units = units(model, "linear")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    costs = measure_kl(model, windows, the_units, FORMATS, fake_quantize_weights)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # weights restored
    for unit, (w4, w8, w4_96, none) in zip(the_units, costs):
        assert w4 > w8 > 0 and none == 0.0 and w4_96 is None  # coarser grid, more damage; 96 divides nothing
    for k in (0, 5):  # the replay from the unit's layer equals a whole-model forward
        assert costs[k][0] == pytest.approx(_whole_model_kl(model, windows, the_units[k], "W4A16", 32), rel=1e-4)


def test_fisher_proxy(model, windows):
    the_units = units(model, "linear")
    fisher = measure_fisher(model, windows, the_units, FORMATS, fake_quantize_weights)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert all(w4 > w8 > 0 and none == 0.0 and w4_96 is None for w4, w8, w4_96, none in fisher)
    kl = measure_kl(model, windows, the_units, FORMATS[:2], fake_quantize_weights)
    pairs = [(f[j], k[j]) for f, k in zip(fisher, kl) for j in range(2)]
    assert spearman([p[0] for p in pairs], [p[1] for p in pairs]) > 0.5  # it ranks like the measurement


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties share a rank
