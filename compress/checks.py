"""Everything a run checks before it loads any weights: the recipe against the world (files, data, group sizes,
installed backends), the paths it will write (compress/ownership.py), and the disk and memory it will need
(compress/resources.py). Each raises InputError (exit 2, nothing written) naming the file, the field and what was
expected.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from compress import calibration as calib
from compress import checkpoint, ownership
from compress.backends.gguf import TOKENIZER_FILES
from compress.backends.llmcompressor import LLMCompressorVariant
from compress.load import Source, load_config, resolve_device_dtype, resolve_source
from compress.options import Calibration, InputError
from compress.record import RESULTS
from compress.recipe import Recipe
from eval import measure

log = logging.getLogger("compress")

def check_inputs(recipe: Recipe, recipe_path: Path, *, prepare: bool) -> Source:
    """Everything that can be checked without loading weights. Raises InputError."""
    source = resolve_source(recipe.model, prepare=prepare)
    measure.check_inputs(recipe.evaluation)
    eval_files = measure.evaluation_files(recipe.evaluation)
    if recipe.calibration is not None:
        calib.check_source(recipe.calibration)
        _not_evaluated_on(Path(recipe.calibration.source), "calibration.source", eval_files)
    for i, v in enumerate(recipe.variants):
        if v.distill:
            field = recipe.field_path(i, "distill.data")
            try:
                calib.check_source(Calibration(source=v.distill.data, text_field=v.distill.text_field))
            except InputError as e:
                raise InputError(f"{recipe_path}: {field}: {str(e).split(': ', 1)[1]}") from None
            _not_evaluated_on(Path(v.distill.data), f"{recipe_path}: {field}", eval_files)
    device, dtype = resolve_device_dtype(recipe.model)
    check_dtypes(recipe, recipe_path, dtype)
    config = load_config(source)
    check_group_sizes(recipe, recipe_path, config)
    check_variant_config(recipe, recipe_path, config, dtype)
    check_backends(recipe, recipe_path)
    check_output(recipe, recipe_path)
    if recipe.evaluation.vllm is not None and prepare:
        # built (minutes, once) before any work, so that an offline machine fails now with exit 2, not after an
        # hour of compression
        from eval.engines import vllm_env

        vllm_env.ensure(device)
    return source


REPORT_FILES = ("report.md", "report.html", "results.csv")


def check_output(recipe: Recipe, recipe_path: Path) -> None:
    """Every path the run will write is absent or provably compress's (compress/ownership.py); otherwise exit 2
    before any work, naming each path in the way."""
    output = Path(recipe.output).expanduser()
    if output.exists() and not output.is_dir():
        raise InputError(f"{recipe_path}: output: {output} is a file; expected a folder (or a path to create)")
    if not output.is_dir():
        return
    errors = []
    for v in recipe.variants:
        try:
            ownership.check_checkpoint_dest(output / v.name)
        except ownership.ForeignPathError as e:
            errors.append(f"{recipe_path}: variants: {v.name}: {e}")
    for sub in ("eval", ".students"):
        if (output / sub).exists() and not (output / sub).is_dir():
            errors.append(f"{recipe_path}: output: {output / sub} is a file where compress keeps its {sub}/ folder; "
                          f"{ownership.HOW_TO_PROCEED}")
    rels = [RESULTS, *REPORT_FILES] + ([f"eval/{v.name}.json" for v in recipe.variants]
                                       if (output / "eval").is_dir() else [])
    errors += [f"{recipe_path}: output: {m}" for m in ownership.check_files(output, rels)]
    if errors:
        raise ownership.ForeignPathError("\n".join(errors))


def check_backends(recipe: Recipe, recipe_path: Path) -> None:
    """A variant whose backend library is not installed fails up front, naming the extra to install, before any
    work (a backend's class, or a method's table entry, names its optional library as REQUIRES = (import name,
    distribution, install line))."""
    errors = []
    for i, v in enumerate(recipe.variants):
        requires = getattr(v, "REQUIRES", None)
        if requires is None:
            continue
        module, package, install = requires
        if importlib.util.find_spec(module) is None:
            errors.append(f"{recipe_path}: {recipe.field_path(i, 'method')}: {v.method!r} needs {package}, which is "
                          f"not installed; install it: {install}")
    if errors:
        raise InputError("\n".join(errors))


def _not_evaluated_on(path: Path, field: str, eval_files: set[Path]) -> None:
    """Training or calibrating on the text a variant is then scored on makes its scores meaningless."""
    if path.expanduser().resolve() in eval_files:
        raise InputError(f"{field}: {path} is an evaluation file of this recipe (perplexity or task data); "
                         f"calibrate and distill on other text, e.g. ../shared/data/calibration/c4_validation_2k.jsonl")


def check_dtypes(recipe: Recipe, recipe_path: Path, dtype) -> None:
    """A format that builds and reloads only in one compute dtype (the fp4 schemes: bfloat16) in a run that computes
    in another is refused before any work."""
    have = str(dtype).removeprefix("torch.")
    errors = [f"{recipe_path}: {recipe.field_path(i, 'scheme')}: {v.scheme!r} builds and reloads only from a "
              f"{need} model (compressed-tensors decompresses it to {need}); this run computes in {have}: set "
              f"model.dtype: {need}" for i, v in enumerate(recipe.variants) if (need := v.requires_dtype) and need != have]
    if errors:
        raise InputError("\n".join(errors))


def check_group_sizes(recipe: Recipe, recipe_path: Path, config) -> None:
    """A distilled student's dropped layers exist, and a group size divides every width it will quantize."""
    from compress.backends.llmcompressor import quantized_input_widths

    errors = []
    layers = getattr(config, "num_hidden_layers", None)
    for i, v in enumerate(recipe.variants):
        drop = v.distill.student.drop if v.distill else None
        if drop and layers and max(drop) >= layers:
            errors.append(f"{recipe_path}: {recipe.field_path(i, 'distill.student.drop')}: {drop} names layers "
                          f"beyond the teacher's 0..{layers - 1}")
    for i, v in enumerate(recipe.variants):
        group = v.weight_format()[1] if isinstance(v, LLMCompressorVariant) else None
        if not group:
            continue
        widths = quantized_input_widths(config, v.ignore)
        bad = {name: w for name, w in widths.items() if w % group}
        if bad:
            name, w = next(iter(bad.items()))
            field, what = (("group_size", f"{group} does not divide") if v.group_size else
                           ("scheme", f"{v.scheme!r} has groups of {group} inputs, which do not divide"))
            ok = [g for g in (32, 64, 128, 256) if all(x % g == 0 for x in widths.values())]
            errors.append(f"{recipe_path}: {recipe.field_path(i, field)}: {what} the input width of {len(bad)} layers "
                          f"(e.g. {name}: {w}); expected a divisor of every quantized width "
                          f"{sorted(set(widths.values()))}, such as {ok or 'none of 32/64/128/256: use per-channel'}")
    if errors:
        raise InputError("\n".join(errors))


