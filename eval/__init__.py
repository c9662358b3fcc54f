"""eval/: measuring what compress/ built. Each module measures one thing of a saved checkpoint:

    measure.py      the loop: every variant's figures, cached per variant in <output>/eval/<variant>.json
    perplexity.py   token perplexity and KL to the baseline on the same windows
    accuracy.py     lm-eval tasks (tasks/*.yaml: local data, no hub)
    recovery.py     task score vs the baseline, with a paired bootstrap interval
    throughput.py   memory bandwidth, decode timing statistics, the roofline
    interleaved.py  speed ratios from alternating rounds of two checkpoints, with a distribution-free interval
    contention.py   the CPU time other processes (and the hypervisor) took around each timed run
    kvcache.py      KV-cache formats applied as each key and value enters the cache
    engines/        transformers and llama.cpp: loading, logits, the decode benchmark

It depends on compress/ (options, ownership, the model loading helpers), never the reverse except at the top: the
run (compress/run.py) calls measure.evaluate_run.
"""
