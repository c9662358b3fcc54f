"""Depth pruning: score each decoder layer by block influence, remove the least influential ones.

Block influence of layer i (ShortGPT): BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}), where x_i is the hidden
state entering the layer and x_{i+1} the one leaving it. A layer that barely rotates the residual stream has BI near
0, and a layer that is an exact identity has BI 0: removing it changes nothing.
"""

from __future__ import annotations

import copy

import torch


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (Llama-family layout: model.model.layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no model.layers ModuleList; depth pruning supports "
                         f"Llama-family decoder stacks")
    return layers


@torch.no_grad()
def block_influence(model, windows: list[list[int]], batch_size: int = 4) -> list[float]:
    """BI of every decoder layer, averaged over all tokens of `windows` (lists of token ids)."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    captured: dict[int, torch.Tensor] = {}

    def hook(index):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (batch, tokens)
            captured[index] = (1 - cos).double().sum()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        for start in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[start:start + batch_size], device=device)
            model(ids, use_cache=False)
            for i in range(len(layers)):
                sums[i] += captured[i]
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / count).tolist()


def layers_to_drop(scores: list[float], keep: int) -> list[int]:
    """Indices of the len(scores) - keep layers with the lowest block influence, in ascending index order."""
    if not 0 < keep <= len(scores):
        raise ValueError(f"cannot keep {keep} of {len(scores)} layers")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:len(scores) - keep])


def prune_layers(teacher, drop: list[int]):
    """A copy of `teacher` without the decoder layers in `drop`: same class, config with fewer layers, each kept
    layer's attention renumbered so the KV cache indexes it correctly. The teacher is left untouched."""
    n = len(decoder_layers(teacher))
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the teacher has layers 0..{n - 1}")
    if len(set(drop)) >= n:
        raise ValueError("cannot drop every layer")
    student = copy.deepcopy(teacher)
    kept = [layer for i, layer in enumerate(decoder_layers(student)) if i not in set(drop)]
    student.model.layers = torch.nn.ModuleList(kept)
    for new_index, layer in enumerate(kept):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    config = student.config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in set(drop)]
    return student
