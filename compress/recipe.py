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
from pydantic import Discriminator, Field, PrivateAttr, Tag, ValidationError, field_validator, model_validator

from compress.backends.auto import AutoVariant
from compress.backends.bnb import BNB_METHODS, BnbVariant
from compress.backends.gguf import GGUF_TYPE_BITS, GGUF_UNQUANTIZED, GGUFVariant
from compress.backends.llmcompressor import LLMCompressorVariant
from compress.backends.unchanged import REFERENCE, UnchangedVariant
from compress.options import (EMBEDDED_MODEL, RESERVED_NAMES, Calibration, ClusterSettings, Distill, Evaluation, InputError, KVCache,
                              ModelSpec, Offload, PerplexitySettings, PlannerSettings, Student, ThroughputSettings,
                              VariantBase, WatchdogSettings, _Strict)

__all__ = ["BNB_METHODS", "EMBEDDED_MODEL", "GGUF_TYPE_BITS", "GGUF_UNQUANTIZED", "RESERVED_NAMES", "Calibration", "Distill", "Evaluation", "InputError",
           "KVCache", "ModelSpec", "Offload", "PerplexitySettings", "PlannerSettings", "Recipe", "Student",
           "ThroughputSettings", "Variant", "VariantBase", "load_recipe", "parse_variant"]

# one class per method family; adding a method family = one backend module and its class here. The union is
# decided by `method` at validation time, from each class's own list (llm-compressor's is its METHODS table), so a
# method added to a table is a recipe method without another edit.
VARIANT_CLASSES = (UnchangedVariant, LLMCompressorVariant, BnbVariant, GGUFVariant, AutoVariant)


def _family(data) -> str | None:
    method = data.get("method") if isinstance(data, dict) else getattr(data, "method", None)
    return next((cls.__name__ for cls in VARIANT_CLASSES if method in cls.methods()), None)


Variant = Annotated[Union[tuple(Annotated[cls, Tag(cls.__name__)] for cls in VARIANT_CLASSES)],
                    Discriminator(_family)]


def methods() -> list[str]:
    """Every `method` a recipe may name, now (the tables may have grown since import)."""
    return [m for cls in VARIANT_CLASSES for m in cls.methods()]


def methods_taking(key: str) -> list[str]:
    """The methods whose variants take recipe key `key` (for "unknown key" messages that say where a key belongs)."""
    return [m for cls in VARIANT_CLASSES for m in cls.methods_taking(key)]


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
        if sum(v.is_reference for v in variants) > 1:
            raise ValueError(f"at most one variant may have method {REFERENCE!r}")
        return variants

    @model_validator(mode="after")
    def _calibration_when_needed(self) -> "Recipe":
        needing = [v.name for v in self.variants if v.calibrated]
        if needing and self.calibration is None:
            raise ValueError(f"variants {needing} are calibrated methods; add a `calibration:` section")
        if (measured := [v.name for v in self.variants if v.needs_tasks]) and not self.evaluation.tasks:
            raise ValueError(f"variants {measured} search for a min_recovery target, measured on evaluation.tasks; "
                             f"expected a list of tasks there")
        if not any(v.is_reference for v in self.variants):  # every table has its reference row
            self.variants.insert(0, UnchangedVariant(name=REFERENCE, method=REFERENCE))
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
    """`variants[2].group_size` from pydantic's location, leaving out the union's tag (`variants.2.<class>.group_size`)."""
    parts = list(loc)
    tags = {cls.__name__ for cls in VARIANT_CLASSES}
    if len(parts) > 2 and parts[0] == "variants" and isinstance(parts[1], int) and parts[2] in tags:
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
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # _family found no class for this method
        got = err["input"].get("method") if isinstance(err["input"], dict) else None
        if got is None:
            return f"{where}.method", f"missing; expected one of {methods()}"
        return f"{where}.method", f"expected one of {methods()}, got {got!r}"
    if kind == "extra_forbidden":
        key = err["loc"][-1]
        if err["loc"][0] == "variants" and (takers := methods_taking(key)):
            variant = data["variants"][err["loc"][1]]
            method = variant.get("method", "?")
            cls = next((c for c in VARIANT_CLASSES if c.__name__ == _family(variant)), None)
            text = cls.KEY_HINTS.get(key, cls.KEY_HINTS.get("*")) if cls else None
            hint = f" ({text})" if text else ""
            return where, f"method {method!r} does not take {key}; only {', '.join(takers)} do{hint}"
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
