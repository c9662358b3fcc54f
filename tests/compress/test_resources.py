"""Disk and memory checked up front (exit 2 with the numbers), and the one sentence a user sees when they still run
out mid-run."""

import errno

import pytest
from transformers import LlamaConfig

from compress import resources
from compress.recipe import InputError, parse_variant

CONFIG = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def test_estimates_follow_the_format():
    fp32 = resources.variant_write_bytes(parse_variant(dict(name="b", method="baseline")), CONFIG, 4, 0)
    w4 = resources.variant_write_bytes(parse_variant(dict(name="r", method="rtn", bits=4, group_size=64)), CONFIG, 4, 0)
    w8 = resources.variant_write_bytes(parse_variant(dict(name="f", method="fp8")), CONFIG, 4, 0)
    q4 = resources.variant_write_bytes(parse_variant(dict(name="g", method="gguf", gguf_type="Q4_0")), CONFIG, 4, 0)
    params = resources.params(CONFIG)
    assert fp32 == int(params * 4 * resources.MARGIN)
    assert w4 < w8 < fp32
    assert q4 > params * 2  # the F16 intermediate exists beside the Q4_0 file
    assert resources.variant_write_bytes(parse_variant(dict(name="b", method="baseline")), CONFIG, 4, 12345) == fp32 + 12345


def test_check_disk_names_the_folder_each_need_and_the_free_space(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "free_bytes", lambda p: 2 * 10**9)
    resources.check_disk({tmp_path: [("a", 10**9), ("b", 10**9)]})  # exactly fits
    with pytest.raises(InputError) as e:
        resources.check_disk({tmp_path / "not-yet": [("a", 10**9), ("b", 1.5 * 10**9)]})
    msg = str(e.value)
    assert str(tmp_path / "not-yet") in msg and "about 2.5 GB" in msg and "a 1 GB, b 1.5 GB" in msg
    assert "2 GB free" in msg


def test_check_memory_refuses_with_the_numbers_and_the_way_out(monkeypatch):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 10**8)
    with pytest.raises(InputError, match=r"not enough memory: .* 0.1 GB is available; set model.offload"):
        resources.check_memory(CONFIG, 4, "float32", None)
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 10**11)
    assert resources.check_memory(CONFIG, 4, "float32", None) == resources.expected_peak_memory_bytes(CONFIG, 4, None)


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device", "/out/x"),
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),  # torch.save
])
def test_disk_full_in_any_library_is_one_sentence(exc, tmp_path):
    msg = resources.one_line(exc, tmp_path / "rtn", need_bytes=3 * 10**8)
    assert msg.startswith("disk full writing ") and "it needs about 0.3 GB" in msg and "GB free there now" in msg
    assert "\n" not in msg


def test_out_of_memory_and_other_errors_are_one_line(tmp_path):
    oom = resources.one_line(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate "
                                          "memory: you tried to allocate 123 bytes"), tmp_path / "rtn")
    assert oom.startswith("out of memory while building or measuring") and str(tmp_path / "rtn") in oom
    other = resources.one_line(ValueError("bad\nthing"), tmp_path)
    assert other == "ValueError: bad thing"


def test_memory_check_counts_the_sensitivity_pass(monkeypatch):
    """Method auto holds the whole model and its analysis at once: the check takes that when it is more than the
    usual peak, and says so when it refuses."""
    config = LlamaConfig(vocab_size=50_000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    auto = parse_variant({"name": "a", "method": "auto", "target": {"effective_bits": 5},
                          "analysis": {"windows": 8, "seq_len": 512}})
    fisher = parse_variant({"name": "f", "method": "auto", "target": {"effective_bits": 5},
                            "analysis": {"windows": 8, "seq_len": 512, "score": "fisher"}})
    assert parse_variant({"name": "g", "method": "gptq"}).analysis_bytes(config, 4) == 0
    kl_bytes = auto.analysis_bytes(config, 4)
    assert kl_bytes >= 8 * 512 * 50_000 * 4  # the baseline's log-probabilities alone
    assert fisher.analysis_bytes(config, 4) > 0
    usual = resources.expected_peak_memory_bytes(config, 4, None)
    with_auto = resources.expected_peak_memory_bytes(config, 4, None, kl_bytes)
    assert with_auto == resources.params(config) * 4 + kl_bytes + resources.RUNTIME_BYTES > usual
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: (usual + with_auto) // 2)
    assert resources.check_memory(config, 4, "float32", None) == usual
    with pytest.raises(InputError, match=r"the model plus [0-9.]+ GB for method auto's sensitivity pass"):
        resources.check_memory(config, 4, "float32", None, kl_bytes)
