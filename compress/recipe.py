"""The recipe: one YAML file that says which model, which calibration data, which variants, where to write.

A variant's options depend on its method, so `Variant` is a discriminated union on `method` over the classes the
backends declare (compress/backends/): a key that belongs to another method is an unknown key of this one, rejected
by the schema itself, and the message says which methods take it. Validation happens in two steps, both before any
weights are loaded:

1. `load_recipe` parses the YAML and checks types, ranges and per-method rules (pure, no I/O beyond the file).
2. `compress.checks.check_inputs` checks the recipe against the world: the files it names exist and the group size
   divides the width of every layer it will quantize (read from the model's config, not its weights).

Either step raises `InputError` whose message names the file, the field path and what was expected; the CLI turns
it into exit code 2 with nothing written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Union

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from compress.backends.bnb import BNB_METHODS, BnbVariant
from compress.backends.gguf import GGUF_TYPE_BITS, GGUF_UNQUANTIZED, GGUFVariant
from compress.backends.llmcompressor import CALIBRATED_METHODS, GROUPED_METHODS, METHOD_BITS, LLMCompressorVariant
from compress.backends.unchanged import UnchangedVariant
from compress.options import (EMBEDDED_MODEL, RESERVED_NAMES, Calibration, ClusterSettings, Distill, Evaluation, InputError, KVCache,
                              ModelSpec, Offload, PerplexitySettings, PlannerSettings, Student, ThroughputSettings,
                              VariantBase, WatchdogSettings, _Strict)

__all__ = ["BNB_METHODS", "CALIBRATED_METHODS", "EMBEDDED_MODEL", "GGUF_TYPE_BITS", "GGUF_UNQUANTIZED",
           "GROUPED_METHODS", "METHOD_BITS", "RESERVED_NAMES", "Calibration", "Distill", "Evaluation", "InputError",
           "KVCache", "ModelSpec", "Offload", "PerplexitySettings", "PlannerSettings", "Recipe", "Student",
           "ThroughputSettings", "Variant", "VariantBase", "load_recipe", "parse_variant"]

# one class per method family; adding a method family = one backend module and its class here
VARIANT_CLASSES = (UnchangedVariant, LLMCompressorVariant, BnbVariant, GGUFVariant)
Variant = Annotated[Union[VARIANT_CLASSES], Field(discriminator="method")]


def _methods(cls) -> tuple[str, ...]:
    return cls.model_fields["method"].annotation.__args__


METHODS = tuple(m for cls in VARIANT_CLASSES for m in _methods(cls))
# key -> the methods whose variants take it (for "unknown key" messages that say where a key belongs)
KEY_METHODS = {key: [m for cls in VARIANT_CLASSES if key in cls.model_fields for m in _methods(cls)]
               for cls in VARIANT_CLASSES for key in cls.model_fields}


class Recipe(_Strict):
    model: ModelSpec = Field(default_factory=ModelSpec)
    calibration: Calibration | None = None
    variants: list[Variant] = Field(min_length=1)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    output: str
    # run the variants as Ray tasks (compress/cluster.py); None: one after another in this process. Not part of any
    # cache key: where a variant ran does not change what it is
    cluster: ClusterSettings | None = None
    # when a stage that makes no progress is stopped (compress/stop.py); null: never. Not part of any cache key
    watchdog: WatchdogSettings | None = Field(default_factory=WatchdogSettings)

    _baseline_added: bool = PrivateAttr(False)

    @field_validator("variants")
    @classmethod
    def _unique_names_one_baseline(cls, variants: list[VariantBase]) -> list[VariantBase]:
        names = [v.name for v in variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique, repeated: {dupes}")
        if sum(v.method == "baseline" for v in variants) > 1:
            raise ValueError("at most one variant may have method 'baseline'")
        return variants

    @model_validator(mode="after")
    def _calibration_when_needed(self) -> "Recipe":
        needing = [v.name for v in self.variants if v.calibrated]
        if needing and self.calibration is None:
            raise ValueError(f"variants {needing} are calibrated methods; add a `calibration:` section")
        if not any(v.method == "baseline" for v in self.variants):  # every table has its reference row
            self.variants.insert(0, UnchangedVariant(name="baseline", method="baseline"))
            self._baseline_added = True
        vllm = self.evaluation.vllm
        named = {} if vllm is None else {"evaluation.vllm.tasks": vllm.tasks, **{
            f"evaluation.vllm.runtime_variants.{path}": rows for path, rows in vllm.runtime_variants.items()}}
        names = [v.name for v in self.variants]
        for field, rows in named.items():  # a list names variants; true: every variant
            if isinstance(rows, list) and (unknown := [n for n in rows if n not in names]):
                raise ValueError(f"{field}: {unknown} are not variant names; expected some of {names} (or true for "
                                 f"every variant)")
        return self

    def field_path(self, variant_index: int, field: str) -> str:
        """`variants[i].field` as the user's file numbers it (the automatic baseline row is not in the file)."""
        return f"variants[{variant_index - self._baseline_added}].{field}"


def parse_variant(data: dict) -> VariantBase:
    """One variant from its recipe mapping (the class its `method` names), e.g. for a benchmark or a test."""
    from pydantic import TypeAdapter

    return TypeAdapter(Variant).validate_python(data)


def _loc(loc: tuple) -> str:
    """`variants[2].group_size` from pydantic's location, leaving out the union's tag (`variants.2.gptq.group_size`)."""
    parts = list(loc)
    if len(parts) > 2 and parts[0] == "variants" and isinstance(parts[1], int) and parts[2] in METHODS:
        del parts[2]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _message(err: dict, data: dict) -> tuple[str, str]:
    """(where, what) of one validation error, in the recipe's own terms."""
    where = _loc(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    kind = err["type"]
    if kind == "union_tag_invalid":
        return f"{where}.method", f"expected one of {list(METHODS)}, got {err['input'].get('method')!r}"
    if kind == "union_tag_not_found":
        return f"{where}.method", f"missing; expected one of {list(METHODS)}"
    if kind == "extra_forbidden":
        key = err["loc"][-1]
        if key in KEY_METHODS and err["loc"][0] == "variants":
            method = err["loc"][2] if len(err["loc"]) > 2 else "?"
            hint = " (choose the llama.cpp type with gguf_type)" if method == "gguf" and key == "bits" else ""
            if method in ("baseline", "none"):
                hint = " (it takes no weight quantization settings)"
            return where, f"method {method!r} does not take {key}; only {', '.join(KEY_METHODS[key])} do{hint}"
        return where, "unknown key (check the spelling; see recipes/ for the accepted keys)"
    if kind == "value_error" and ":" in msg and all(p.isidentifier() for p in msg.split(":")[0].split(".")):
        field, msg = msg.split(":", 1)
        return (field if where == "(top level)" else f"{where}.{field}"), msg.strip()
    got = f" (got {err['input']!r})" if kind not in ("missing",) and not isinstance(err["input"], dict) else ""
    return where, msg + got


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file, or raise InputError naming the file and each bad field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with keys model, calibration, variants, evaluation, output")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where, msg = _message(err, data)
            lines.append(f"{path}: {where}: {msg}")
        raise InputError("\n".join(lines)) from None
