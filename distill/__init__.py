"""Distillation: a smaller student from the teacher, trained to imitate it, shipped like any other variant.

The pipeline is visible in the file names:

1. `prune.py`  - measure each decoder layer's block influence on the training text, drop the least important layers
                 (or the ones the recipe lists): the student is the teacher with fewer layers, same tokenizer, a
                 normal Hugging Face model of the same architecture.
2. `train.py`  - logit distillation in plain PyTorch: KL(teacher || student) at a temperature, optionally mixed
                 with cross-entropy on the text; AdamW, warm-up + cosine, gradient clipping and accumulation;
                 resumable checkpoints.
3. `student.py` - build (or reuse from its cache) the student a variant asks for, so "distilled" and
                 "distilled + W4A16" train it once.
4. `__main__.py` - `python -m distill`: how a compress run asks for a student (or times a training step for
                 `compress plan`). distill/ depends on compress/ (options, model loading, calibration text), never
                 the other way round, so compress reaches it through this command, as it reaches llama.cpp's
                 converter.

Why depth pruning then distillation: removing whole layers shrinks size and decode latency in proportion, with no
special kernels; the layers whose output is most similar to their input (low block influence) change the residual
stream least, so removing them costs least (ShortGPT, Men et al. 2024). What they did still matters, and a short
logit-distillation run lets the remaining layers take it over (Minitron, Muralidharan et al. 2024).
"""
