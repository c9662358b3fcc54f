"""How much each serving unit of the model suffers from each candidate format, measured one unit at a time.

A unit is what vLLM multiplies as one matrix: it fuses q, k and v into `qkv_proj` and gate and up into
`gate_up_proj` (its Llama's `packed_modules_mapping`), and refuses a checkpoint whose fused shards have different
schemes ("...must have the same precision" in vllm/model_executor/layers/quantization/compressed_tensors/utils.py).
So per decoder layer a Llama has four units -- qkv, o, gate_up, down -- and with granularity "decoder-layer" one.

Two scores, both in nats per token:

- "kl" (measured): quantize one unit alone (round to nearest, the format's real grid), run the model from that
  unit's decoder layer on, and take the mean KL of its next-token distributions to the baseline's on calibration
  windows. The inputs of every decoder layer are recorded once on the baseline, so each of the units x formats
  measurements runs only the layers at and after its own, plus the head.
- "fisher" (a proxy, as NVIDIA ModelOpt's auto_quantize uses): one backward pass per window gives each weight's
  squared gradient of the loss, an estimate of the diagonal Fisher information F; the KL of a small change dW is
  then about 1/2 sum F dW^2, computed for every unit and format without running the model again. It is cheaper and
  blind to interactions inside a layer (the Hessian's off-diagonal terms); `compare` says how well it ranks.

Both assume damage adds up over units (compress/choose.py takes the sum); the chosen checkpoint is measured whole
afterwards, so that assumption is checked on held-out text, not trusted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("compress")

# vLLM 0.32's Llama packed_modules_mapping (vllm/model_executor/models/llama.py): the shards it serves as one matrix
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
GRANULARITIES = ("linear", "decoder-layer")


@dataclass(frozen=True)
class Unit:
    """One choice of the search: the Linear modules that get one format together, in decoder layer `layer`."""

    name: str  # e.g. "layers.3.qkv_proj" or "layers.3"
    layer: int
    modules: tuple[str, ...]  # full module names
    weights: int  # number of weights
    widths: tuple[int, ...]  # input width of each module (a group size must divide it)


def decoder_layers(model):
    """The model's decoder (embeddings, layers, final norm): the Llama-family layout transformers uses."""
    decoder = model.get_decoder()
    if not hasattr(decoder, "layers") or not hasattr(decoder, "norm"):
        raise ValueError(f"{type(model).__name__}: expected a decoder with .layers and .norm (a Llama-family model)")
    return decoder


def units(model, granularity: str, ignore=("lm_head",)) -> list[Unit]:
    """The model's units at `granularity`, in order, from its module tree."""
    import torch

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {list(GRANULARITIES)}, got {granularity!r}")
    layers = decoder_layers(model).layers
    prefix = {id(layer): i for i, layer in enumerate(layers)}
    full = {id(m): n for n, m in model.named_modules()}
    shard_of = {shard: fused for fused, shards in FUSED.items() for shard in shards}
    out: list[Unit] = []
    for layer in layers:
        i, base = prefix[id(layer)], full[id(layer)]
        groups: dict[str, list[tuple[str, torch.nn.Linear]]] = {}
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in ignore:
                short = name.rsplit(".", 1)[-1]
                key = f"layers.{i}" if granularity == "decoder-layer" else \
                    f"layers.{i}.{shard_of.get(short, short)}"
                groups.setdefault(key, []).append((f"{base}.{name}", m))
        for key, members in groups.items():
            out.append(Unit(key, i, tuple(n for n, _ in members), sum(m.weight.numel() for _, m in members),
                            tuple(m.in_features for _, m in members)))
    return out


