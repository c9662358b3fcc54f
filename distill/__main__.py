"""`python -m distill 'JSON'`: the student a compress run asks for, or with "estimate": true the measured seconds
per training step (`compress run --dry-run`). JSON arguments in, JSON result as the last line of stdout
(compress/worker.py runs it); the progress log goes to stderr.

    {"teacher": <recipe model: section>, "settings": <variant distill: section>, "folder": ".students/<key>",
     "device": "cpu", "dtype": "float32"}
"""

from __future__ import annotations

from pathlib import Path


def main(teacher: dict, settings: dict, device: str, dtype: str, folder: str | None = None,
         estimate: bool = False) -> dict:
    import torch

    from compress.load import load_model, resolve_source
    from compress.options import Distill, ModelSpec
    from distill import student

    cfg = Distill(**settings)
    if not estimate:
        info = student.finished(Path(folder))
        if info is not None:  # nothing to load
            return student.summary(info)
    source = resolve_source(ModelSpec(**teacher), prepare=True)
    model, tok = load_model(source, device, getattr(torch, dtype))
    if estimate:
        return student.estimate(model, cfg, device)
    _, info = student.build_student(model, tok, cfg, Path(folder), device, getattr(torch, dtype))
    return student.summary(info)


if __name__ == "__main__":
    from compress.worker import serve

    serve(main)
