"""Served = measured: each checkpoint as vLLM serves it (eval/engines/vllm.py), and the figures taken from that
server, the way its users will run it.

Per variant, from one server started with the model card's own `vllm serve` line:
- **what vLLM computed**: the kernel it names in its log, and, from its own resolved layer attributes (the probe
  plugin, eval/engines/vllm_probe.py), the activation precision and GEMM of every group of linear layers, whether
  that is the checkpoint's own scheme, the CPU features that decided it, vLLM's thread binding and every switch
  compress set (eval/engines/vllm.OWN_SCHEME_ENV keeps a W4A16 checkpoint W4A16 on an AMX CPU);
- **agreement with transformers at the same precision** (eval/agreement.py): greedy tokens and perplexity against
  transformers running the same checkpoint in the served dtype, with the fp32 figures and the noise floor
  (transformers bf16 against fp32) beside; a row outside 1% perplexity or below half the floor is flagged;
- **serving sweep** in the style of `vllm bench serve` (eval/serving.py): TTFT and TPOT p50/p99, output tok/s,
  goodput under the recipe's SLO, and vLLM's own inter-token latency from /metrics beside the client's TPOT;
- **batch-1 decode against the roofline**: 1 / TPOT p50 at concurrency 1 against memory bandwidth / the bytes vLLM
  reads per token (the checkpoint's tensors, float ones at the served dtype);
- **ratio to the baseline**: batch-1 streamed decode interleaved A B / B A with the run's baseline in transformers
  (the main table's reference; eval/interleaved.py), with the same interval and contention rules as every ratio;
- optionally lm-eval's tasks through the server.

A recipe may also ask for **runtime variants** (evaluation.vllm.runtime_variants: a faster path of vLLM on this
hardware that changes the math, eval/engines/vllm.RUNTIME_PATHS): each is a second served row of the same
checkpoint, measured in full and labelled with its path, or a row that says why it does not apply here.
A variant vLLM cannot serve here is a row with vLLM's reason (the log's last error), never a crash of the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import time
from pathlib import Path

from compress import stop
from eval import contention
from eval.pace import Pace
from eval.serving import sweep

log = logging.getLogger("compress")

SERVED_FORMAT = 2  # bump when what a vLLM measurement holds changes (2: compute path, equal-precision reference)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": None}


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


def key(ev, record: dict, base: dict | None, env: dict, device: str, runtime: str | None = None) -> str:
    """What a row's vLLM figures depend on: its checkpoint, its serve line, the vLLM environment (and its probe),
    the settings, the runtime path, the perplexity windows and text, the self-check prompts, the ratio's settings and
    baseline, and its own lm-eval pass."""
    from eval.measure import ppl_file_digest

    blob = {"format": SERVED_FORMAT, "checkpoint": record["cache_key"], "serve": record.get("serve"),
            "engine": {k: env.get(k) for k in ("vllm", "torch", "build", "package", "probe")}, "device": device,
            # min_tok_per_sec decides whether a row is measured, not its figures: a "too slow" row is measured
            # again when the threshold drops below its probe (serve_all); runtime_variants adds rows, it does not
            # change this one; `tasks` names the rows whose lm-eval pass goes through vLLM: a row's key holds only
            # its own answer, so adding a row to that list measures that row again, not every other one
            "settings": ev.vllm.model_dump(exclude={"min_tok_per_sec", "tasks", "runtime_variants"}),
            "runtime": runtime, "prompts": ev.selfcheck_prompts,
            "perplexity": ev.perplexity.model_dump() if ev.perplexity else None, "ppl_file": ppl_file_digest(ev),
            "throughput": ev.throughput.model_dump() if ev.throughput else None,
            "baseline": base["cache_key"] if base else None,
            "tasks": (ev.tasks, ev.num_fewshot, ev.limit) if runs_tasks(ev, record["name"], runtime) else None}
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


def not_served(record: dict) -> str | None:
    """Why a row is not served by vLLM here (None: it is)."""
    if record.get("gguf"):
        return "a GGUF file: served by llama.cpp (its row), not by vLLM"
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


def served_weight_bytes(folder: Path, dtype: str) -> int:
    """Bytes of the checkpoint's tensors as vLLM holds them: integer and fp8 tensors as stored, float tensors at
    the served dtype (read from the safetensors headers; no tensor is loaded)."""
    size = _DTYPE_BYTES.get(dtype)
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(t["shape"]) if t["shape"] else 1
            stored = (t["data_offsets"][1] - t["data_offsets"][0])
            if size and t["dtype"] in ("F32", "BF16", "F16"):
                total += n * size
            else:
                total += stored
    return total


def perplexity(server, ids: list[int], ppl, windows: int | None) -> dict:
    """Perplexity from vLLM's prompt logprobs on the first `windows` of eval/perplexity.py's windows of `ids`."""
    from eval.perplexity import window_spans

    spans = window_spans(len(ids), ppl.context, ppl.stride, windows)
    nll, count = 0.0, 0
    for begin, end, first in spans:
        lps = server.prompt_logprobs(ids[begin:end])
        scored = lps[first - begin:end - begin]
        nll -= sum(scored)
        count += len(scored)
        stop.tick()
    return {"value": math.exp(nll / count), "tokens": count, "windows": len(spans), "context": ppl.context,
            "stride": ppl.stride}


def row_label(name: str, runtime: str | None) -> str:
    return name if runtime is None else f"{name} [{runtime}]"


def measure(server, *, ev, record: dict, tokenizer, ppl_ids, reference: dict, run_dtype: str,
            bandwidth: dict | None, base_decoder=None, runtime: str | None = None) -> dict:
    """Every vLLM figure of one row from its running `server` (see the module docstring). `reference`: transformers
    on the same checkpoint per dtype (eval/agreement.reference)."""
    from compress.environment import cpu_features
    from eval import agreement, throughput
    from eval.engines.vllm import binding, compute_path, declared_activations, kernels, layer_facts, open_decoder

    s = ev.vllm
    label = row_label(record["name"], runtime)
    log_text = server.log()
    out: dict = {"status": "ok", "load_s": server.load_s, "kernels": kernels(log_text), "cpu": cpu_features(),
                 "binding": binding(log_text)}
    out["compute_path"] = compute_path(layer_facts(log_text), declared_activations(quantization(server.folder)))
    if out["compute_path"]:
        log.info("stage vllm: %s computes %s (%s)", label, out["compute_path"]["label"],
                 "the checkpoint's own scheme" if out["compute_path"]["own_scheme"] else "NOT the checkpoint's scheme")
    if s.min_tok_per_sec:
        probe = {"prompt": tokenizer(ev.selfcheck_prompts[0]).input_ids, "max_tokens": 4, "min_tokens": 4,
                 "temperature": 0, "ignore_eos": True}
        server.stream(probe)  # the first request also pays the engine's lazy set-up
        sent, times, tokens = server.stream(probe)
        # the whole request, prompt included: FP8 emulated on a CPU spent minutes before its first token and then
        # streamed the rest fast, so a decode-only rate let it through to hours of measurement
        probe_tok_per_sec = tokens / (times[-1] - sent) if times and times[-1] > sent else 0.0
        out["probe_tok_per_sec"] = probe_tok_per_sec
        if probe_tok_per_sec < s.min_tok_per_sec:
            out["status"] = "too slow"
            out["reason"] = (f"served, but generates at {probe_tok_per_sec:.2f} tok/s here, prompt included (below "
                             f"min_tok_per_sec {s.min_tok_per_sec:g}; its kernel: "
                             f"{', '.join(out['kernels']) or 'dense GEMM'}): not measured further")
            log.warning("stage vllm: %s %s", label, out["reason"])
            return out
    dtype = served_dtype(server.flags, record.get("saved_dtype"))
    prompts = [tokenizer(p).input_ids for p in ev.selfcheck_prompts]
    got = [server.greedy(p, s.agreement_tokens) for p in prompts]
    served_ppl = perplexity(server, ppl_ids, ev.perplexity, ppl_windows(ev)) \
        if s.perplexity and ppl_ids is not None else None
    out.update(agreement.compare(got, served_ppl, reference, dtype, run_dtype))
    a, floor, p = out["agreement"], out.get("noise_floor"), out.get("perplexity")
    log.info("stage vllm: %s greedy agreement with %s: %s of %d tokens (noise floor %s); perplexity %s "
             "(transformers %s %s)", label, a["reference"], a["matched_tokens"], s.agreement_tokens,
             floor["matched_tokens"] if floor else "—", f"{p['value']:.3f}" if p else "—",
             p.get("transformers_dtype") if p else "", f"{p['transformers_value']:.3f}"
             if p and "transformers_value" in p else "—")
    for check in out["checks"]:
        log.warning("stage vllm: %s flagged: %s", label, check)

    pids = server.pids
    t = ev.throughput
    threshold = t.contention_threshold if t else contention.THRESHOLD
    out["sweep"] = sweep(server, pids, s, len(tokenizer), threshold, label=f"{label}: ")
    one = next((lv for lv in out["sweep"] if lv["concurrency"] == 1), None)
    if one and bandwidth:
        from transformers import AutoConfig

        from compress.planner import kv_bytes

        weight_bytes = served_weight_bytes(Path(record["checkpoint"]), dtype)
        kv_dtype_bytes = 1 if "fp8" in server.flags else (_DTYPE_BYTES.get(dtype) or 2)
        mean_context = s.prompt_tokens + s.output_tokens // 2
        kv = kv_bytes(AutoConfig.from_pretrained(record["checkpoint"]), mean_context, 1, kv_dtype_bytes)
        tok_per_sec = 1 / one["tpot_s_p50"]
        out["decode"] = {"tok_per_sec": tok_per_sec, "ttft_s": one["ttft_s_p50"], "dtype": dtype,
                         **throughput.roofline(weight_bytes, kv, bandwidth["bytes_per_sec"], tok_per_sec),
                         "kv_context_tokens": mean_context,
                         "bytes_note": "the checkpoint's tensors as vLLM holds them (float tensors at the served "
                                       "dtype) + the KV cache at the mean context (served dtype, fp8 with "
                                       "--kv-cache-dtype fp8)"}
        if "server_itl_s_mean" in one:
            out["decode"]["server_tok_per_sec"] = 1 / one["server_itl_s_mean"]
    if base_decoder is not None:
        from eval.interleaved import interleave
        from eval.throughput import PROMPT_SENTENCE, repeat_prompt

        a_run, a_info = base_decoder
        ids = repeat_prompt(tokenizer(PROMPT_SENTENCE, add_special_tokens=False).input_ids, s.prompt_tokens)
        b_run, _, b_info = open_decoder(server, prompt_ids=ids, new_tokens=s.ratio_new_tokens)
        ratio = interleave(a_run, b_run, new_tokens=s.ratio_new_tokens, rounds=s.ratio_rounds,
                           retries=t.retries if t else 0, threshold=threshold, pids=pids)
        out["speed_ratio"] = {**ratio, "baseline_engine": a_info, "engine": b_info,
                              "prompt_tokens": s.prompt_tokens, "new_tokens": s.ratio_new_tokens, "batch": 1}
        log.info("stage vllm: %s %.3fx the baseline in transformers [%.3f, %.3f] (%s)%s", label,
                 ratio["ratio"], ratio["ratio_lo"], ratio["ratio_hi"], ratio["verdict"],
                 ", CONTENDED" if ratio["contention"]["contended"] else "")
    if runs_tasks(ev, record["name"], runtime):
        from eval.accuracy import run_tasks_served

        t0 = time.perf_counter()
        try:
            with stop.stage(f"measuring {label}'s tasks through vLLM (lm-eval)"):
                out["tasks"] = run_tasks_served(f"http://127.0.0.1:{server.port}/v1/completions", server.name,
                                                Path(record["checkpoint"]), ev.tasks,
                                                Path(ev.data_dir).expanduser(), num_fewshot=ev.num_fewshot,
                                                limit=ev.limit)
        except Exception as e:  # the other vLLM figures stand; the tasks say why they are missing
            out["tasks_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            log.warning("stage vllm: %s tasks through vLLM failed: %s", label, out["tasks_error"])
            return out
        out["tasks_seconds"] = time.perf_counter() - t0
        log.info("stage vllm: %s tasks through vLLM in %.0f s: %s", label, out["tasks_seconds"],
                 ", ".join(f"{t} {100 * x['value']:.1f}" for t, x in out["tasks"].items()))
    return out


def _cached(measured: dict, runtime: str | None) -> tuple[dict, str | None]:
    """A row's cached vLLM figures and key in its eval/<variant>.json."""
    if runtime is None:
        return measured.get("vllm") or {}, measured.get("vllm_key")
    return ((measured.get("vllm_runtime") or {}).get(runtime) or {},
            (measured.get("vllm_runtime_keys") or {}).get(runtime))