def check_variant_config(recipe: Recipe, recipe_path: Path, config, dtype) -> None:
    """What each variant's own rules find impossible on this model (VariantBase.config_errors), e.g. a size target
    below the smallest checkpoint the method can write."""
    import torch

    dtype_bits = torch.tensor([], dtype=dtype).element_size() * 8
    errors = [f"{recipe_path}: {recipe.field_path(i, field)}: {message}"
              for i, v in enumerate(recipe.variants) for field, message in v.config_errors(config, dtype_bits)]
    if errors:
        raise InputError("\n".join(errors))


def check_resources(recipe: Recipe, source: Source, config, device: str, dtype, output: Path,
                    keys: dict[str, str]) -> dict:
    """Refuse (exit 2, with the numbers) a run whose variants still to build cannot fit on the disks they write to,
    or whose peak memory exceeds what is available. Returns each variant's estimated bytes written."""
    import torch

    from compress import resources

    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    tokenizer_bytes = sum(p.stat().st_size for p in Path(source.path).glob("*")
                          if p.is_file() and p.name in TOKENIZER_FILES) if Path(source.path).is_dir() else 0
    needs = {v.name: resources.variant_write_bytes(v, config, dtype_bytes, tokenizer_bytes) for v in recipe.variants}
    to_build = [v for v in recipe.variants if checkpoint.manifest_key(output / v.name) != keys[v.name]]
    items = {output: [(v.name, needs[v.name]) for v in to_build]}
    students = {json.dumps(v.distill.model_dump(), sort_keys=True) for v in to_build if v.distill}
    if students:
        items[output].append((f"{len(students)} distilled student(s)",
                              len(students) * resources.student_write_bytes(config, dtype_bytes)))
    ev = recipe.evaluation
    unmeasured = [v for v in recipe.variants if not (output / "eval" / f"{v.name}.json").is_file()]
    if ev.enabled and ev.perplexity and len(recipe.variants) > 1 and unmeasured:  # written while measuring
        items[output].append(("the baseline's log-probabilities for KL (removed after the run)",
                              resources.kl_reference_bytes(ev, config)))
    offload = recipe.model.offload
    if offload and to_build:
        folder = Path(offload.folder) if offload.folder else output
        items.setdefault(folder, []).append(("offloaded weights", int(resources.params(config) * dtype_bytes)))
    resources.check_disk(items)
    if to_build and device == "cpu":
        peak = resources.check_memory(config, dtype_bytes, str(dtype).removeprefix("torch."),
                                      offload.max_cpu_memory_gb if offload else None,
                                      max(v.analysis_bytes(config, dtype_bytes) for v in to_build))
        log.info("stage resources: %d variant(s) to build write about %.3g GB to %s; expected peak memory %.3g GB",
                 len(to_build), sum(needs[v.name] for v in to_build) / 1e9, output, peak / 1e9)
    # on a GPU the weights live in GPU memory, which `compress plan` sizes; host RAM holds little of them
    return needs
