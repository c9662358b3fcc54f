"""Two runs of the same recipe (e.g. before and after a change to compress): are they the same?

    python benchmarks/compare_runs.py runs/a runs/b

Per variant both runs have: the weight files' sha256 (from each manifest), and every figure that does not depend on
timing (perplexity, KL with its stderr, top-1, task scores with stderr, recovery with CI, KV memory, GGUF types and
self-check, calibration record, the distillation summary without its timings) compared exactly. Timed figures
(batch-1 tok/s, compress seconds) are printed side by side, not compared: they need interleaved measurement.
One JSON line per variant, then ALL_EQUAL or DIFFER.
"""
import json, sys
from pathlib import Path

old, new = Path(sys.argv[1]), Path(sys.argv[2])
ro = {r["name"]: r for r in json.loads((old / "results.json").read_text())["variants"]}
rn = {r["name"]: r for r in json.loads((new / "results.json").read_text())["variants"]}

def weights(folder):
    m = json.loads((folder / "manifest.json").read_text())
    return {k: v["sha256"][:12] for k, v in m["files"].items() if k.endswith((".safetensors", ".gguf"))}

def det(r):
    out = {"status": r["status"], "weights_bytes": r.get("weights_bytes"), "selfcheck": r.get("selfcheck_max_abs_diff"),
           "ppl": (r.get("perplexity") or {}).get("value"), "kl": (r.get("kl") or {}).get("mean"),
           "kl_se": (r.get("kl") or {}).get("stderr"), "top1": (r.get("kl") or {}).get("top1_agreement"),
           "tasks": {t: (s["value"], s.get("stderr")) for t, s in (r.get("tasks") or {}).items()},
           "recovery": {t: (s["pct"], s.get("ci95")) for t, s in (r.get("recovery") or {}).items()},
           "kv_memory": r.get("kv_memory"), "gguf_types": (r.get("gguf") or {}).get("types"),
           "gguf_selfcheck": {k: v for k, v in (r.get("selfcheck") or {}).items()},
           "calibration": {k: v for k, v in (r.get("calibration") or {}).items()},
           "distill": {k: v for k, v in (r.get("distill") or {}).items()
                       if k not in ("train_seconds", "importance_seconds", "tok_per_sec_median", "cached")}}
    return out

rows, same_all = [], True
for name in ro:
    if name not in rn:
        continue
    a, b = ro[name], rn[name]
    wa = weights(Path(a["checkpoint"])) if a["status"] == "ok" else {}
    wb = weights(Path(b["checkpoint"])) if b["status"] == "ok" else {}
    da, db = det(a), det(b)
    diffs = [k for k in da if da[k] != db[k]]
    same = wa == wb and not diffs
    same_all &= same
    ta = ((a.get("throughput") or {}).get("batches") or {}).get("1", {}).get("tok_per_sec")
    tb = ((b.get("throughput") or {}).get("batches") or {}).get("1", {}).get("tok_per_sec")
    rows.append({"variant": name, "weights_sha256_equal": wa == wb and bool(wa), "figures_equal": not diffs,
                 "differing": diffs, "ppl": (da["ppl"], db["ppl"]), "kl": (da["kl"], db["kl"]),
                 "avg_task": (sum(v[0] for v in da["tasks"].values()) / max(1, len(da["tasks"])),
                              sum(v[0] for v in db["tasks"].values()) / max(1, len(db["tasks"]))),
                 "tok_per_sec_b1_old_new": (ta, tb), "compress_s_old_new": (a.get("compress_seconds"), b.get("compress_seconds"))})
for r in rows:
    print(json.dumps(r))
print("ALL_EQUAL" if same_all else "DIFFER", len(rows), "variants compared")
