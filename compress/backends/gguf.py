"""Method `gguf`: one GGUF file made by llama.cpp's own converter and quantizer (compress/llamacpp.py), for
llama.cpp, Ollama and LM Studio.

The file is of the variant's full-precision weights (the model, or its distilled student), optionally quantized
with an importance matrix observed on the calibration text (compress/backends/imatrix.py). Beside it go the HF
tokenizer (lm-eval and the perplexity windows tokenize with it, as for every other row), a model card and the
manifest, written last.

Self-check: llama.cpp and transformers (which dequantizes GGUF on load) read the finished file and must agree on the
self-check prompts (mean KL of their next-token distributions <= GGUF_ENGINE_MAX_KL): the file is readable by both,
and the figures measured through either engine describe the same weights. Beside it, the file's divergence from
the full-precision source is recorded (the quantization error, not a pass/fail check).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import model_validator

from compress.options import VariantBase, field_error

log = logging.getLogger("compress")

# llama.cpp file types a GGUF variant can ask for, with the nominal bits of their main weights. F32/F16/BF16 come
# straight from llama.cpp's converter; the others from its quantizer (llama_model_quantize), which picks the type
# of each tensor itself: a "_M"/"_S" mixture gives some tensors more bits, and a tensor whose row length is not a
# multiple of the type's block (256 for the K-quants) falls back to a 32-block type. The report lists the types the
# file really holds.
GGUF_TYPE_BITS: dict[str, int] = {
    "F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8, "Q6_K": 6, "Q5_K_M": 5, "Q5_K_S": 5, "Q5_1": 5, "Q5_0": 5,
    "Q4_K_M": 4, "Q4_K_S": 4, "Q4_1": 4, "Q4_0": 4, "Q3_K_L": 3, "Q3_K_M": 3, "Q3_K_S": 3, "Q2_K": 2,
}
GGUF_UNQUANTIZED = ("F32", "F16", "BF16")

# llama.cpp multiplies quantized weights with activations it rounds to 8 bits (Q8_0/Q8_K blocks) and keeps the KV
# cache in F16; transformers multiplies the same dequantized weights in fp32. So the two engines disagree a little,
# more as the file's bits fall (F16 < Q8_0 < Q4_K_M < Q4_0; each built variant's record keeps its own figure as
# `selfcheck.engines_kl_mean` in results.json), always far less than the file differs from its source. A file the
# engines read differently (tensor layout, RoPE, norms, vocabulary) disagrees by whole nats.
GGUF_ENGINE_MAX_KL = 0.25

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")


class GGUFVariant(VariantBase):
    """A llama.cpp file type (`gguf_type`), optionally with an importance matrix (`imatrix`, llama-imatrix's
    statistic: the mean squared activation of each input column of each weight)."""

    OFFLOADS: ClassVar[bool] = False  # llama.cpp's converter streams the weights from the files itself
    LIBRARY: ClassVar[str] = "llama_cpp_python"  # its version decides the file (part of the cache key)
    # import, distribution, how to install it (optional)
    REQUIRES: ClassVar[tuple[str, str, str]] = ("llama_cpp", "llama-cpp-python", "pip install -e '.[edge]'")

    KEY_HINTS: ClassVar[dict[str, str]] = {"bits": "choose the llama.cpp type with gguf_type"}

    method: Literal["gguf"]
    gguf_type: str | None = None
    imatrix: bool | None = None

    @model_validator(mode="after")
    def _rules(self) -> "GGUFVariant":
        if self.kv_cache is not None:
            raise field_error("kv_cache", "method 'gguf' keeps its engine's own KV cache; quantized KV caches go "
                                          "with method none and the llm-compressor methods")
        if self.gguf_type is None:
            raise field_error("gguf_type", f"method 'gguf' needs a llama.cpp file type, one of {list(GGUF_TYPE_BITS)}")
        if self.gguf_type.upper() not in GGUF_TYPE_BITS:
            raise field_error("gguf_type", f"expected one of {list(GGUF_TYPE_BITS)}, got {self.gguf_type!r}")
        self.gguf_type = self.gguf_type.upper()
        if self.imatrix and self.gguf_type in GGUF_UNQUANTIZED:
            raise field_error("imatrix", f"{self.gguf_type} is not quantized; an importance matrix changes nothing")
        if "ignore" in self.model_fields_set:
            raise field_error("ignore", "llama.cpp chooses each tensor's type itself (the file type's mixture); "
                                        "remove ignore")
        self._no_calibration_keys(" (or set imatrix: true)")
        return self

    @property
    def bits(self) -> int:
        return GGUF_TYPE_BITS[self.gguf_type]

    @property
    def calibrated(self) -> bool:
        return bool(self.imatrix)

    def checkpoint_bytes(self, config, dtype_bytes: int) -> float:
        """The file at its type (+15% for block scales and the mixture's larger types), plus the F16 file it is
        quantized from, which exists beside it at the peak."""
        from compress.planner import parameters

        n = parameters(config)
        return n * self.bits / 8 * 1.15 + (n * 2 if self.bits < 16 else 0)

    @property
    def label(self) -> str:
        return f"GGUF {self.gguf_type}{' imatrix' if self.imatrix else ''}" + self._suffix()

    def build(self, job) -> dict:
        return build(job, self)


def build(job, v: GGUFVariant) -> dict:
    """The GGUF file of `v`, self-checked, with tokenizer, model card and manifest, renamed into place when
    complete."""
    import torch

    from compress import checkpoint, gguf_file, llamacpp
    from compress.build import SelfCheckError, base_record, finish
    from compress.environment import available_cores, peak_memory_bytes, reset_peak_memory

    reset_peak_memory(job.device)
    cal = job.calibration(v)
    source = job.source
    model = None
    t0 = time.perf_counter()
    weights, distilled = job.weights(v)
    distill_seconds = time.perf_counter() - t0
    weights_folder = weights or job.local_source()
    imatrix_fn = None
    if v.imatrix:  # the importance matrix is observed on the HF model (loading it is not compress time)
        model, tok = job.load(weights)
    t1 = time.perf_counter()
    if v.imatrix:
        batch, cal = job.calibration_windows(cal, tok)
        imatrix_fn = _imatrix_for(model, batch)
    staging = checkpoint.new_staging_dir(job.output, v.name)
    try:
        gguf_name = f"model-{v.gguf_type}.gguf"
        log.info("stage compress: %s %s with llama.cpp (llama-cpp-python %s)", v.name, v.label, llamacpp.version())
        exported = llamacpp.export(weights_folder, staging / gguf_name, v.gguf_type, imatrix_fn=imatrix_fn,
                                   threads=available_cores(),
                                   tokenizer_from=Path(source.gguf) if source.gguf else None)
        compress_seconds = distill_seconds + time.perf_counter() - t1
        peak_bytes, peak_kind = peak_memory_bytes(job.device)
        summary = gguf_file.summarize(staging / gguf_name)
        for name in TOKENIZER_FILES:  # the HF tokenizer beside the file (`vllm serve FILE --tokenizer FOLDER`)
            if (weights_folder / name).is_file():
                shutil.copy2(weights_folder / name, staging / name)
        log.info("stage self-check: %s read back by llama.cpp and by transformers", gguf_name)
        check = selfcheck(staging, gguf_name, weights_folder, job.recipe.evaluation.selfcheck_prompts, model,
                          job.dtype)
        if not check["engines_kl_mean"] <= GGUF_ENGINE_MAX_KL:  # also catches NaN
            raise SelfCheckError(f"llama.cpp and transformers disagree on {gguf_name}: mean KL "
                                 f"{check['engines_kl_mean']:.4g} > {GGUF_ENGINE_MAX_KL:g} nats on the self-check "
                                 f"prompts (top-1 agreement {check['engines_top1_agreement']:.2f})")
        model = imatrix_fn = None  # free the full-precision model before the card is written
        version = llamacpp.version()
        record = base_record(job, v, bits=v.bits, group_size=None, symmetric=None, ignore=[])
        record.update({
            "saved_dtype": f"GGUF {v.gguf_type}", "weights_bytes": summary["tensor_bytes"],
            "compress_seconds": round(compress_seconds, 2), "compress_peak_memory_bytes": peak_bytes,
            "compress_peak_memory_kind": peak_kind, "selfcheck_max_abs_diff": check["engines_max_abs_diff"],
            "selfcheck_prompts": len(job.recipe.evaluation.selfcheck_prompts), "selfcheck": check,
            "calibration": cal, "cache_key": job.key, "kv_cache": None, "kv_in_checkpoint": False,
            "distill": distilled,
            "gguf": {"file": gguf_name, "type_requested": v.gguf_type, "imatrix": bool(v.imatrix),
                     "tokenizer": (f"from the source GGUF file {Path(source.gguf).name}" if source.gguf
                                   else "written by the converter from the HF tokenizer"),
                     "imatrix_tensors": exported["imatrix_tensors"], "intermediate": exported["intermediate"],
                     "converter": f"convert_hf_to_gguf.py of llama-cpp-python {version}",
                     "quantizer": (f"llama_model_quantize of llama-cpp-python {version}"
                                   if exported["intermediate"] else None),
                     **{k: summary[k] for k in ("file_bytes", "tensor_bytes", "params", "bits_per_weight", "types",
                                                "architecture", "n_layers", "n_kv_heads", "head_dim")}},
            "serve": f"llama-server -m {(job.dest / gguf_name).resolve()}", "environment": job.env,
        })
        finish(job, v, staging, record, cal)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.info("stage variant-done: %s %s, %.1f MB tensors (%s), %.1f s compress, llama.cpp vs transformers KL %.3g",
             v.name, v.label, summary["tensor_bytes"] / 1e6, gguf_file.types_text(summary), compress_seconds,
             check["engines_kl_mean"])
    return record


def _imatrix_for(model, windows: list[list[int]]):
    """The importance-matrix callback of llamacpp.export: given the F16 GGUF file, observe `model` on the
    calibration `windows` and key the statistic by that file's tensor names."""
    def imatrix_fn(f16_path: Path) -> dict:
        from compress import gguf_file
        from compress.backends.imatrix import gguf_tensor_names, importance_matrix

        summary = gguf_file.summarize(f16_path)
        names = gguf_tensor_names(model, summary["architecture"], set(summary["tensor_types"]))
        log.info("stage imatrix: mean x^2 of %d weight inputs over %d x %d calibration tokens", len(names),
                 len(windows), len(windows[0]))
        return importance_matrix(model, windows, names)

    return imatrix_fn


def selfcheck(folder: Path, gguf_name: str, weights_folder: Path, prompts: list[str], model, dtype) -> dict:
    """Logits on the self-check prompts from llama.cpp and from transformers for the same GGUF file, and from the
    full-precision source; returns the engines' agreement and the file's divergence from its source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress import llamacpp
    from compress.checkpoint import divergence

    tok = AutoTokenizer.from_pretrained(folder)
    ids = [tok(p)["input_ids"] for p in prompts]
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32).eval()
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(weights_folder, dtype=dtype).eval()
    engine = llamacpp.GGUFModel(folder / gguf_name, context=max(len(i) for i in ids) + 1)
    try:
        tokenizer_agrees = all(engine.llm.tokenize(p.encode(), add_bos=False, special=False)
                               == tok(p, add_special_tokens=False)["input_ids"] for p in prompts)
        with torch.no_grad():
            cpp = [engine.window_logits(i).float() for i in ids]
            hf = [loaded(torch.tensor([i])).logits[0].float() for i in ids]
            src = [model(torch.tensor([i], device=model.device)).logits[0].float().cpu() for i in ids]
    finally:
        engine.close()
        del loaded
    engines, vs_source = divergence(hf, cpp), divergence(src, cpp)
    return {"engines_kl_mean": engines["kl_mean"], "engines_top1_agreement": engines["top1_agreement"],
            "engines_max_abs_diff": engines["max_abs_diff"], "source_kl_mean": vs_source["kl_mean"],
            "source_top1_agreement": vs_source["top1_agreement"], "positions": engines["positions"],
            "tokenizer_agrees": tokenizer_agrees}
