"""Fixtures: a tiny random Llama with a tokenizer trained here, so no test downloads anything."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session):
    """In CI every backend is tested: a missing optional backend fails the run instead of skipping its tests."""
    if not os.environ.get("CI"):
        return
    missing = [m for m in ("bitsandbytes", "llama_cpp", "ray") if importlib.util.find_spec(m) is None]
    if not missing:
        from compress.llamacpp import converter_dir

        if converter_dir(fetch=False) is None:
            missing.append("llama.cpp's converter (python -m compress.llamacpp fetch-converter)")
    from eval.engines import vllm_env

    if vllm_env.installed("cpu") is None:
        missing.append("vLLM's environment (python -m eval.engines.vllm_env install)")
    if missing:
        raise pytest.UsageError(f"CI=true but {missing} not installed: .ci/run installs the edge and cluster "
                                f"extras and vLLM's environment so that the bitsandbytes, llama.cpp, Ray and vLLM "
                                f"tests run")

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point weights to a few integer levels and a scale.",
    "A calibration set shows the model typical inputs so that errors are measured where they matter.",
    "def add(a, b):\n    return a + b",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
] * 4


def build_tiny_model(folder: Path, seed: int = 0, llama_tokenizer: bool = False, hidden_size: int = 64,
                     intermediate_size: int = 128, layers: int = 2, vocab_size: int | None = None) -> Path:
    """A 2-layer Llama (hidden 64, MLP 128, 4 heads, 2 KV heads) and a byte-level BPE tokenizer, saved to folder.

    llama_tokenizer=True gives it a Llama-2-style tokenizer instead (BPE with byte fallback, the 256 <0xXX> byte
    tokens, "▁" for spaces): llama.cpp's converter accepts that one without knowing the vocabulary, while a
    byte-level BPE must be one it has a fingerprint for (the converter refuses vocabularies it does not know).
    `vocab_size` grows the tokenizer's ~300 tokens to that many with added plain words (a larger embedding and
    lm_head)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if llama_tokenizer:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    if vocab_size and vocab_size > len(fast):  # plain added words, so every id the model can emit has text
        fast.add_tokens([f"w{i:05d}" for i in range(vocab_size - len(fast))])
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-init weights so quantization error is visible in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_tok_model(tmp_path_factory) -> Path:
    """The tiny model with a Llama-2-style tokenizer, which llama.cpp's converter takes (GGUF tests)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-spm") / "tiny-llama", llama_tokenizer=True)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT * 5))
    return path


def perplexity_data(folder: Path) -> tuple[Path, dict]:
    """`folder/data/text.raw` (the tiny corpus, repeated) and the evaluation settings that score perplexity on it
    in 4 windows of 64 tokens, with no tasks and no throughput."""
    data = folder / "data"
    data.mkdir()
    (data / "text.raw").write_text(" ".join(TEXT * 10))
    return data, {"data_dir": str(data), "tasks": [], "throughput": None,
                  "perplexity": {"file": "text.raw", "context": 64, "stride": 64, "max_windows": 4}}


def task_data(d: Path) -> Path:
    """`d` with local files in the shared data's formats: an ARC-style task file (24 items) and a perplexity text."""
    rows = [{"id": str(i), "question": f"Which word completes: {TEXT[i % 5][:30]}?",
             "choices": ["fox", "dog", "scale", "model"], "gold": i % 4} for i in range(24)]
    (d / "arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "text.raw").write_text(" ".join(TEXT * 10))
    return d


def write_recipe(tmp_path: Path, tiny_model: Path, calib_file: Path, variants: list[dict], **extra) -> Path:
    """recipes/tiny.yaml with the model, calibration file and output pointed at this test's files."""
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    recipe["model"]["source"] = str(tiny_model)
    recipe["calibration"]["source"] = str(calib_file)
    recipe["output"] = str(tmp_path / "run")
    recipe["variants"] = variants
    recipe.update(extra)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _burn(cores: list[int], stop) -> None:
    os.sched_setaffinity(0, cores)
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def burners(n: int | None = None):
    """One CPU-bound process per core this process may use, pinned to those cores; returns stop()."""
    cores = sorted(os.sched_getaffinity(0))
    stop = mp.get_context("spawn").Event()
    procs = [mp.get_context("spawn").Process(target=_burn, args=([c], stop), daemon=True)
             for c in cores[: n or len(cores)]]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let them start (spawn imports Python)

    def halt() -> None:
        stop.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return halt
