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
              batch_size: int, device: str) -> dict:
    """Evaluate `model` (already loaded from the saved checkpoint) on local tasks.

    Returns {task: {"metric", "value", "stderr", "n", "limit", "num_fewshot", "file", "items"}} where items are
    the per-document scores of the primary metric in doc_id order.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    return _evaluate(lm, tasks, data_dir, num_fewshot=num_fewshot, limit=limit)


def run_tasks_served(url: str, model_name: str, tokenizer_folder: Path, tasks: list[str], data_dir: Path, *,
                     num_fewshot: int, limit: int | None, concurrent: int = 4) -> dict:
    """The same tasks through a running OpenAI-compatible server (vLLM's), with lm-eval's `local-completions`
    model: token-id prompts (the checkpoint's own tokenizer), loglikelihoods from the server's echoed prompt
    logprobs, `concurrent` requests in flight so the server batches them (and its prefix cache shares a question's
    context across its answer choices). Same output as `run_tasks`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=url, model=model_name, tokenizer=str(tokenizer_folder),
                             tokenizer_backend="huggingface", num_concurrent=concurrent, max_retries=3,
                             tokenized_requests=True, max_length=2048)
    return _evaluate(lm, tasks, data_dir, num_fewshot=num_fewshot, limit=limit)


def _evaluate(lm, tasks: list[str], data_dir: Path, *, num_fewshot: int, limit: int | None) -> dict:
    """lm-eval's simple_evaluate of `lm` on the local tasks, reduced to each task's primary metric and items."""
    from lm_eval import simple_evaluate

    configs = [task_config(t, data_dir) for t in tasks]
    out = simple_evaluate(model=lm, tasks=configs, num_fewshot=num_fewshot, limit=limit, log_samples=True,
                         bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                         fewshot_random_seed=0)
    scores = {}
    for task, cfg in zip(tasks, configs, strict=True):
        name = cfg["task"]
        metric = primary_metric(cfg)
        res = out["results"][name]
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        items = [float(s[metric]) for s in samples] if metric != "word_perplexity" else []
        stderr = res.get(f"{metric}_stderr,none")
        scores[task] = {
            "metric": metric,
            "value": float(res[f"{metric},none"]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "n": int(out["n-samples"][name]["effective"]),
            "limit": limit,
            "num_fewshot": num_fewshot,
            "file": ", ".join(cfg["dataset_kwargs"]["data_files"].values()),
            "items": items,
        }
    return scores
