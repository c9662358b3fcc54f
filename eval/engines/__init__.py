"""The engines a checkpoint is measured in, and the one place that picks a row's engine (`engine_of`).

Each engine module loads a checkpoint its own way and gives the same things: logits for a token window
(perplexity, KL; `scorer`), a batch-1 decoder for the interleaved speed ratio (`decoder_spec` -> `open_decoder`),
a decode benchmark in its own process whose dict has the same keys in every engine (`benchmark`;
eval/throughput.py computes the statistics), and what of the evaluation settings its figures depend on
(`key_settings`, for the cache keys). lm-eval scores a transformers model whatever the engine (`Row.load_model`).

- transformers.py: any Hugging Face checkpoint (compressed-tensors decompresses on load), the run's device.
- llamacpp.py: GGUF files, with llama.cpp's own kernels (CPU).
- vllm.py: a server started from the model card's serve line (eval/served.py); it has no row of its own: every
  served row is a second row of a checkpoint measured here first.

Adding an engine = its module, one `Engine` entry in ENGINES, and the line of `engine_of` that gives it the rows it
measures. Nothing else reads a row's format to decide how to measure it: eval/measure.py, eval/interleaved.py,
eval/served_setup.py and the report's provenance ask the row's engine.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path


@dataclass(frozen=True)
class Engine:
    """One engine as data. `notes`: what the report's provenance says of the rows this engine measured, per section
    ("perplexity", "tasks", "throughput"); `{rows}` is replaced by their names."""

    name: str  # as results.json and the report name it (a row's perplexity.engine, throughput.engine)
    module: str  # the module that runs it, imported when a row is measured (its backend may be optional)
    scores_in_model: bool  # perplexity from the model lm-eval scores (one load per row), or from its own loader
    tasks: str  # what lm-eval scored for its rows (lm-eval needs a transformers model)
    not_served_by_vllm: str | None = None  # why vLLM does not serve its rows here; None: it does
    notes: dict[str, str] = field(default_factory=dict)


TRANSFORMERS = Engine("transformers", "eval.engines.transformers", scores_in_model=True, tasks="transformers")
LLAMACPP = Engine(
    "llama.cpp", "eval.engines.llamacpp", scores_in_model=False, tasks="transformers, GGUF dequantized on load",
    not_served_by_vllm="a GGUF file: served by llama.cpp (its row), not by vLLM",
    notes={
        "perplexity": "perplexity and KL of {rows} come from llama.cpp's logits for the same token windows (the GGUF "
                      "file as llama.cpp runs it: quantized weights times 8-bit activations); the other rows' from "
                      "transformers; KL always against the baseline's transformers logits.",
        "tasks": "task scores of {rows}: lm-eval needs a transformers model, so they read the GGUF file dequantized "
                 "on load (the same weights, in fp32 arithmetic, without llama.cpp's 8-bit activations).",
        "throughput": "llama.cpp rows: one process per GGUF file, greedy decode of exactly the same number of tokens "
                      "after a prompt of the same length (the same sentence, tokenized by llama.cpp), batch 1 only; "
                      "peak memory includes the memory-mapped file pages it touched.",
    })
ENGINES = {e.name: e for e in (TRANSFORMERS, LLAMACPP)}


@dataclass(frozen=True)
class Row:
    """A row's engine and where its weights are: `folder`, and `file` in it when the engine reads one file."""

    engine: Engine
    folder: Path
    file: str | None = None

    @property
    def path(self) -> Path:
        """What the engine opens: the file, else the folder."""
        return self.folder / self.file if self.file else self.folder

    @property
    def module(self):
        return import_module(self.engine.module)

    def key_settings(self, settings: dict) -> dict:
        """`settings` with what this engine adds to (or drops from) the figures' cache key."""
        return self.module.key_settings(settings)

    def load_model(self, dtype, device: str):
        """The transformers model lm-eval scores (and, for an engine that `scores_in_model`, perplexity too): the
        checkpoint as a user loads it, a GGUF file dequantized on load."""
        from eval.engines import transformers as hf

        return hf.load_checkpoint(self.folder, dtype, device, gguf_file=self.file)

    def scorer(self, context: int, model) -> AbstractContextManager:
        """The logits source of eval/perplexity.evaluate_tokens, open for the block: `model` itself, or the engine's
        own (closed after)."""
        return self.module.scorer(self, context, model)

    def decoder_spec(self, t, device: str, dtype) -> dict:
        """How eval/interleaved opens this row as a batch-1 decoder in another process (JSON-able)."""
        return {"module": self.engine.module, **self.module.decoder_args(self, t, device, str(dtype).removeprefix(
            "torch."))}

    def benchmark(self, name: str, t, device: str, dtype, **shape) -> dict:
        """The decode benchmark of eval/throughput in the engine's own process (its peak memory is this row's)."""
        return self.module.benchmark(self, name, t, device, str(dtype).removeprefix("torch."), **shape)


def engine_of(record: dict) -> Engine:
    """The engine of a row's own figures: a GGUF file is measured in llama.cpp, every other checkpoint in
    transformers. The one place a row's format picks its engine."""
    return LLAMACPP if record.get("gguf") else TRANSFORMERS


def for_row(record: dict) -> Row:
    """A row's engine with where its weights are: the GGUF file itself, else the checkpoint's folder."""
    gguf = record.get("gguf")
    return Row(engine_of(record), Path(record["checkpoint"]), gguf["file"] if gguf else None)


def open_decoder(spec: dict, *, prompt_tokens: int, new_tokens: int):
    """A `decoder_spec` opened in this process: (one_run, close, info) of its engine's `open_decoder`."""
    args = {k: v for k, v in spec.items() if k != "module"}
    return import_module(spec["module"]).open_decoder(prompt_tokens=prompt_tokens, new_tokens=new_tokens, **args)
