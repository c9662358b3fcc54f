"""Method `auto`: the smallest checkpoint that meets a target, one format per serving unit, in one build.

    - {name: auto-4.5, method: auto, formats: [W4A16, W8A16, unquantized], target: {effective_bits: 4.5}}

Three steps, each in its own module:

1. Sensitivity (compress/sensitivity.py): for every unit (what vLLM serves as one matrix: qkv, o, gate_up, down of
   each decoder layer; or whole decoder layers) and every candidate format, the damage of that unit alone in that
   format, measured as KL to the baseline on calibration windows (or the Fisher proxy). Cached under its own key
   (model, windows, formats, granularity, score): a second target reads it back instead of measuring again.
2. The choice (compress/choose.py): the exact multiple-choice knapsack over sizes, which gives the whole
   size-damage frontier at once; the target is a point on it.
3. The checkpoint (compress/backends/llmcompressor.compress_mixed): one compressed-tensors checkpoint with a config
   group per format, calibrated by one algorithm (GPTQ by default) on the run's calibration windows.

The prediction (summed damage) is only that: the evaluation then measures the checkpoint like every variant, on
held-out text the search never saw, and the record keeps both.

Candidates are weight-only formats (16-bit activations) that the algorithm writes, plus `unquantized`: a format
that also quantizes activations damages a layer through its inputs, which the one-unit-at-a-time weight rounding
does not see. A format whose groups do not divide a unit's widths is dropped from that unit's choices (logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from compress import choose, sensitivity
from compress.backends.llmcompressor import (METHODS, PIPELINE, SCHEMES, compress_mixed, fake_quantize_weights,
                                            meta_model, release_session)
from compress.options import InputError, VariantBase, _Strict, field_error

log = logging.getLogger("compress")

UNQUANTIZED = "unquantized"


class Target(_Strict):
    """Exactly one of: average stored bits per quantizable weight (scales included), the checkpoint's size, the
    predicted mean per-token KL to the baseline (nats), or the measured recovery of the mean task score."""

    effective_bits: float | None = Field(None, gt=0)  # mean stored bits per weight of the units, scales included
    max_size_gb: float | None = Field(None, gt=0)  # the checkpoint's weights in GB (1e9 bytes), embeddings included
    max_kl: float | None = Field(None, gt=0)  # the summed predicted KL of the choice (nats per token), at most
    # the mean task score as % of the baseline's (evaluation.tasks), at least: known only by measuring, so the run
    # searches for it (verify strict, compress/verify.py), from the smallest choice up
    min_recovery: float | None = Field(None, gt=0, le=100)

    @model_validator(mode="after")
    def _exactly_one(self) -> "Target":
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of {list(type(self).model_fields)}, got {given or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self.model_dump().items() if v is not None)

    @property
    def value(self) -> float:
        return getattr(self, self.kind)


class Analysis(_Strict):
    """The sensitivity pass: how many calibration windows of how many tokens, and which score."""

    windows: int = Field(4, gt=0)  # calibration windows the damage is measured on (the calibration section's text)
    seq_len: int = Field(256, gt=1)  # tokens per window
    # kl: measured, one unit quantized at a time; fisher: squared-gradient proxy (one backward pass per window)
    score: Literal["kl", "fisher"] = "kl"


class AutoVariant(VariantBase):
    NOT_KEYED: ClassVar[dict[str, str]] = {
        "verify": "decides whether a missed target is built again at another frontier point, not this checkpoint",
        "max_steps": "bounds how many other points verify: strict builds, not this checkpoint"}

    method: Literal["auto"]
    # the candidates per unit: weight-only schemes the algorithm writes (compress formats), and `unquantized`
    formats: list[str] = Field(default_factory=lambda: ["W4A16", "W8A16", UNQUANTIZED], min_length=2)
    group_size: int | None = 64  # for the integer formats (fp4 formats fix their own groups)
    target: Target  # what the choice must meet: exactly one of its keys
    # linear: one format per unit vLLM serves as one matrix (qkv, o, gate_up, down); decoder-layer: one per layer
    granularity: Literal["linear", "decoder-layer"] = "linear"
    algorithm: str = "gptq"  # the method (METHODS) that calibrates every format group of the checkpoint
    analysis: Analysis = Field(default_factory=Analysis)  # the sensitivity pass
    # report: a max_kl target that the KL measured on held-out text misses is a row that says by how much; strict:
    # the run then builds the frontier point that the miss points to, and measures it, until the target is met
    # (compress/verify.py); a min_recovery target is always searched so
    verify: Literal["report", "strict"] = "report"
    max_steps: int = Field(4, gt=0)  # verify strict: at most this many builds after the first
    # the predicted KL the choice stays within: set by verify strict after a measured miss (the run keeps it in
    # OUTPUT/.verify/<name>.json); a recipe may set it to start the search there
    predicted_cap: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _rules(self) -> "AutoVariant":
        if self.algorithm not in METHODS:
            raise field_error("algorithm", f"expected one of {list(METHODS)}, got {self.algorithm!r}")
        writes = METHODS[self.algorithm].schemes
        for name in self.formats:
            if name == UNQUANTIZED:
                continue
            if name not in SCHEMES:
                raise field_error("formats", f"{name!r} is not a scheme; expected some of {list(SCHEMES)} or "
                                             f"{UNQUANTIZED!r}")
            if not SCHEMES[name].weight_only:
                only = [s for s in SCHEMES if SCHEMES[s].weight_only]
                raise field_error("formats", f"{name!r} also quantizes activations, which a one-layer weight "
                                             f"sensitivity does not measure; expected weight-only formats {only} "
                                             f"or {UNQUANTIZED!r}")
            if name not in writes:
                raise field_error("formats", f"algorithm {self.algorithm!r} cannot write {name!r}; it writes "
                                             f"{list(writes)}")
        if len(set(self.formats)) != len(self.formats):
            raise field_error("formats", f"each format once, got {self.formats}")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size & (self.group_size - 1)):
            raise field_error("group_size", f"expected a power of two such as 32, 64 or 128, got {self.group_size}")
        if self.target.kind == "min_recovery":
            if "verify" in self.model_fields_set and self.verify != "strict":
                raise field_error("verify", "a min_recovery target is met by measuring the tasks, which is what "
                                            "strict does: expected verify: strict (the default for this target)")
            self.verify = "strict"
        elif self.target.kind != "max_kl":
            if self.verify == "strict":
                raise field_error("verify", f"strict checks a max_kl or min_recovery target against what is "
                                            f"measured on held-out data; a {self.target.kind} target is met by "
                                            f"construction (its size is exact): expected verify: report")
            if self.predicted_cap is not None:
                raise field_error("predicted_cap", f"caps the predicted KL of a max_kl or min_recovery target's "
                                                   f"choice; this target is {self.target.kind}")
        return self

    # --- what the run asks of every variant

    @property
    def label(self) -> str:
        t = self.target
        cap = f", predicted KL <= {self.predicted_cap:.4g}" if self.predicted_cap is not None else ""
        return f"auto {t.kind}={t.value:g} ({'/'.join(map(self._format_label, self.formats))} per " \
               f"{self.granularity}{cap}){self._suffix()}"

    @property
    def calibrated(self) -> bool:
        return True

    @property
    def uses_llmcompressor(self) -> bool:
        return True

    @property
    def requires_dtype(self) -> str | None:
        return next((SCHEMES[f].model_dtype for f in self.formats if f in SCHEMES and SCHEMES[f].model_dtype), None)

    def calibration_extras(self) -> dict:
        return {"pipeline": PIPELINE}

    def default_calibration_shape(self) -> tuple[int, int] | None:
        return METHODS[self.algorithm].shape

    def weight_format(self) -> tuple[int, int | None]:
        """The largest candidate: the size estimates are upper bounds."""
        bits = [16 if f == UNQUANTIZED else SCHEMES[f].stored_bits for f in self.formats]
        return max(bits), (self.group_size if max(bits) < 16 else None)

    @property
    def needs_tasks(self) -> bool:
        return self.target.kind == "min_recovery"

    def config_errors(self, config, dtype_bits: int) -> list[tuple[str, str]]:
        """A size target no choice reaches, from the config alone (checked before any build)."""
        kind = self.target.kind
        if kind in ("max_kl", "min_recovery"):  # known only after the sensitivity pass, or by measuring
            return []
        model = meta_model(config)
        the_units = sensitivity.units(model, self.granularity, tuple(self.ignore))
        low = size_table(self, the_units, dtype_bits).min(axis=1).sum()
        weights = sum(u.weights for u in the_units)
        lo = low * 8 / weights if kind == "effective_bits" else (low + _other_bytes(model, weights, dtype_bits)) / 1e9
        if self.target.value < lo:
            return [("target", f"{kind} {self.target.value:g} is below the smallest choice, {lo:.4g} (every unit "
                               f"in its smallest format); expected at least that")]
        return []

    def analysis_bytes(self, config, dtype_bytes: int) -> int:
        """The sensitivity pass's own memory beside the model (compress/sensitivity.py), from the config.

        kl: every decoder layer's recorded input on every window (model dtype) and the baseline's log-probabilities
        (fp32, tokens x vocabulary), plus one window's logits, log-probabilities and their product during a replay.
        fisher: a squared-gradient accumulator (fp32) and a gradient (model dtype) per unit weight, plus one window's
        activations kept for the backward pass (about a dozen hidden-wide and four intermediate-wide tensors per
        layer) and its logits, log-probabilities and their gradient."""
        a = self.analysis
        vocab, hidden, layers = config.vocab_size, config.hidden_size, config.num_hidden_layers
        window_logits = a.seq_len * vocab * 4 * 3
        if a.score == "kl":
            return (layers * a.windows * a.seq_len * hidden * dtype_bytes + a.windows * a.seq_len * vocab * 4
                    + window_logits)
        from compress.planner import parameters

        unit_weights = parameters(config) - 2 * vocab * hidden  # every Linear of the decoder layers, roughly
        activations = layers * a.seq_len * (12 * hidden + 4 * config.intermediate_size) * dtype_bytes
        return unit_weights * (4 + dtype_bytes) + activations + window_logits

    def build(self, job) -> dict:
        from compress.build import transformers_checkpoint

        facts: dict = {}  # filled by the compress step, written into the record
        return transformers_checkpoint(job, self, lambda *a: _compress_step(facts, *a), quantized=True,
                                       after_save=release_session, extra={"auto": facts})

    def _format_label(self, name: str) -> str:
        if name == UNQUANTIZED:
            return name
        s = SCHEMES[name]
        return f"{name.replace('-asym', '')}-g{self.group_size}{'' if s.symmetric else '-asym'}" \
            if s.groupable and self.group_size else name

    def format_group(self, name: str) -> int | None:
        """The group size `name` quantizes with in this variant (None: per output channel, or unquantized)."""
        if name == UNQUANTIZED:
            return None
        s = SCHEMES[name]
        return self.group_size if s.groupable else s.group


def size_table(v: AutoVariant, units, dtype_bits: int):
    """bytes[unit][format], inf where the format's groups do not divide the unit's widths."""
    import numpy as np

    out = np.full((len(units), len(v.formats)), np.inf)
    for i, u in enumerate(units):
        for j, name in enumerate(v.formats):
            if name == UNQUANTIZED:
                out[i, j] = u.weights * dtype_bits / 8
            elif sensitivity.allowed(u, v.format_group(name)):
                out[i, j] = u.weights * SCHEMES[name].bits_per_weight(v.format_group(name), dtype_bits) / 8
    return out


def _other_bytes(model, unit_weights: int, dtype_bits: int) -> float:
    """What the checkpoint holds besides the units' weights (embeddings, norms, lm_head), at the model's dtype."""
    return (sum(p.numel() for p in model.parameters()) - unit_weights) * dtype_bits / 8


def sensitivity_key(job, v: AutoVariant, digest: str) -> str:
    """The sensitivity table's identity: what it measured, not the target (a new target reuses it)."""
    blob = {"model": job.source.fingerprint, "dtype": str(job.dtype), "device": job.device, "windows": digest,
            "formats": [(f, v.format_group(f)) for f in v.formats], "granularity": v.granularity,
            "score": v.analysis.score, "ignore": v.ignore,
            "versions": {k: job.env.get(k) for k in ("torch", "transformers", "compressed_tensors")}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def _sensitivities(job, v: AutoVariant, model, tok, cal: dict, the_units) -> tuple[list, dict]:
    """costs[unit][format] (None: not allowed) and how they were obtained, read from the cache when measured before."""
    a = v.analysis
    windows, meta = job.calibration_windows({**cal, "samples": a.windows, "seq_len": a.seq_len}, tok)
    key = sensitivity_key(job, v, meta["windows_digest"])
    path = job.output / ".sensitivity" / f"{key}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        log.info("stage sensitivity: %s read from %s (measured in %.0f s)", v.name, path, saved["seconds"])
        return saved["costs"], {**saved["how"], "cached": True}
    formats = [(None if f == UNQUANTIZED else f, v.format_group(f)) for f in v.formats]
    log.info("stage sensitivity: %d units x %d formats, %s on %d x %d calibration tokens", len(the_units),
             len(formats), a.score, a.windows, a.seq_len)
    t0 = time.perf_counter()
    costs = sensitivity.SCORES[a.score](model, windows, the_units, formats, fake_quantize_weights)
    how = {"score": a.score, "windows": a.windows, "seq_len": a.seq_len, "tokens": meta["tokens"],
           "windows_digest": meta["windows_digest"], "key": key, "seconds": round(time.perf_counter() - t0, 2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"costs": costs, "how": how, "seconds": how["seconds"],
                               "units": [u.name for u in the_units], "formats": v.formats}))
    tmp.replace(path)  # whole or absent
    return costs, {**how, "cached": False}


