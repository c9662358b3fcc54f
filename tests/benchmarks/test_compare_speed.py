"""benchmarks/compare_speed.py: two runs' speed figures side by side, and whether their ratio intervals overlap."""

from __future__ import annotations

import importlib.util
import json

from conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("compare_speed", ROOT / "benchmarks" / "compare_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder, tok: float, ratio: tuple[float, float, float], contended: bool):
    folder.mkdir()
    base = {"name": "baseline", "method": "baseline", "status": "ok",
            "throughput": {"engine": "transformers-eager", "batches": {"1": {"tok_per_sec": tok}}}}
    q = {"name": "q", "method": "rtn", "status": "ok",
         "throughput": {"engine": "transformers-eager", "batches": {"1": {
             "tok_per_sec": tok * ratio[0], "contention": {"contended": contended, "max_others_cpu_share": 0.5}}}},
         "speed_ratio": {"ratio": ratio[0], "ratio_lo": ratio[1], "ratio_hi": ratio[2], "verdict": "slower",
                         "contention": {"contended": contended}}}
    (folder / "results.json").write_text(json.dumps({"variants": [base, q]}))
    return str(folder)


def test_overlap_and_flags(tmp_path, capsys):
    quiet = _run(tmp_path / "quiet", 30.0, (0.9, 0.88, 0.92), False)
    busy = _run(tmp_path / "busy", 12.0, (0.91, 0.86, 0.95), True)
    assert _module().main([quiet, busy]) == 0
    out = capsys.readouterr().out.splitlines()
    q = next(line for line in out if line.startswith("q "))
    assert "27.0" in q and "10.9!" in q and "0.910 [0.860, 0.950]!" in q and " yes " in q
    last = json.loads(out[-1])
    assert last["all_intervals_overlap"] is True and last["rows"][0]["intervals_overlap"] is None  # the baseline
    apart = _run(tmp_path / "apart", 30.0, (0.7, 0.68, 0.72), False)
    assert _module().main([quiet, apart]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["all_intervals_overlap"] is False