def _store(measured: dict, runtime: str | None, result: dict, vkey: str) -> dict:
    if runtime is None:
        return {**measured, "vllm": result, "vllm_key": vkey}
    return {**measured, "vllm_runtime": {**(measured.get("vllm_runtime") or {}), runtime: result},
            "vllm_runtime_keys": {**(measured.get("vllm_runtime_keys") or {}), runtime: vkey}}


def serve_all(recipe, output: Path, records: dict[str, dict], measured: dict[str, dict], names: list[str],
              base_name: str | None, device: str, dtype, remeasure: bool = False, on_row=None) -> None:
    """The vLLM stage of eval/measure.evaluate_run: every ok variant served and measured (baseline first), then its
    runtime variants; each row's result cached in eval/<variant>.json under its own key (`key`), its server log
    kept as eval/<variant>[.<runtime>].vllm.log; `on_row(measured, base_name, stage)` after each row (the run
    rewrites results.json and the report). Each row is a stage of compress/stop.py's watchdog: one that stalls is
    a failed row."""
    import shutil
    import tempfile
    import traceback

    from transformers import AutoTokenizer

    from compress import ownership
    from compress.environment import cpu_features
    from compress.resources import one_line
    from eval import agreement
    from eval.engines import vllm, vllm_env

    ev = recipe.evaluation
    env = vllm_env.ensure(device)
    engine = {k: v for k, v in env.items() if k not in ("path", "python")}
    base = records.get(base_name) if base_name else None
    run_dtype = str(dtype).removeprefix("torch.")
    cpu = cpu_features()
    todo = []
    for name in names:
        for runtime in (None, *ev.vllm.runtime_for(name)):
            vkey = key(ev, records[name], base, env, device, runtime)
            cached, cached_key = _cached(measured[name], runtime)
            still_valid = (cached.get("status") != "too slow"
                           or (cached.get("probe_tok_per_sec") or 0) < ev.vllm.min_tok_per_sec)
            if cached_key == vkey and still_valid and not remeasure:
                log.info("stage vllm: %s unchanged, reusing its vLLM figures", row_label(name, runtime))
                continue
            todo.append((name, runtime, vkey))
    if not todo:
        return
    base_decoder, ppl_ids, bandwidth = None, None, None

    def server_for(record: dict, runtime: str | None, log_name: str):
        flags = vllm.served_flags(record["serve"])
        return vllm.Server(env, Path(record["checkpoint"]), flags, name=record["name"], log_path=tmp / log_name,
                           extra_flags=harness_flags(ev.vllm), env_vars=env_vars(ev.vllm, env, runtime),
                           ready_timeout_s=ev.vllm.ready_timeout_s)

    # transformers' side of each row's agreement first (the served dtype and the run's), one model at a time, before
    # the baseline's decoder (the ratio's reference) is loaded for the whole stage
    references: dict[str, tuple] = {}  # name: (tokenizer, {dtype: greedy, perplexity})
    reference_s: dict[str, float] = {}
    for name in dict.fromkeys(n for n, _, _ in todo):
        if not_served(records[name]):
            continue
        t0 = time.perf_counter()
        with stop.stage(f"computing {name}'s transformers reference for vLLM"):
            tok = AutoTokenizer.from_pretrained(records[name]["checkpoint"])
            if ev.perplexity and ev.vllm.perplexity and ppl_ids is None:
                ppl_ids = tok((Path(ev.data_dir).expanduser() / ev.perplexity.file).read_text()).input_ids
            dtypes = list(dict.fromkeys([served_dtype(vllm.served_flags(records[name]["serve"]),
                                                      records[name].get("saved_dtype")), run_dtype]))
            dtypes = [d if d != "auto" else run_dtype for d in dtypes]
            log.info("stage vllm: %s in transformers, %s (greedy and perplexity, what vLLM is compared with)", name,
                     " and ".join(dict.fromkeys(dtypes)))
            references[name] = tok, agreement.reference(
                Path(records[name]["checkpoint"]), [tok(p).input_ids for p in ev.selfcheck_prompts],
                ev.vllm.agreement_tokens, list(dict.fromkeys(dtypes)), device,
                ppl_ids if ev.vllm.perplexity else None, ev.perplexity, ppl_windows(ev) if ev.perplexity else None)
        reference_s[name] = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="compress-vllm-"))
    pace = Pace("vllm", len(todo))
    try:
        for name, runtime, vkey in todo:
            record = records[name]
            label = row_label(name, runtime)
            log_rel = f"eval/{name}.vllm.log" if runtime is None else f"eval/{name}.{runtime}.vllm.log"
            result: dict | None = None
            server = None
            t0 = time.perf_counter()
            if reason := not_served(record):
                log.info("stage vllm: %s not served: %s", label, reason)
                result = {"status": "skipped", "reason": reason}
            elif runtime is not None and (reason := runtime_not_here(runtime, record, cpu, env.get("build"))):
                log.info("stage vllm: %s not measured: %s", label, reason)
                result = {"status": "skipped", "reason": reason, "cpu": cpu}
            else:
                tok, reference = references[name]
                if bandwidth is None:
                    bandwidth = measured[name].get("bandwidth")
                if bandwidth is None:
                    from eval.throughput import measure_bandwidth

                    bandwidth = measure_bandwidth(device="cpu")
                if base is not None and base_decoder is None:
                    base_decoder = _transformers_decoder(base, ev.vllm, dtype, device)
                server = server_for(record, runtime, Path(log_rel).name)
                log.info("stage vllm: serving %s: %s", label, " ".join(server.command[3:]))
                try:
                    with stop.stage(f"serving {label} in vLLM"):
                        server.start()
                        log.info("stage vllm: %s ready in %.0f s (kernels: %s)", label, server.load_s,
                                 ", ".join(vllm.kernels(server.log())) or "plain GEMM")
                        result = measure(server, ev=ev, record=record, tokenizer=tok, ppl_ids=ppl_ids,
                                         reference=reference, run_dtype=run_dtype, bandwidth=bandwidth,
                                         base_decoder=base_decoder, runtime=runtime)
                except vllm.ServerFailed as e:
                    log.warning("stage vllm: %s not served: %s", label, e)
                    result = {"status": "failed", "reason": str(e)}
                except Exception as e:  # one row's failure is its row, never the run's
                    reason = one_line(e, output)
                    if death := vllm.worker_death(server.log()):  # the cause, not the 500 it became
                        reason = f"{death} while it was measured ({reason})"
                    log.warning("stage vllm: %s failed: %s", label, reason)
                    log.debug("traceback:\n%s", traceback.format_exc())
                    result = {"status": "failed", "reason": reason}
                finally:  # also on SystemExit (SIGTERM) and KeyboardInterrupt: no server outlives the run
                    server.stop()
                result.update(serve_command=record["serve"], harness_flags=server.extra_flags,
                              env_vars=server.env_vars, log=log_rel)
                ownership.write_owned(output, log_rel, server.log())
            if runtime is not None:
                result["runtime"] = runtime
            result.update(engine=engine,  # the transformers reference's time included, once per checkpoint
                          measure_seconds=round(time.perf_counter() - t0 + reference_s.pop(name, 0.0), 1))
            measured[name] = _store(measured[name], runtime, result, vkey)
            ownership.write_owned(output, f"eval/{name}.json", json.dumps(measured[name], indent=2) + "\n")
            pace.row_done(label)
            if on_row is not None:
                on_row(measured, base_name, f"served {label} in vLLM")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _transformers_decoder(base: dict, s, dtype, device: str):
    """The run's baseline in transformers as a batch-1 decoder (one_run, info) on the benchmark prompt: the reference
    of every vLLM row's interleaved ratio, as it is of the main table's (one reference for every engine)."""
    from eval.engines import transformers as hf

    one_run, _, info = hf.open_decoder(base["checkpoint"], prompt_tokens=s.prompt_tokens, new_tokens=s.ratio_new_tokens,
                                       device=device, dtype=str(dtype).removeprefix("torch."))
    return one_run, info
