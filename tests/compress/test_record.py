"""results.json through its schema: written and read only as Record/Results, old files migrated by their format."""

import json

import pytest

from compress.options import InputError
from compress.record import RESULTS_FORMAT, Record, Results, known_path, parse_record, read_results


def _record(**over) -> dict:
    return {"name": "gptq", "method": "gptq", "scheme": "W4A16-g64", "status": "ok", "checkpoint": "runs/x/gptq",
            "bits": 4, "group_size": 64, "weights_bytes": 1000, **over}


def test_round_trip_keeps_only_what_was_set():
    """A record dumps the fields it was given (a null that was set stays; an unmeasured field stays out)."""
    r = parse_record(_record(symmetric=None, perplexity={"value": 12.5, "tokens": 100}))
    out = r.dump()
    assert out["symmetric"] is None and "kl" not in out and out["perplexity"]["value"] == 12.5
    assert list(out)[:4] == ["name", "method", "scheme", "status"]  # declaration order, whatever the input order


def test_a_misspelt_field_is_refused_where_it_is_written():
    with pytest.raises(Exception, match="perplexty"):
        Record.model_validate(_record(perplexty={"value": 1.0}))


def test_results_file_versions(tmp_path):
    path = tmp_path / "results.json"
    old = {"recipe": "r.yaml", "model": {"description": "m"}, "variants": [_record()]}  # format 1: no "format" key
    path.write_text(json.dumps(old))
    results = read_results(path)
    assert results.format == RESULTS_FORMAT and results.variants[0].name == "gptq"
    text = json.loads(results.text())
    assert text["format"] == RESULTS_FORMAT and text["variants"][0] == _record()
    path.write_text(json.dumps({**old, "format": RESULTS_FORMAT + 1}))
    with pytest.raises(InputError, match="newer than this compress reads"):
        read_results(path)
    path.write_text(json.dumps({**old, "variants": [_record(speed=3)]}))
    with pytest.raises(InputError, match=r"variants\.0\.speed"):
        read_results(path)
    path.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        read_results(path)


def test_failed_row_and_known_paths():
    failed = Results(variants=[Record(name="x", method="rtn", scheme="W4A16", status="failed", error="disk full")])
    assert failed.dump()["variants"][0] == {"name": "x", "method": "rtn", "scheme": "W4A16", "status": "failed",
                                            "error": "disk full"}
    assert known_path("perplexity", "value") and not known_path("perplexty", "value")
