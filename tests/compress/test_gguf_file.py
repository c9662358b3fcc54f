"""Reading GGUF files with gguf-py (no llama.cpp): tensor types and bytes, the KV size, and the tokenizer swap.
The files are written here with gguf-py's writer and its numpy Q8_0 quantizer."""

import numpy as np
import pytest

from compress import gguf_file


def _write_gguf(path, *, tokenizer_model="gpt2", eos=2, tokens=("a", "b", "c")):
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(list(tokens))
    w.add_eos_token_id(eos)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((96, 64)).astype(np.float32)  # 96 rows of 64: two Q8_0 blocks per row
    w.add_tensor("token_embd.weight", gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weight


def test_summarize_counts_types_bytes_and_shape(tmp_path):
    _write_gguf(tmp_path / "m.gguf")
    s = gguf_file.summarize(tmp_path / "m.gguf")
    q8_bytes = 96 * 2 * 34  # Q8_0: 32 weights in 34 bytes (fp16 scale + 32 int8)
    assert s["types"] == {"Q8_0": {"tensors": 1, "params": 96 * 64, "bytes": q8_bytes},
                          "F32": {"tensors": 1, "params": 64, "bytes": 256}}
    assert s["tensor_bytes"] == q8_bytes + 256 and s["params"] == 96 * 64 + 64
    assert s["bits_per_weight"] == pytest.approx(8 * (q8_bytes + 256) / (96 * 64 + 64))
    assert s["file_bytes"] > s["tensor_bytes"]
    assert (s["architecture"], s["n_layers"], s["n_heads"], s["n_kv_heads"], s["head_dim"]) == ("llama", 2, 4, 2, 16)
    assert s["tensor_types"] == {"token_embd.weight": "Q8_0", "output_norm.weight": "F32"}
    assert s["n_vocab"] == 3
    # K and V, 2 layers x 2 KV heads x 16 dims, F16: 2 * 2 * 2 * 16 * 2 bytes per token
    assert gguf_file.kv_bytes(s, 10) == 2 * 2 * 2 * 16 * 10 * 2
    assert gguf_file.types_text(s) == "Q8_0 × 1 (0.0 MB), F32 × 1 (0.0 MB)"


def test_replace_tokenizer_keeps_tensors_and_other_metadata(tmp_path):
    from gguf import GGUFReader

    weight = _write_gguf(tmp_path / "model.gguf", tokenizer_model="llama", eos=1, tokens=("x", "y"))
    _write_gguf(tmp_path / "source.gguf", tokenizer_model="gpt2", eos=2, tokens=("a", "b", "c"))
    before = GGUFReader(tmp_path / "model.gguf")
    tensors_before = {t.name: np.array(t.data) for t in before.tensors}
    del before

    gguf_file.replace_tokenizer(tmp_path / "model.gguf", tmp_path / "source.gguf")
    after = GGUFReader(tmp_path / "model.gguf")
    fields = {k: f.contents() for k, f in after.fields.items()}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    assert fields["llama.block_count"] == 2 and fields["general.architecture"] == "llama"
    for t in after.tensors:
        np.testing.assert_array_equal(np.array(t.data), tensors_before[t.name])
    import gguf

    embd = next(t for t in after.tensors if t.name == "token_embd.weight")
    dequant = gguf.quants.dequantize(embd.data, embd.tensor_type)
    assert np.abs(dequant - weight).max() < 0.05  # still the same Q8_0 weights
    assert not list(tmp_path.glob(".tmp-*"))
