"""How each row is served in the vLLM stage (eval/served.py), and what its vLLM figures depend on.

A row is served with its model card's own `vllm serve` line, plus what the harness adds (`harness_flags`) and every
environment switch compress sets (`env_vars`); `key` names everything its figures depend on, so a rerun serves
only what changed. `not_served` and `runtime_not_here` say, in one sentence each, why a row or a runtime path is
not measured here; the report prints them in the row's place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SERVED_FORMAT = 2  # bump when what a vLLM measurement holds changes (2: compute path, equal-precision reference)


def served_dtype(flags: list[str], saved_dtype: str | None) -> str:
    """The dtype vLLM computes in: the card's --dtype, else the checkpoint's own."""
    if "--dtype" in flags:
        return flags[flags.index("--dtype") + 1]
    return saved_dtype or "auto"


def harness_flags(settings) -> list[str]:
    """What the harness adds to the card's serve line (the report lists it apart from the card's flags)."""
    return ["--enforce-eager"] if settings.eager else []


def env_vars(settings, env: dict, runtime: str | None = None) -> dict:
    """Every environment switch of a server compress starts: on a CPU build the KV-cache space, the checkpoint's
    own scheme (OWN_SCHEME_ENV) and the probe, then the runtime path's own switches."""
    from eval.engines.vllm import OWN_SCHEME_ENV, RUNTIME_PATHS

    out = {}
    if env.get("build") == "cpu":
        out = {"VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_space_gb), **OWN_SCHEME_ENV}
        if settings.cpu_threads_bind == "all":
            out["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
            out["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        elif settings.cpu_threads_bind != "auto":
            out["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads_bind
    if runtime is not None:
        out.update(RUNTIME_PATHS[runtime].env)
    return out


# the lm-eval client's settings: part of the key of the rows whose tasks go through vLLM, of no other row's
TASK_CLIENT = ("tasks_concurrency", "tasks_batch_size")


def key(ev, record: dict, base: dict | None, env: dict, device: str, runtime: str | None = None) -> str:
    """What a row's vLLM figures depend on: its checkpoint, its serve line, the vLLM environment (and its probe),
    the settings, the runtime path, the perplexity windows and text, the self-check prompts, the ratio's settings and
    baseline, and its own lm-eval pass."""
    from eval.perplexity import ppl_file_digest

    blob = {"format": SERVED_FORMAT, "checkpoint": record["cache_key"], "serve": record.get("serve"),
            "engine": {k: env.get(k) for k in ("vllm", "torch", "build", "package", "probe")}, "device": device,
            # min_tok_per_sec and probe_timeout_s decide whether a row is measured, not its figures: a "too slow"
            # row is measured again when they would let it through (serve_all); runtime_variants adds rows, it does not
            # change this one; `tasks` names the rows whose lm-eval pass goes through vLLM: a row's key holds only
            # its own answer, so adding a row to that list measures that row again, not every other one
            "settings": ev.vllm.model_dump(exclude={"min_tok_per_sec", "probe_timeout_s", "tasks",
                                                    "runtime_variants", *TASK_CLIENT}),
            "runtime": runtime, "prompts": ev.selfcheck_prompts,
            "perplexity": ev.perplexity.model_dump() if ev.perplexity else None, "ppl_file": ppl_file_digest(ev),
            "throughput": ev.throughput.model_dump() if ev.throughput else None,
            "baseline": base["cache_key"] if base else None,
            "tasks": (ev.tasks, ev.num_fewshot, ev.limit, *(getattr(ev.vllm, k) for k in TASK_CLIENT))
            if runs_tasks(ev, record["name"], runtime) else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def runs_tasks(ev, name: str, runtime: str | None = None) -> bool:
    """Whether variant `name` also runs evaluation.tasks through its vLLM server (evaluation.vllm.tasks: true for
    every row, or the rows named); a runtime variant's row never does (one lm-eval pass per checkpoint)."""
    t = ev.vllm.tasks
    return runtime is None and bool(ev.tasks) and (t is True or (isinstance(t, list) and name in t))


def ppl_windows(ev) -> int | None:
    """How many perplexity windows vLLM scores: the evaluation's, capped by vllm.perplexity_windows."""
    caps = [w for w in (ev.perplexity.max_windows, ev.vllm.perplexity_windows) if w]
    return min(caps) if caps else None


def reference_dtypes(record: dict, run_dtype: str) -> list[str]:
    """The dtypes transformers runs a served row's checkpoint in for its agreement (eval/agreement.py): the one vLLM
    computes in, then the run's."""
    from eval.engines.vllm import served_flags

    dtypes = [served_dtype(served_flags(record["serve"]), record.get("saved_dtype")), run_dtype]
    return list(dict.fromkeys(d if d != "auto" else run_dtype for d in dtypes))


def reference_inputs(ev) -> str:
    """What a row's transformers reference depends on beside its checkpoint: the prompts, the greedy length, the
    perplexity windows and text. The main pass (eval/measure.py) stores the reference it took under this digest; the
    vLLM stage uses it only while the digest is still the evaluation's."""
    from eval.perplexity import ppl_file_digest

    blob = {"prompts": ev.selfcheck_prompts, "tokens": ev.vllm.agreement_tokens,
            "perplexity": ev.perplexity.model_dump() if ev.perplexity and ev.vllm.perplexity else None,
            "windows": ppl_windows(ev) if ev.perplexity else None, "ppl_file": ppl_file_digest(ev)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def not_served(record: dict) -> str | None:
    """Why a row is not served by vLLM here (None: it is)."""
    from eval.engines import engine_of

    if reason := engine_of(record).not_served_by_vllm:
        return reason
    kv = record.get("kv_cache")
    if kv and not record.get("kv_in_checkpoint"):
        return f"vLLM has no {kv['dtype']} KV cache (the row's KV format is simulated in transformers)"
    if record.get("bnb"):
        return "bitsandbytes checkpoints are served by vLLM on CUDA only"
    return None


def quantization(folder: Path) -> dict | None:
    """The checkpoint's quantization_config (config.json), what vLLM reads to pick its kernels."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None


def runtime_not_here(runtime: str, record: dict, cpu: dict, build: str) -> str | None:
    """Why a runtime path does not apply to this row on this machine (None: it does), in one sentence."""
    from eval.engines.vllm import RUNTIME_PATHS

    path = RUNTIME_PATHS[runtime]
    if build != "cpu":
        return f"{runtime} is a path of vLLM's CPU build; this row is served by its {build} build"
    if not path.applies(quantization(Path(record["checkpoint"]))):
        return f"{runtime} changes {path.applies_to} checkpoints; this one is {record.get('scheme')}"
    if not set(path.cpu_flags) & set(cpu.get("flags") or []):
        return (f"{runtime} needs {path.needs} ({' or '.join(path.cpu_flags)}); this CPU ({cpu.get('model')}) has "
                f"{', '.join(cpu.get('flags') or []) or 'none of the deciding flags'}")
    return None


def row_label(name: str, runtime: str | None) -> str:
    return name if runtime is None else f"{name} [{runtime}]"
