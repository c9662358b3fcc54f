"""A vLLM plugin, installed into vLLM's own environment (eval/engines/vllm_env.py packs this file as the module
`compress_vllm_probe`, entry point group `vllm.general_plugins`): after vLLM has loaded a model and resolved each
layer's kernel, it prints what every linear layer really computes, in one line of the server's log:

    COMPRESS_VLLM_LAYERS {"dtype": "torch.bfloat16", "layers": [{"layers": "model.layers.*.mlp.down_proj", ...}]}

Why: vLLM names a kernel in its log, not the arithmetic. On a CPU with AMX tiles, vLLM 0.32 runs a compressed-tensors
W4A16 checkpoint as W4A8 (`layer.use_w4a8`, set in kernels/linear/mixed_precision/cpu.py from VLLM_CPU_INT4_W4A8,
the activation dtype and the CPU) while still logging `CPUWNA16LinearKernel`; the int8 kernel takes an AMX
(sgl-kernel) or a oneDNN path; a plain bf16 GEMM goes to sgl-kernel, oneDNN or torch by the weight's size. These are
the layers' own attributes after loading, read here, in the process that computes with them, so a served row can
say what it measured (eval/engines/vllm.compute_path turns them into words). It reads, never changes, anything.

Active only when COMPRESS_VLLM_PROBE=1 (compress sets it for the servers it starts); otherwise it does nothing, so
the environment serves exactly as a plain vLLM install. This file runs inside vLLM's environment: it imports vLLM,
and nothing of compress.
"""

import json
import os
import re

MARKER = "COMPRESS_VLLM_LAYERS"
ATTRIBUTES = ("use_w4a8", "isa_hint")  # set on the layer by vLLM's CPU kernels
CONFIG_ATTRIBUTES = ("is_static_input_scheme", "input_symmetric", "is_channelwise")  # of a scaled-mm kernel's config


def _callee(fn) -> str | None:
    """Which op a layer's `cpu_linear` closure calls (vLLM builds it as a lambda over the op it chose)."""
    names = getattr(getattr(fn, "__code__", None), "co_names", ())
    for op in ("weight_packed_linear_cpu", "onednn_mm", "linear"):
        if op in names:
            return op
    return None


def describe(name: str, module) -> dict | None:
    """The resolved facts of one linear layer (None for a module that is not one)."""
    method = getattr(module, "quant_method", None)
    if method is None or not hasattr(module, "weight") and not hasattr(module, "weight_packed") \
            and not hasattr(module, "scheme"):
        return None
    out = {"layer": name, "method": type(method).__name__}
    scheme = getattr(module, "scheme", None)
    if scheme is not None:
        out["scheme"] = type(scheme).__name__
    # the W8A8-int8 and WNA16 schemes keep theirs as `kernel`, the FP8 one as `fp8_linear` (vLLM 0.32)
    kernel = getattr(scheme, "kernel", None) or getattr(scheme, "fp8_linear", None) or getattr(method, "kernel", None)
    if kernel is not None:
        out["kernel"] = type(kernel).__name__
        linear = getattr(kernel, "linear_method", None)
        if linear is not None:
            out["kernel_method"] = getattr(linear, "__name__", str(linear))
        config = getattr(kernel, "config", None)
        for attr in CONFIG_ATTRIBUTES:
            if hasattr(config, attr):
                out[attr] = bool(getattr(config, attr))
        act = getattr(config, "act_type", None)
        if act is not None:
            out["act_type"] = str(act)
        scale = getattr(getattr(config, "activation_quant_key", None), "scale", None)  # an FP8 kernel's config
        if scale is not None:
            out["is_static_input_scheme"] = bool(getattr(scale, "static", False))
            shape = getattr(scale, "group_shape", None)
            if hasattr(shape, "is_per_tensor"):
                out["act_per_tensor"] = bool(shape.is_per_tensor())
    for attr in ATTRIBUTES:
        if hasattr(module, attr):
            value = getattr(module, attr)
            out[attr] = value if isinstance(value, (bool, int, str)) else str(value)
    callee = _callee(getattr(module, "cpu_linear", None))
    if callee is not None:
        out["cpu_linear"] = callee
    return out


def summarize(model, dtype) -> dict:
    """Every linear layer's facts, layers with the same facts merged under one name pattern (digits -> *)."""
    groups: dict[str, dict] = {}
    for name, module in model.named_modules():
        facts = describe(name, module)
        if facts is None:
            continue
        pattern = re.sub(r"\.\d+\.", ".*.", facts.pop("layer"))
        key = json.dumps({"layers": pattern, **facts}, sort_keys=True)
        if key not in groups:
            groups[key] = {"layers": pattern, **facts, "count": 0}
        groups[key]["count"] += 1
    return {"dtype": str(dtype), "layers": list(groups.values())}


def register() -> None:
    """vLLM calls this in each of its processes; the model is loaded in the engine's worker."""
    if os.environ.get("COMPRESS_VLLM_PROBE") != "1":
        return
    from vllm.model_executor.model_loader import base_loader, utils

    original = utils.process_weights_after_loading
    if getattr(original, "compress_probe", False):
        return

    def process_weights_after_loading(model, model_config, target_device):
        original(model, model_config, target_device)
        try:
            line = json.dumps(summarize(model, model_config.dtype), sort_keys=True)
        except Exception as e:  # a probe must never stop a server
            line = json.dumps({"error": f"{type(e).__name__}: {e}"})
        print(f"{MARKER} {line}", flush=True)

    process_weights_after_loading.compress_probe = True
    utils.process_weights_after_loading = process_weights_after_loading
    base_loader.process_weights_after_loading = process_weights_after_loading
