"""The importance matrix of llama.cpp's calibrated quantization, observed with transformers.

llama.cpp's quantizer rounds each block of weights to minimise a weighted squared error. Without calibration every
weight counts the same; with an importance matrix ("imatrix"), weight j of a row counts in proportion to how large
input j usually is, because a rounding error on a weight that multiplies a large activation moves the output more.
`llama-imatrix` measures exactly one number per input column of each matrix: the mean of x_j^2 over the
calibration tokens (its file stores sums and counts; llama-quantize divides them). That is what
`importance_matrix` computes here, with forward hooks on every nn.Linear of the full-precision model: the same
statistic, from the same text the GPTQ/AWQ variants calibrate on, without a separate llama.cpp binary.

The keys are GGUF tensor names ("blk.0.attn_q.weight"), mapped by gguf-py's TensorNameMap, the table llama.cpp's
own converter uses. The converter permutes the rows of attn_q/attn_k (output channels) for its RoPE layout; the
importance is per input column, so the permutation does not touch it. When the output matrix is tied to the
token embedding (SmolLM2), llama.cpp multiplies by token_embd.weight at the output, so lm_head's statistic is
stored under that name, as llama-imatrix does.
"""

from __future__ import annotations


def gguf_tensor_names(model, architecture: str, gguf_names: set[str]) -> dict[str, str]:
    """HF Linear module name -> the GGUF tensor it becomes, for the tensors that exist in the GGUF file.

    `architecture` is the file's general.architecture ("llama"); `gguf_names` the file's tensor names (a module
    the converter dropped or renamed unexpectedly is left out rather than guessed).
    """
    import gguf
    import torch

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    n_blocks = model.config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(arch, n_blocks)
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        mapped = name_map.get_name(name + ".weight", try_suffixes=(".weight",))
        if mapped is None:
            continue
        if mapped not in gguf_names and mapped == "output.weight" and "token_embd.weight" in gguf_names:
            mapped = "token_embd.weight"  # tied output: llama.cpp multiplies by the embedding table
        if mapped in gguf_names:
            out[name] = mapped
    return out


def importance_matrix(model, windows: list[list[int]], names: dict[str, str]) -> dict[str, "object"]:
    """{GGUF tensor name: float32 numpy array of in_features} = mean over calibration tokens of x_j^2, where x is
    the input of that Linear. `windows` are token id lists (one forward each); `names` from `gguf_tensor_names`.
    """
    import numpy as np
    import torch

    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def pre(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return pre

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for w in windows:
                model(torch.tensor([w], device=model.device))
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in counts]
    if missing:
        raise RuntimeError(f"importance matrix: no activations reached {missing[:3]} (of {len(missing)})")
    return {names[n]: (sums[n] / counts[n]).float().cpu().numpy().astype(np.float32) for n in names}