def choice_for(v: AutoVariant, frontier: choose.Frontier, weights: int, other_bytes: float):
    """The target's point of the frontier, or an InputError naming the closest reachable value."""
    t = v.target
    if t.kind in ("max_kl", "min_recovery"):
        # max_kl: the smallest choice predicted within it; min_recovery, which only a measurement says: the smallest
        # choice of all, where compress/verify.py's search starts; predicted_cap: where that search is now
        cap, what = (v.predicted_cap, "predicted_cap") if v.predicted_cap is not None else \
            (t.value, "target.max_kl") if t.kind == "max_kl" else (math.inf, "")
        picks = frontier.smallest_within(cap)
        if picks is None:
            raise InputError(f"variant {v.name}: {what} {cap:g} is below the least predicted KL of any "
                             f"choice, {frontier.min_cost:.4g} (every unit in its best format); expected at least "
                             f"that")
        return picks
    capacity = t.value * weights / 8 if t.kind == "effective_bits" else t.value * 1e9 - other_bytes
    picks = frontier.picks(capacity)
    if picks is None:
        low = (frontier.min_bytes * 8 / weights if t.kind == "effective_bits" else
               (frontier.min_bytes + other_bytes) / 1e9)
        raise InputError(f"variant {v.name}: target.{t.kind} {t.value:g} is below the smallest choice, {low:.4g}; "
                         f"expected at least that")
    return picks


