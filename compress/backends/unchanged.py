"""Methods `baseline` and `none`: the model's own weights, saved as they are.

`baseline` is the reference row of every table (added when a recipe has none). `none` keeps the weights too but
changes what comes with them: a KV-cache format (fp8 scales are calibrated and written by llm-compressor, so such a
variant is built by compress/backends/llmcompressor.py; integer formats are applied at evaluation) or a distilled
student.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from compress.backends import llmcompressor
from compress.backends.llmcompressor import PIPELINE
from compress.options import REFERENCE, VariantBase, field_error


class UnchangedVariant(VariantBase):
    KEY_HINTS: ClassVar[dict[str, str]] = {"*": "it takes no weight quantization settings"}

    method: Literal["baseline", "none"]

    @property
    def is_reference(self) -> bool:
        return self.method == REFERENCE

    @model_validator(mode="after")
    def _rules(self) -> "UnchangedVariant":
        if self.is_reference:
            extra = [k for k in ("kv_cache", "distill") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"method 'baseline' takes no weight quantization settings, remove {extra} (for the "
                                 f"baseline's weights with a quantized KV cache or a distilled student use method "
                                 f"'none')")
        elif self.kv_cache is None and self.distill is None:
            raise field_error("kv_cache", "method 'none' leaves the weights alone, so it needs a kv_cache or "
                                          "distill setting (otherwise it is the baseline)")
        self._no_calibration_keys()
        return self

    @property
    def label(self) -> str:
        return "unquantized" + self._suffix()

    def calibration_extras(self) -> dict:
        return {"pipeline": PIPELINE} if self.uses_llmcompressor else {}  # fp8 KV scales: llm-compressor

    def build(self, job) -> dict:
        if self.uses_llmcompressor:
            return llmcompressor.build(job, self)
        from compress.build import transformers_checkpoint

        return transformers_checkpoint(job, self, lambda job, v, model, tok, weights, cal: (model, cal),
                                       quantized=False)
