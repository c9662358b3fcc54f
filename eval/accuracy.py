"""Task accuracy with lm-eval, offline, on the saved checkpoint. The only module that imports lm-eval.

Task configs live in `eval/tasks/*.yaml`: lm-eval's own prompts, choices and metrics, reading local JSON files
(`dataset_path: json`) instead of the hub. Their `data_files` name a file only; it is resolved against the recipe's
`evaluation.data_dir` here, so the YAMLs stay portable. Local tasks carry a `_local` suffix because asking lm-eval
for its built-in names makes it go to the hub.

Every score comes with lm-eval's stderr and with the per-item scores in document order, which the recovery
bootstrap pairs across variants (every variant sees the same documents).
"""

from __future__ import annotations

import os
from pathlib import Path

from compress.options import InputError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# how the transformers pass scored a task (evaluation.task_scorer), as the report says it
SCORERS = {
    "shared-context": "scored with each context run once for all its choices (eval/shared_context.py; the same "
                      "requests and arithmetic as lm-eval's loop, fewer tokens)",
    "lm-eval": "scored by lm-eval's own loop (one sequence per choice)",
}


def available_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_config(task: str, data_dir: Path) -> dict:
    """The lm-eval config dict for one local task, with its data files made absolute. Raises InputError."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = TASKS_DIR / f"{task}.yaml"
    if not path.is_file():
        raise InputError(f"evaluation.tasks: unknown task {task!r}; expected one of {available_tasks()}")
    cfg = load_yaml(path)
    files = cfg["dataset_kwargs"]["data_files"]
    for split, name in files.items():
        full = (data_dir / name).resolve()
        if not full.is_file():
            raise InputError(f"evaluation.data_dir: {full} not found (task {task!r} reads {name})")
        files[split] = str(full)
    return cfg


def primary_metric(cfg: dict) -> str:
    return cfg["metadata"]["primary_metric"]


def run_tasks(model, tokenizer, tasks: list[str], data_dir: Path, *, num_fewshot: int, limit: int | None,
              batch_size: int, device: str, scorer: str = "shared-context") -> dict:
    """Evaluate `model` (already loaded from the saved checkpoint) on local tasks; `scorer` (evaluation.task_scorer):
    "shared-context" scores each context once for all its continuations (eval/shared_context.py), "lm-eval" with
    lm-eval's own loop.

    Returns {task: {"metric", "value", "stderr", "n", "limit", "num_fewshot", "file", "items", "scorer"}} where
    items are the per-document scores of the primary metric in doc_id order.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    lm_class = _shared_context_lm(HFLM) if scorer == "shared-context" else HFLM
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    scores = _evaluate(lm, tasks, data_dir, num_fewshot=num_fewshot, limit=limit)
    return {t: {**s, "scorer": scorer} for t, s in scores.items()}


def _shared_context_lm(hflm):
    """lm-eval's HFLM with its log-likelihood loop replaced by eval/shared_context.score_requests (the same
    requests, as lm-eval tokenized them, answered in the same order). A request longer than the model's window takes
    lm-eval's own loop, which truncates it as lm-eval does."""
    from eval.shared_context import score_requests

    class SharedContextLM(hflm):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if self.backend != "causal" or any(len(c) + len(k) > self.max_length + 1 for _, c, k in requests):
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            out = score_requests(self.model, [(c, k) for _, c, k in requests], pad_id=0,
                                 batch_requests=override_bs or self.batch_size)
            for (key, _, _), answer in zip(requests, out, strict=True):
                self.cache_hook.add_partial("loglikelihood", key, answer)
            return out

    return SharedContextLM


def run_tasks_served(url: str, model_name: str, tokenizer_folder: Path, tasks: list[str], data_dir: Path, *,
                     num_fewshot: int, limit: int | None, concurrent: int, batch_size: int) -> dict:
    """The same tasks through a running OpenAI-compatible server (vLLM's), with lm-eval's `local-completions`
    model: token-id prompts (the checkpoint's own tokenizer), loglikelihoods from the server's echoed prompt
    logprobs, `concurrent` requests in flight of `batch_size` prompts each, so the server batches them (and its
    prefix cache shares a question's context across its answer choices). Same output as `run_tasks`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=url, model=model_name, tokenizer=str(tokenizer_folder),
                             tokenizer_backend="huggingface", num_concurrent=concurrent, batch_size=batch_size,
                             max_retries=3, tokenized_requests=True, max_length=2048)
    return _evaluate(lm, tasks, data_dir, num_fewshot=num_fewshot, limit=limit)


# the standard error of a primary metric that is not a mean of per-item scores (wikitext's word perplexity) is
# lm-eval's bootstrap with this many resamples, in this process (DISABLE_MULTIPROC): a fraction of a second for a
# task's items (benchmarks/lm_eval_bootstrap.py; benchmarks/results/lm_eval_bootstrap.txt)
BOOTSTRAP_ITERS = 1000


def stderr_method(cfg: dict) -> str:
    """How a task's primary metric gets its standard error: 'analytic' for a mean of per-item scores (every
    accuracy), 'bootstrap' otherwise."""
    metric = primary_metric(cfg)
    agg = next((m.get("aggregation") for m in cfg.get("metric_list", []) if m["metric"] == metric), None)
    return "analytic" if agg == "mean" else "bootstrap"


def _evaluate(lm, tasks: list[str], data_dir: Path, *, num_fewshot: int, limit: int | None) -> dict:
    """lm-eval's simple_evaluate of `lm` on the local tasks, reduced to each task's primary metric and items.

    Standard errors: a mean's is analytic, lm-eval's own `mean_stderr` (sample standard deviation / sqrt(n)) of the
    per-item scores, the figure lm-eval itself reports for it. lm-eval's bootstrap runs only when a primary metric
    needs it, and then in this process: lm-eval bootstraps in a forked multiprocessing pool by default (for
    lambada's perplexity, a metric compress does not report), and that pool is what hung the lab (issue 26); in
    process it costs a fraction of a second at this size (benchmarks/results/lm_eval_bootstrap.txt)."""
    from lm_eval import simple_evaluate
    from lm_eval.api.metrics import mean_stderr

    os.environ["DISABLE_MULTIPROC"] = "1"  # lm-eval's switch: bootstrap in this process, never in a forked pool
    configs = [task_config(t, data_dir) for t in tasks]
    methods = [stderr_method(cfg) for cfg in configs]
    out = simple_evaluate(model=lm, tasks=configs, num_fewshot=num_fewshot, limit=limit, log_samples=True,
                          bootstrap_iters=BOOTSTRAP_ITERS if "bootstrap" in methods else 0, random_seed=0,
                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    scores = {}
    for task, cfg, method in zip(tasks, configs, methods, strict=True):
        name = cfg["task"]
        metric = primary_metric(cfg)
        res = out["results"][name]
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        items = [float(s[metric]) for s in samples] if metric != "word_perplexity" else []
        stderr = mean_stderr(items) if method == "analytic" and len(items) > 1 else res.get(f"{metric}_stderr,none")
        scores[task] = {
            "metric": metric,
            "value": float(res[f"{metric},none"]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "stderr_method": (f"{method}: " + ("sample std / sqrt(n) of the per-item scores (lm-eval's mean_stderr)"
                                               if method == "analytic" else
                                               f"lm-eval's bootstrap, {BOOTSTRAP_ITERS} resamples, in process")),
            "n": int(out["n-samples"][name]["effective"]),
            "limit": limit,
            "num_fewshot": num_fewshot,
            "file": ", ".join(cfg["dataset_kwargs"]["data_files"].values()),
            "items": items,
        }
    return scores
