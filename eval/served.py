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

This module is the stage: which rows to serve, their transformers references, one server at a time, the cache.
eval/served_setup.py says how a row is served and what its figures depend on; eval/served_row.py takes one row's
figures from its running server.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from compress import stop
from eval.pace import Pace
from eval.served_row import measure
from eval.served_setup import (env_vars, harness_flags, key, not_served, ppl_windows, reference_dtypes,
                               reference_inputs, row_label, runtime_not_here)

log = logging.getLogger("compress")


def _cached(measured: dict, runtime: str | None) -> tuple[dict, str | None]:
    """A row's cached vLLM figures and key in its eval/<variant>.json."""
    if runtime is None:
        return measured.get("vllm") or {}, measured.get("vllm_key")
    return ((measured.get("vllm_runtime") or {}).get(runtime) or {},
            (measured.get("vllm_runtime_keys") or {}).get(runtime))


def _still_too_slow(cached: dict, s) -> bool | None:
    """Whether a cached "too slow" row would be too slow again under the settings `s` (the key leaves out the
    probe's floor and timeout: they decide whether a row is measured, not its figures); None: not a too-slow row."""
    if cached.get("status") != "too slow":
        return None
    if not s.probe_floor():
        return False  # every row is measured now
    if cached.get("probe_timeout_s") is not None:
        return s.probe_timeout_s <= cached["probe_timeout_s"]
    if cached.get("probe_tok_per_sec_below") is not None:  # cut at the floor's deadline: a lower floor may pass it
        return s.probe_floor() >= cached["probe_tok_per_sec_below"]
    return (cached.get("probe_tok_per_sec") or 0) < s.probe_floor()


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
            if cached_key == vkey and _still_too_slow(cached, ev.vllm) is not False and not remeasure:
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
    # the baseline's decoder (the ratio's reference) is loaded for the whole stage; what the main pass took already
    # (eval/agreement.MainPass) is not computed again
    references: dict[str, tuple] = {}  # name: (tokenizer, {dtype: greedy, perplexity})
    reference_s: dict[str, float] = {}  # spent here
    main_pass_s: dict[str, float] = {}  # spent by the main pass, counted in the row's vLLM time as well
    inputs = reference_inputs(ev)
    for name in dict.fromkeys(n for n, _, _ in todo):
        if not_served(records[name]):
            continue
        t0 = time.perf_counter()
        with stop.stage(f"computing {name}'s transformers reference for vLLM"):
            tok = AutoTokenizer.from_pretrained(records[name]["checkpoint"])
            if ev.perplexity and ev.vllm.perplexity and ppl_ids is None:
                ppl_ids = tok((Path(ev.data_dir).expanduser() / ev.perplexity.file).read_text()).input_ids
            dtypes = reference_dtypes(records[name], run_dtype)
            stored = measured[name].get("vllm_reference") or {}
            have = {d: v for d, v in stored.get("by_dtype", {}).items() if d in dtypes} \
                if stored.get("inputs") == inputs else {}
            if have:
                main_pass_s[name] = stored.get("seconds") or 0.0
                log.info("stage vllm: %s in transformers, %s: taken by the main pass", name, " and ".join(have))
            missing = [d for d in dtypes if d not in have]
            if missing:
                log.info("stage vllm: %s in transformers, %s (greedy and perplexity, what vLLM is compared with)",
                         name, " and ".join(missing))
                have.update(agreement.reference(
                    Path(records[name]["checkpoint"]), [tok(p).input_ids for p in ev.selfcheck_prompts],
                    ev.vllm.agreement_tokens, missing, device, ppl_ids if ev.vllm.perplexity else None,
                    ev.perplexity, ppl_windows(ev) if ev.perplexity else None))
            references[name] = tok, have
        reference_s[name] = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="compress-vllm-"))
    pace = Pace("vllm", len(todo), spent_s=sum(reference_s.values()))
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
            result.update(engine=engine,  # the transformers reference's time included, once per checkpoint,
                          measure_seconds=round(time.perf_counter() - t0 + reference_s.pop(name, 0.0)
                                                + main_pass_s.pop(name, 0.0), 1))
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