def _compress_step(facts: dict, job, v: AutoVariant, model, tok, weights, cal):
    """Measure (or read) the sensitivities, choose, and quantize the model with one config group per format."""
    import numpy as np

    dtype_bits = job.dtype.itemsize * 8
    the_units = sensitivity.units(model, v.granularity, tuple(v.ignore))
    t0 = time.perf_counter()
    costs, how = _sensitivities(job, v, model, tok, cal, the_units)
    analysis_seconds = time.perf_counter() - t0
    sizes = size_table(v, the_units, dtype_bits)
    cost_table = np.array([[math.inf if c is None else c for c in row] for row in costs])
    dropped = [(u.name, f) for u, row in zip(the_units, cost_table) for f, c in zip(v.formats, row) if c == math.inf]
    if dropped:
        log.info("stage choose: %d unit x format pairs not allowed (groups do not divide), e.g. %s", len(dropped),
                 dropped[0])
    frontier = choose.solve(sizes, cost_table)
    weights_total = sum(u.weights for u in the_units)
    other = _other_bytes(model, weights_total, dtype_bits)
    picks = choice_for(v, frontier, weights_total, other)
    chosen_bytes = frontier.size_of(picks)
    log.info("stage choose: %s: %.3f bits per weight, predicted %s %.4g (frontier of %d points, gap %.3g bytes)",
             v.name, chosen_bytes * 8 / weights_total, how["score"], frontier.cost_of(picks),
             len(frontier.points()), frontier.gap_bytes)

    assignment: dict[str, list[str]] = {f: [] for f in v.formats if f != UNQUANTIZED}
    kept = []
    for u, j in zip(the_units, picks):
        (kept if v.formats[j] == UNQUANTIZED else assignment[v.formats[j]]).extend(u.modules)
    if not any(assignment.values()):
        raise InputError(f"variant {v.name}: target.{v.target.kind} {v.target.value:g} chooses every unit "
                         f"unquantized, which is the baseline; expected a size target below "
                         f"{chosen_bytes * 8 / weights_total:.4g} bits per weight, or a max_kl above the least "
                         f"one-unit damage {min(c for row in cost_table for c in row if c > 0):.4g}")
    batch = None
    if cal is not None:
        batch, cal = job.calibration_windows(cal, tok)
    log.info("stage compress: %s with llm-compressor %s, %s", v.name, v.algorithm,
             ", ".join(f"{f} {len(m)} modules" for f, m in assignment.items()) + f", {len(kept)} unquantized")
    compress_mixed(model, v, assignment, v.group_size, v.algorithm, [*v.ignore, *kept], batch)

    points = frontier.points()
    larger = [p for p in points if p[0] > chosen_bytes]
    facts.update({
        "target": v.target.model_dump(exclude_none=True), "granularity": v.granularity, "algorithm": v.algorithm,
        "formats": [v._format_label(f) for f in v.formats],
        "units": [{"unit": u.name, "format": v._format_label(v.formats[j]), "weights": u.weights}
                  for u, j in zip(the_units, picks)],
        "counts": {v._format_label(f): n for f in v.formats if (n := sum(v.formats[j] == f for j in picks))},
        # where each chosen format runs: a REFERENCE read from vLLM's source (SCHEMES), not measured here
        "vllm_reference": {v._format_label(f): SCHEMES[f].vllm for f in v.formats
                           if f != UNQUANTIZED and any(v.formats[j] == f for j in picks)},
        "effective_bits": round(chosen_bytes * 8 / weights_total, 4), "unit_bytes": int(chosen_bytes),
        "other_bytes": int(other), "predicted": {"score": how["score"], "value": frontier.cost_of(picks)},
        "next_point": ({"effective_bits": round(larger[0][0] * 8 / weights_total, 4), "predicted": larger[0][1]}
                       if larger else None),
        "frontier": [[round(s * 8 / weights_total, 4), c] for s, c in points],
        "sensitivity": {"units": [u.name for u in the_units], "formats": [v._format_label(f) for f in v.formats],
                        "costs": costs, **how, "analysis_seconds": round(analysis_seconds, 2)},
        "solver_gap_bytes": round(frontier.gap_bytes, 1),
    })
    return model, cal

