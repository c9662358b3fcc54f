"""Model sources that are truncated or not what their name says fail before any work, naming the file."""

import json

import pytest

from compress.load import check_gguf, check_hf_folder, resolve_source
from compress.recipe import InputError, ModelSpec


def test_a_complete_folder_passes(tiny_model):
    check_hf_folder(tiny_model, "model.source")
    assert resolve_source(ModelSpec(source=str(tiny_model)), prepare=False).kind == "folder"


@pytest.mark.parametrize("damage,expected", [
    ("truncate weights", "is truncated"),
    ("config not json", "is not valid JSON"),
    ("config without model_type", "has no model_type"),
    ("no weights", "has no weights"),
    ("index names a missing shard", "names weight files that are missing"),
])
def test_a_damaged_folder_is_refused_naming_the_file(tmp_path, tiny_model, damage, expected):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    weights = folder / "model.safetensors"
    if damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "config not json":
        (folder / "config.json").write_text("{not json")
    elif damage == "config without model_type":
        (folder / "config.json").write_text("{}")
    elif damage == "no weights":
        weights.unlink()
    else:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    with pytest.raises(InputError, match=expected) as e:
        resolve_source(ModelSpec(source=str(folder)), prepare=False)
    assert str(e.value).startswith("model.source: ") and str(folder) in str(e.value)


def test_a_file_named_gguf_that_is_not_one_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(InputError, match=r"model.gguf is not a GGUF file"):
        resolve_source(ModelSpec(source=str(fake)), prepare=False)


def test_a_truncated_gguf_is_refused(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("w", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    check_gguf(path, "model.source")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError, match="truncated"):
        check_gguf(path, "model.source")


def test_an_incomplete_cache_folder_is_never_deleted(tmp_path):
    from compress.load import _dequantize_gguf

    folder = tmp_path / "cache" / "hf"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is not a complete model folder"):
        _dequantize_gguf(tmp_path / "unused.gguf", folder)
    assert (folder / "notes.txt").read_text() == "mine"
