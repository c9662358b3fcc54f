"""What identifies a variant's weights and a distilled student: the cache keys that decide "already built".

A variant's key hashes everything that decides its weights (model fingerprint, the variant's settings, calibration
source digest and window shape, compute device/dtype, library versions, self-check settings). A complete checkpoint
whose manifest carries the same key, and whose files still match their sha256, is reused: a second run is a no-op
and a killed run continues with the first variant it had not finished.
"""

from __future__ import annotations

import hashlib
import json
from compress import calibration as calib
from compress.load import Source
from compress.options import Calibration, VariantBase


def calibration_settings(recipe, v: VariantBase) -> dict | None:
    """The calibration a variant reads (of the recipe's `calibration:`): source, field, split, seed, its (samples,
    seq_len), and what its backend adds (llm-compressor: the pipeline); None if it reads none."""
    if not v.calibrated:
        return None
    cal = recipe.calibration
    samples, seq_len = cal.shape_for(v.default_calibration_shape())
    out = {"source": cal.source, "text_field": cal.text_field, "split": cal.split, "seed": cal.seed,
           "samples": v.samples or samples, "seq_len": v.seq_len or seq_len}
    return {**out, **v.calibration_extras()}  # part of the cache key: e.g. GPTQ's weights depend on the pipeline


def variant_versions(v: VariantBase, versions: dict, env: dict) -> dict:
    """The library versions that decide a variant's weights: the common ones, plus its backend's own library."""
    library = getattr(v, "LIBRARY", None)
    return {**versions, library: env.get(library)} if library else versions


def cache_key(recipe, v: VariantBase, source: Source, device: str, dtype, versions: dict) -> str:
    cal = calibration_settings(recipe, v)
    if cal is not None:
        cal = {**cal, "digest": calib.file_digest(recipe.calibration)}
    blob = {"model": source.fingerprint, "variant": v.key_fields(), "calibration": cal, "device": device,
            "dtype": str(dtype), "versions": versions,
            "selfcheck": recipe.evaluation.model_dump(include={"selfcheck_prompts", "selfcheck_max_abs_diff"})}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def student_key(v: VariantBase, source: Source, device: str, dtype, env: dict) -> str:
    """Identity of a distilled student: teacher, distill settings, training data, compute and library versions.
    Variants that differ only in what happens after distillation (quantization, KV) share the student."""
    data = calib.file_digest(Calibration(source=v.distill.data))
    blob = {"teacher": source.fingerprint, "distill": v.distill.model_dump(), "data": data, "device": device,
            "dtype": str(dtype), "versions": {k: env[k] for k in ("torch", "transformers")}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
