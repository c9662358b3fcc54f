"""The engines a checkpoint is measured in. Each module loads a checkpoint its own way and gives the same three
things: logits for a token window (perplexity, KL), a model lm-eval can score, and a decode benchmark whose dict has
the same keys in every engine (eval/throughput.py computes the statistics).

- transformers.py: any Hugging Face checkpoint (compressed-tensors decompresses on load), the run's device.
- llamacpp.py: GGUF files, with llama.cpp's own kernels (CPU).

Adding an engine = one module here with `load`/`decode_benchmark`, plus the line in eval/measure.py that picks it
for the records it serves (README: "How to add a method or an engine").
"""
