"""The documentation: generated pages are fresh, the recipe reference lists every field, every results file is
rendered under its own name, and the README's commands are the ones CI runs. No network, no model: seconds."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# generated pages

def test_generated_pages_are_fresh(gen):
    """What `python docs/generate.py --check` checks in CI: every generated page is what the script writes now."""
    stale = gen.stale()
    assert not stale, "stale generated pages (run python docs/generate.py):\n" + "\n".join(
        f"{path.relative_to(ROOT)}\n{diff}" for path, diff in stale)


def test_check_exits_1_naming_the_stale_page(gen, tmp_path, monkeypatch, capsys):
    page = tmp_path / "page.md"
    page.write_text("as it was\n")
    monkeypatch.setattr(gen, "pages", lambda: {page: "as it should be\n"})
    assert gen.main(["--check"]) == 1
    assert f"{page} is stale" in capsys.readouterr().err
    assert page.read_text() == "as it was\n", "--check writes nothing"
    assert gen.main([]) == 0 and page.read_text() == "as it should be\n"
    assert gen.main(["--check"]) == 0


def _models():
    """Every pydantic model a recipe is made of, found by walking the schema (not the generator's own walk)."""
    import typing

    from pydantic import BaseModel

    from compress.options import VariantBase
    from compress.recipe import VARIANT_CLASSES, Recipe

    found, todo = [], [Recipe, VariantBase, *VARIANT_CLASSES]

    def models_in(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield annotation
        for arg in typing.get_args(annotation):
            yield from models_in(arg)

    while todo:
        model = todo.pop()
        if model in found:
            continue
        found.append(model)
        for field in model.model_fields.values():
            todo += list(models_in(field.annotation))
    return found


def _section(text: str, model) -> str:
    """The part of docs/reference/recipe.md under the model's heading (anchored by its class name)."""
    m = re.search(rf"^## .*\{{#{model.__name__.lower()}\}}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"docs/reference/recipe.md has no section for {model.__name__}"
    return m.group(1)


def test_recipe_reference_lists_every_field():
    from compress.options import VariantBase
    from compress.recipe import VARIANT_CLASSES

    text = (ROOT / "docs" / "reference" / "recipe.md").read_text()
    models = _models()
    assert len(models) > 15
    missing = []
    for model in models:
        section = _section(text, model)
        own = model.model_fields
        if model in VARIANT_CLASSES:  # the keys every variant has are listed once, under VariantBase
            own = {f: v for f, v in own.items() if f not in VariantBase.model_fields or f == "method"}
        missing += [f"{model.__name__}.{name}" for name in own if f"| `{name}` |" not in section]
    assert not missing, f"fields missing from docs/reference/recipe.md: {missing}"


def test_recipe_reference_gives_type_default_and_description():
    from compress.options import Calibration, ThroughputSettings

    text = (ROOT / "docs" / "reference" / "recipe.md").read_text()
    row = next(line for line in _section(text, Calibration).splitlines() if line.startswith("| `samples` |"))
    assert f"`{Calibration.model_fields['samples'].default}`" in row and "> 0" in row and "| int |" in row
    row = next(line for line in _section(text, ThroughputSettings).splitlines()
               if line.startswith("| `llamacpp_threads` |"))
    assert "threads of the llama.cpp engine" in row  # the comment above the field in compress/options.py


def test_every_results_file_is_rendered_under_its_name():
    pages = {p.name: p.read_text() for p in (ROOT / "docs" / "results").glob("*.md")}
    files = [p.name for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_file() and p.name != "README.md"]
    assert files
    for name in files:
        assert any(f"Source: `benchmarks/results/{name}`" in text for text in pages.values()), name


# ---------------------------------------------------------------------------------------------------------------
# the README

def _commands(shell: str) -> list[str]:
    """The simple commands of a shell snippet, in order: comments dropped, backslash continuations joined, each
    line split at `&&`, whitespace normalised."""
    joined = re.sub(r"\\\n", " ", shell)
    out = []
    for line in joined.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        out += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return out


def _readme_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", README.read_text(), re.M | re.S)[:2]


def _ci_test_command() -> list[str]:
    """The commands of .ci/run's one chain that runs pytest (its set-up lines around it are CI's own)."""
    chains = [_commands(line) for line in re.sub(r"\\\n", " ", CI.read_text()).splitlines()
              if "pytest" in line and not line.lstrip().startswith("#")]
    assert len(chains) == 1, f".ci/run should run pytest in one chain of commands, found {len(chains)}"
    return chains[0]


def test_readme_test_command_is_what_ci_runs():
    assert len(_readme_blocks()) == 2, "README.md must start with two ```bash blocks: the lab, then the tests"
    assert _commands(_readme_blocks()[1]) == _ci_test_command()


def test_readme_lab_command_sets_up_as_ci_does_and_runs_the_lab():
    lab = _commands(_readme_blocks()[0])
    ci = _ci_test_command()
    assert lab[-1] == "compress run recipes/smollm2-135m-lab.yaml"
    assert (ROOT / "recipes" / "smollm2-135m-lab.yaml").is_file()

    def unquiet(command):
        return command.replace(" -q ", " ")

    venv = [c for c in ci if c.startswith(("python3 -m venv", ". .venv"))]
    torch = [unquiet(c) for c in ci if c.startswith("pip install") and "torch==" in c]
    assert venv and lab[:len(venv)] == venv, "the lab's venv is set up as CI's"
    assert len(torch) == 1 and lab[len(venv)] == torch[0], "torch is pinned first, to the same version as CI's"
    assert lab[len(venv) + 1] == "pip install -e ."


def test_readme_commands_are_readable():
    for block in _readme_blocks():
        assert len(block.splitlines()) > 1
        assert all(len(line) <= 100 for line in block.splitlines()), "one command per line, not a 200-char line"


def test_commands_parser_handles_continuations():
    assert _commands("a && \\\n  b   c && \\\n d\n# note\ne") == ["a", "b c", "d", "e"]


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the rest belongs in docs/"
