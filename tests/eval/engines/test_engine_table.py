"""eval/engines/__init__.py: the engine table, the one place a row's format picks its engine, and what the rest of
eval/ and the report ask of it."""

from __future__ import annotations

import re
from pathlib import Path

from eval.engines import ENGINES, LLAMACPP, TRANSFORMERS, engine_of, for_row

ROOT = Path(__file__).resolve().parents[3]


def test_a_gguf_row_is_measured_in_llamacpp_on_its_file_and_any_other_in_transformers(tmp_path):
    gguf = for_row({"checkpoint": str(tmp_path), "gguf": {"file": "model-Q4_0.gguf"}})
    hf = for_row({"checkpoint": str(tmp_path)})
    assert (gguf.engine, gguf.path) == (LLAMACPP, tmp_path / "model-Q4_0.gguf")
    assert (hf.engine, hf.path) == (TRANSFORMERS, tmp_path)
    assert gguf.decoder_spec(type("T", (), {"llamacpp_threads": 1})(), "cpu", "torch.float32") == {
        "module": "eval.engines.llamacpp", "path": str(tmp_path / "model-Q4_0.gguf"), "threads": 1}
    assert hf.decoder_spec(None, "cpu", "torch.float32") == {
        "module": "eval.engines.transformers", "folder": str(tmp_path), "device": "cpu", "dtype": "float32"}


def test_each_engine_keys_only_the_settings_its_figures_depend_on():
    from compress import llamacpp

    settings = {"repeats": 3, "llamacpp_threads": 2}
    assert for_row({"checkpoint": "x"}).key_settings(settings) == {"repeats": 3}
    assert for_row({"checkpoint": "x", "gguf": {"file": "m.gguf"}}).key_settings(settings) == {
        **settings, "llamacpp_flash_attention": llamacpp.FLASH_ATTENTION}


def test_every_engine_module_gives_what_the_table_promises():
    import importlib

    for engine in ENGINES.values():
        module = importlib.import_module(engine.module)
        for name in ("key_settings", "scorer", "decoder_args", "benchmark", "open_decoder"):
            assert callable(getattr(module, name)), (engine.name, name)
    assert engine_of({"gguf": {"file": "m.gguf"}}).not_served_by_vllm and TRANSFORMERS.not_served_by_vllm is None


def test_nothing_else_in_eval_reads_a_rows_format_to_pick_an_engine():
    """The refactor this table came from (issue 29): `record.get("gguf")` decided in 14 places; now engine_of does."""
    readers = [str(p.relative_to(ROOT)) for p in (ROOT / "eval").rglob("*.py")
               if re.search(r"""\.get\(["']gguf["']\)|\[["']gguf["']\]""", p.read_text())]
    assert readers == ["eval/engines/__init__.py"]


def test_the_report_says_what_each_engine_measured():
    from compress.report.provenance import _engine_notes

    rows = [{"name": "q4", "perplexity": {"engine": "llama.cpp"}, "tasks_engine": LLAMACPP.tasks},
            {"name": "gptq", "perplexity": {"engine": "transformers"}, "tasks_engine": TRANSFORMERS.tasks}]
    ppl = _engine_notes(rows, "perplexity", lambda r: r["perplexity"]["engine"])
    tasks = _engine_notes(rows, "tasks", lambda r: r["tasks_engine"], by="tasks")
    assert len(ppl) == 1 and ppl[0].startswith("perplexity and KL of q4 come from llama.cpp")
    assert len(tasks) == 1 and "task scores of q4:" in tasks[0]
    assert _engine_notes(rows[1:], "perplexity", lambda r: r["perplexity"]["engine"]) == []