def _kl_per_token(base_logp, logits):
    """Mean KL(p_base || p) over positions, in nats."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return float((base_logp.exp() * (base_logp - logp)).sum(-1).mean())


class LayerInputs:
    """The baseline's input to every decoder layer on each window (hidden states and the layer's keyword
    arguments: position embeddings, mask), recorded by forward pre-hooks in one pass, and its log-probabilities."""

    def __init__(self, model, windows):
        import torch

        self.model, self.decoder = model, decoder_layers(model)
        self.inputs: list[list[tuple]] = []  # [window][layer] -> (args, kwargs)
        self.base_logp = []
        record: list[tuple] = []
        hooks = [layer.register_forward_pre_hook(lambda mod, args, kwargs: record.append((args, kwargs)),
                                                 with_kwargs=True) for layer in self.decoder.layers]
        try:
            with torch.no_grad():
                for w in windows:
                    record.clear()
                    logits = model(torch.tensor([w]), use_cache=False).logits
                    self.inputs.append([(tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kw))
                                        for args, kw in record])
                    self.base_logp.append(torch.log_softmax(logits.float(), dim=-1))
        finally:
            for h in hooks:
                h.remove()

    def kl_from(self, layer: int) -> float:
        """Mean KL to the baseline of the model as it is now, run from decoder layer `layer` on."""
        import torch

        total, count = 0.0, 0
        with torch.no_grad():
            for per_layer, base in zip(self.inputs, self.base_logp):
                args, kwargs = per_layer[layer]
                h = args[0] if args else kwargs["hidden_states"]
                for i in range(layer, len(self.decoder.layers)):
                    args, kwargs = per_layer[i]
                    out = self.decoder.layers[i](h, *args[1:], **kwargs) if args else \
                        self.decoder.layers[i](**{**kwargs, "hidden_states": h})
                    h = out[0] if isinstance(out, tuple) else out
                logits = self.model.lm_head(self.decoder.norm(h))
                n = logits.shape[1]
                total += _kl_per_token(base, logits) * n
                count += n
        return total / count


def _swapped(modules: dict, unit: Unit, new_weights):
    """Context: the unit's weights replaced by `new_weights`, restored after."""
    import contextlib

    @contextlib.contextmanager
    def swap():
        old = [modules[n].weight.data for n in unit.modules]
        try:
            for n, w in zip(unit.modules, new_weights):
                modules[n].weight.data = w
            yield
        finally:
            for n, w in zip(unit.modules, old):
                modules[n].weight.data = w
    return swap()


def allowed(unit: Unit, group: int | None) -> bool:
    """Whether a format with weights in groups of `group` fits every module of the unit."""
    return group is None or all(width % group == 0 for width in unit.widths)


def _table(model, the_units: list[Unit], formats: list, quantize, damage) -> list[list[float | None]]:
    """costs[unit][format] = damage(unit, original weights, rounded weights); 0 for unquantized (a None name), None
    where the format's group does not divide the unit's widths."""
    modules = dict(model.named_modules())
    costs: list[list[float | None]] = []
    start = time.perf_counter()
    for k, unit in enumerate(the_units):
        row: list[float | None] = []
        originals = [modules[n].weight.detach() for n in unit.modules]
        for name, group in formats:
            if name is None:
                row.append(0.0)
            elif not allowed(unit, group):
                row.append(None)
            else:
                row.append(damage(unit, originals, quantize(originals, name, group)))
        costs.append(row)
        if k % 10 == 9:
            log.info("stage sensitivity: %d of %d units (%.0f s)", k + 1, len(the_units), time.perf_counter() - start)
    return costs


def measure_kl(model, windows, the_units: list[Unit], formats: list, quantize) -> list[list[float | None]]:
    """costs[unit][format]: the KL to the baseline with that unit alone in that format. `formats` are (name, group)
    pairs, `quantize(weights, name, group)` returns the unit's weights rounded (None name: unquantized, cost 0).
    A format whose group does not divide a unit's widths gets None (not allowed)."""
    modules = dict(model.named_modules())
    recorded = LayerInputs(model, windows)

    def kl(unit: Unit, originals, quantized) -> float:
        with _swapped(modules, unit, quantized):
            return max(0.0, recorded.kl_from(unit.layer))

    return _table(model, the_units, formats, quantize, kl)


def measure_fisher(model, windows, the_units: list[Unit], formats: list, quantize) -> list[list[float | None]]:
    """costs[unit][format] from the diagonal Fisher proxy: 1/2 sum F dW^2, F from squared loss gradients per window
    (scaled by the window's tokens: the gradient of a mean over T tokens is 1/T of their sum, so its square
    underestimates the per-token Fisher by about T when the tokens' gradients are uncorrelated)."""
    import torch

    modules = dict(model.named_modules())
    wanted = {n for u in the_units for n in u.modules}
    fisher = {n: torch.zeros_like(modules[n].weight, dtype=torch.float32) for n in wanted}
    params = {n: modules[n].weight for n in wanted}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for w in windows:
            ids = torch.tensor([w])
            loss = model(ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, list(params.values()))
            for n, g in zip(params, grads):
                fisher[n] += g.float() ** 2 * (len(w) - 1) / len(windows)
            del grads, loss  # else the next window's gradients are made while these are still held: twice the memory
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])

    def proxy(unit: Unit, originals, quantized) -> float:
        return float(sum(0.5 * (fisher[n] * (q.float() - o.float()) ** 2).sum()
                         for n, o, q in zip(unit.modules, originals, quantized)))

    return _table(model, the_units, formats, quantize, proxy)


SCORES = {"kl": measure_kl, "fisher": measure_fisher}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties): how well one score orders the pairs like the other."""
    import numpy as np

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for value in np.unique(x):  # ties share their mean rank
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])
