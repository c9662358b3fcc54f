"""The command line: exit code 2 and nothing written on bad input, whatever is wrong with it."""

import yaml

from compress.cli import main
from conftest import write_recipe


def _run(recipe, capsys, *extra) -> tuple[int, str]:
    code = main(["run", str(recipe), *extra])
    return code, capsys.readouterr().err


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, tiny_model, calib_file, capsys):
    recipe = write_recipe(tmp_path, tiny_model, calib_file, [{"name": "g", "method": "gptq", "group_size": 32}])
    assert main(["run", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"scheme": "W4A16-g32"' in out and '"baseline"' in out
    assert not (tmp_path / "run").exists()


def test_group_size_that_does_not_divide_a_layer_is_rejected(tmp_path, tiny_model, calib_file, capsys):
    # hidden 64, MLP 128: 128 passes the power-of-two rule but does not divide q_proj's 64 input columns
    recipe = write_recipe(tmp_path, tiny_model, calib_file, [{"name": "g", "method": "rtn", "group_size": 128}])
    code, err = _run(recipe, capsys)
    assert code == 2
    assert f"{recipe}: variants[0].group_size: 128 does not divide" in err and "[64, 128]" in err
    assert not (tmp_path / "run").exists()


def test_missing_model_and_calibration_files(tmp_path, tiny_model, calib_file, capsys):
    recipe = write_recipe(tmp_path, tmp_path / "no-such-model", calib_file, [{"name": "r", "method": "rtn"}])
    code, err = _run(recipe, capsys)
    assert code == 2 and "model.source: no such file or folder" in err

    recipe = write_recipe(tmp_path, tiny_model, tmp_path / "missing.jsonl", [{"name": "g", "method": "gptq"}])
    code, err = _run(recipe, capsys)
    assert code == 2 and "calibration.source: file not found" in err and "missing.jsonl" in err

    recipe = write_recipe(tmp_path, tmp_path / "model.gguf", calib_file, [{"name": "r", "method": "rtn"}])
    code, err = _run(recipe, capsys)
    assert code == 2 and "GGUF file not found" in err
    assert not (tmp_path / "run").exists()


def test_calibration_field_must_exist(tmp_path, tiny_model, calib_file, capsys):
    recipe = write_recipe(tmp_path, tiny_model, calib_file, [{"name": "g", "method": "gptq"}])
    data = yaml.safe_load(recipe.read_text())
    data["calibration"]["text_field"] = "body"
    recipe.write_text(yaml.safe_dump(data))
    code, err = _run(recipe, capsys)
    assert code == 2 and "calibration.text_field" in err and "'body'" in err and "['text']" in err


def test_unreachable_hub_is_a_clear_input_error(tmp_path, calib_file, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path, "some-org/some-model", calib_file, [{"name": "r", "method": "rtn"}])
    code, err = _run(recipe, capsys)
    assert code == 2 and "cannot fetch 'some-org/some-model' from the Hugging Face hub" in err
    assert not (tmp_path / "run").exists()


def test_bad_recipe_exit_code_2(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("model: {source: smollm2-135m}\nvariants: [{name: a, method: rtn, bits: 5}]\noutput: o\n")
    code, err = _run(path, capsys)
    assert code == 2 and f"{path}: variants[0].bits" in err


def test_missing_optional_backend_names_the_extra(tmp_path, tiny_model, calib_file, capsys, monkeypatch):
    """bitsandbytes and GGUF variants fail up front when their backend is not installed, naming the extra."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llama_cpp", "bitsandbytes") else real(name, *a))
    recipe = write_recipe(tmp_path, tiny_model, calib_file, [{"name": "q", "method": "gguf", "gguf_type": "Q4_0"},
                                                             {"name": "n", "method": "bnb-nf4"}])
    code, err = _run(recipe, capsys)
    assert code == 2
    assert f"{recipe}: variants[0].method: 'gguf' needs llama-cpp-python, which is not installed" in err
    assert f"{recipe}: variants[1].method: 'bnb-nf4' needs bitsandbytes" in err
    assert "pip install -e '.[edge]'" in err
    assert not (tmp_path / "run").exists()
