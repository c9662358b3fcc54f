"""provenance.py: "Where the figures come from", for one run and for merged runs that differ."""

import json
import shutil
from pathlib import Path

from compress.report import merge_runs
from compress.report.provenance import provenance

FIXTURE_RUN = Path(__file__).resolve().parents[2] / "fixtures" / "run"
HEADINGS = ["Model", "Compute", "Size and compression", "Perplexity and KL", "Accuracy", "Throughput and memory",
            "Roofline"]


def _line(sections: dict[str, list[str]], heading: str, *values: str) -> str:
    """The one line of the section that holds every value."""
    (line,) = [l for l in sections[heading] if all(v in l for v in values)]
    return line


def test_every_measurement_says_how_it_was_taken():
    results = json.loads((FIXTURE_RUN / "results.json").read_text())
    sections = dict(provenance(results))
    assert list(sections) == HEADINGS
    assert _line(sections, "Model", "NOTE:").count("Q4_1-derived fp weights") == 1
    compute = _line(sections, "Compute", "device")
    assert "cpu (Intel(R) Xeon(R) Processor)" in compute and "dtype float32" in compute and "2 CPU threads" in compute
    for version in ("torch 2.13.0+cpu", "transformers 5.17.0", "llmcompressor 0.14.0.1", "lm_eval 0.4.9"):
        _line(sections, "Compute", "library versions", version)
    ppl = _line(sections, "Perplexity and KL", "`../shared/data/wikitext2_raw_test_docs.jsonl`")
    assert "512 tokens with stride 256" in ppl and "1,120 windows, 286,720 scored tokens" in ppl
    hellaswag = _line(sections, "Accuracy", "hellaswag:")
    for value in ("acc_norm", "`../shared/data/hellaswag_validation.jsonl`", "n = 500", "limit 500", "0-shot"):
        assert value in hellaswag, value
    throughput = _line(sections, "Throughput and memory", "engine transformers-eager on cpu")
    assert "median tok/s of 5 repeats" in throughput and "peak resident set size" in throughput
    ratios = _line(sections, "Throughput and memory", "× baseline tok/s: interleaved rounds")
    assert "8 rounds per row" in ratios and "no measurable difference" in ratios
    assert "more than 10% of the CPU time" in _line(sections, "Throughput and memory", "contention:")
    assert _line(sections, "Throughput and memory", "⚠ timed under contention").endswith(": gptq-w4a16.")
    assert "19.6 GB/s" in _line(sections, "Roofline", "memory bandwidth", "numpy copy")


def test_missing_measurements_say_so():
    results = json.loads((FIXTURE_RUN / "results.json").read_text())
    for rec in results["variants"]:
        for key in ("tasks", "throughput", "speed_ratio", "perplexity", "kl"):
            rec.pop(key, None)
    del results["bandwidth"], results["evaluation"]
    sections = dict(provenance(results))
    for heading in ("Perplexity and KL", "Accuracy", "Throughput and memory"):
        assert sections[heading] == ["not measured"], heading
    assert sections["Roofline"][0] == "memory bandwidth: not measured"


def test_merged_runs_say_what_differs_per_run_and_per_variant(tmp_path):
    for name in ("lab-a", "lab-b"):
        shutil.copytree(FIXTURE_RUN, tmp_path / name)
    data = json.loads((tmp_path / "lab-b" / "results.json").read_text())
    data["environment"]["torch"] = "2.12.0+cpu"  # run b was made with another torch; its variants (cached) were not
    data["variants"][2]["perplexity"]["context"] = 1024
    (tmp_path / "lab-b" / "results.json").write_text(json.dumps(data))
    sections = dict(provenance(merge_runs([tmp_path / "lab-a", tmp_path / "lab-b"])))
    # what both runs share is said once
    assert sum("NOTE: SmolLM2-135M-Instruct" in l for l in sections["Model"]) == 1
    assert "each run against its own baseline" in sections["Model"][-1]
    # what differs is said per run, and per variant where it differs from its run
    versions = [l for l in sections["Compute"] if "library versions" in l]
    assert [l.split(":")[0] for l in versions] == [f"run `{tmp_path / 'lab-a'}`", f"run `{tmp_path / 'lab-b'}`"]
    assert "torch 2.12.0+cpu" in versions[1] and "torch 2.13.0+cpu" in versions[0]
    built = [l for l in sections["Compute"] if "was built with" in l]
    assert len(built) == 4 and all(l.startswith("lab-b/") and l.endswith("torch 2.13.0+cpu") for l in built)
    ppl = [l for l in sections["Perplexity and KL"] if l.startswith("perplexity of")]
    assert len(ppl) == 2 and "windows of 1,024 tokens" in ppl[1] and ppl[1].endswith("(lab-b/gptq-w4a16)")


def test_a_cluster_run_says_where_each_task_ran():
    results = json.loads((FIXTURE_RUN / "results.json").read_text())
    results["cluster"] = {"engine": "ray", "address": "ray://head:10001", "dashboard": "http://head:8265",
                          "nodes": [{"node_id": "a"}, {"node_id": "b"}], "settings": {"cpus_per_variant": 4, "threads": 4}}
    rec = results["variants"][1]
    rec["cluster"] = {"address": "ray://head:10001",
                      "build": {"hostname": "gpu-3", "node_ip": "10.0.0.3", "pid": 41, "gpus": ["1"], "seconds": 12.5},
                      "measure": {"hostname": "gpu-4", "node_ip": "10.0.0.4", "pid": 77, "gpus": [], "seconds": 30}}
    sections = dict(provenance(results))
    line = _line(sections, "Compute", "Ray cluster")
    assert "`ray://head:10001`: 2 node(s), 4 CPU(s) and 4 torch thread(s) per task, dashboard http://head:8265" in line
    where = _line(sections, "Compute", f"{rec['name']}: build on")
    assert "build on gpu-3 (10.0.0.3, pid 41, GPU [1], 12.5 s); measure on gpu-4 (10.0.0.4, pid 77, 30 s)" in where


def test_each_task_says_how_its_stderr_was_computed():
    """Issue 26: lm-eval's bootstrap left out where a mean's analytic stderr is exact; the report says which."""
    results = json.loads((FIXTURE_RUN / "results.json").read_text())
    for rec in results["variants"]:
        if isinstance((rec.get("tasks") or {}).get("hellaswag"), dict):
            rec["tasks"]["hellaswag"]["stderr_method"] = "analytic: sample std / sqrt(n) of the per-item scores"
    hellaswag = _line(dict(provenance(results)), "Accuracy", "hellaswag:")
    assert hellaswag.endswith("stderr analytic: sample std / sqrt(n) of the per-item scores"), hellaswag
    assert _line(dict(provenance(results)), "Accuracy", "arc_easy:").endswith("± stderr")  # not recorded: no claim
