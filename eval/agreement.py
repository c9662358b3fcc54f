"""Does a served row compute what transformers computes? The reference a vLLM row is compared with, at the precision
vLLM ran it in, and the noise floor that says how much disagreement rounding alone makes.

vLLM serves the lab's checkpoints in bf16 (the model card's `--dtype bfloat16`), while the main table measures
them in fp32. Comparing vLLM's bf16 with transformers' fp32 mixes two things: the engine, and the dtype. So each
row's reference is transformers running the *same checkpoint in the served dtype*, with the fp32 figures kept
beside. Two figures:

- **perplexity** on the first windows of eval/perplexity.py's (the ones vLLM scores from its prompt logprobs): a
  correct engine at the same precision agrees within a fraction of a percent; the report flags a row whose vLLM
  perplexity is more than `PPL_TOLERANCE` away from transformers' at the served dtype;
- **greedy agreement**: tokens matched before the first divergence, per prompt. Greedy text parts early even when
  perplexity agrees to a fraction of a percent (benchmarks/results/lab_smollm2_spr.md, "Served by vLLM"), because
  near-ties in the argmax flip under any rounding change. The floor is transformers bf16 against transformers fp32
  on the same prompts (`noise_floor`): an engine below *half* of it is flagged, with both numbers; one near it is
  rounding, not a bug.
"""

from __future__ import annotations

from pathlib import Path

PPL_TOLERANCE = 0.01  # |vLLM / transformers - 1| at equal precision above which a row is flagged
FLOOR_SHARE = 0.5  # greedy agreement below this share of the noise floor's is flagged


def greedy(model, prompts: list[list[int]], n: int, device: str) -> list[list[int]]:
    """Greedy continuation (argmax every step, EOS ignored) of each token-id prompt, `n` tokens."""
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            step, past, new = torch.tensor([ids], device=device), None, []
            for _ in range(n):
                res = model(step, past_key_values=past, use_cache=True)
                past = res.past_key_values
                tok = int(res.logits[0, -1].argmax())
                new.append(tok)
                step = torch.tensor([[tok]], device=device)
            out.append(new)
    return out


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Tokens matched before the first divergence, per prompt, and in all."""
    matched = []
    for ref, got in zip(reference, other, strict=True):
        k = 0
        while k < min(len(ref), len(got)) and ref[k] == got[k]:
            k += 1
        matched.append(k)
    total = sum(len(r) for r in reference)
    return {"matched_tokens": matched, "tokens_per_prompt": len(reference[0]) if reference else 0,
            "prompts": len(reference), "identical": sum(m == len(r) for m, r in zip(matched, reference)),
            "share": sum(matched) / total if total else None}


def reference(folder: Path, prompts: list[list[int]], n: int, dtypes: list[str], device: str, ppl_ids, ppl,
              windows: int | None) -> dict:
    """Transformers on one checkpoint, once per dtype (e.g. ["float32", "bfloat16"]): greedy tokens and the
    perplexity on the first `windows` windows (None without perplexity). {dtype: {"greedy", "perplexity"}}; one
    model in memory at a time."""
    import torch

    from compress.environment import release_freed_memory
    from eval.engines import transformers as hf

    out = {}
    for dtype in dtypes:
        model = hf.load_checkpoint(folder, getattr(torch, dtype), device)
        out[dtype] = reference_of(model, prompts, n, device, ppl_ids, ppl, windows)
        del model
        release_freed_memory()
    return out


def reference_of(model, prompts: list[list[int]], n: int, device: str, ppl_ids, ppl, windows: int | None,
                 perplexity: dict | None = None) -> dict:
    """One dtype's reference from a model already loaded: {"greedy", "perplexity"}. `perplexity`: the figure on
    those windows, already computed by the caller on this very model (eval/perplexity.evaluate_tokens'
    `prefix_windows`), so it is not computed again."""
    import torch

    from eval import perplexity as ppl_mod

    value = perplexity
    if value is None and ppl_ids is not None:
        ids = ppl_ids if isinstance(ppl_ids, torch.Tensor) else torch.tensor(ppl_ids)
        value = ppl_mod.evaluate_tokens(model, ids, context=ppl.context, stride=ppl.stride, max_windows=windows)
    return {"greedy": greedy(model, prompts, n, device), "perplexity": value}


class MainPass:
    """A served row's reference taken by the main pass (eval/measure.py) with the models it loads anyway: the
    run-dtype model after perplexity (whose first windows' figure that pass already computed: `windows`), the
    tasks-dtype model after lm-eval. Loading the checkpoint twice more in the vLLM stage for the same figures cost
    ~28 s a row on the lab (benchmarks/results/lab_smollm2_spr_after.md); what the main pass could not take (a
    served dtype it never loaded) the vLLM stage still computes. `stored()` is kept in eval/<variant>.json under
    `inputs` (eval/served_setup.reference_inputs)."""

    def __init__(self, *, inputs: str, dtypes: list[str], prompts: list[list[int]], n: int, device: str, ppl_ids,
                 ppl, windows: int | None):
        self.inputs, self.dtypes, self.prompts, self.n, self.device = inputs, dtypes, prompts, n, device
        self.ppl_ids, self.ppl, self.windows = ppl_ids, ppl, windows
        self.by_dtype: dict[str, dict] = {}
        self.seconds = 0.0

    def wants(self, dtype: str) -> bool:
        return dtype in self.dtypes and dtype not in self.by_dtype

    def take(self, model, dtype: str, perplexity: dict | None = None) -> None:
        """`dtype`'s reference from `model`; `perplexity`: the main pass's figure on the same windows (None: computed
        here, or none when vLLM's perplexity is off)."""
        import time

        t0 = time.perf_counter()
        if perplexity is not None:
            perplexity = {k: perplexity[k] for k in ("value", "tokens", "windows", "context", "stride")}
        self.by_dtype[dtype] = reference_of(model, self.prompts, self.n, self.device, self.ppl_ids, self.ppl,
                                            self.windows, perplexity if self.ppl_ids is not None else None)
        self.seconds += time.perf_counter() - t0

    def stored(self) -> dict | None:
        return {"inputs": self.inputs, "by_dtype": self.by_dtype, "seconds": round(self.seconds, 1)} \
            if self.by_dtype else None


def compare(served_greedy: list[list[int]], served_ppl: dict | None, ref: dict, served_dtype: str,
            base_dtype: str) -> dict:
    """vLLM's greedy tokens and perplexity against transformers at the served dtype (the agreement the row is
    judged by) and at the run's dtype (kept beside), the noise floor, and the checks that failed, each a sentence
    with its numbers."""
    same = ref.get(served_dtype) or ref[base_dtype]
    same_dtype = served_dtype if served_dtype in ref else base_dtype
    out = {"agreement": {**agreement(same["greedy"], served_greedy), "reference": f"transformers, same checkpoint, "
                                                                                 f"{same_dtype}"}}
    if base_dtype in ref and base_dtype != same_dtype:
        out["agreement_vs_" + base_dtype] = agreement(ref[base_dtype]["greedy"], served_greedy)
        out["noise_floor"] = {**agreement(ref[base_dtype]["greedy"], same["greedy"]),
                              "what": f"transformers {same_dtype} against transformers {base_dtype}, same prompts"}
    checks = []
    floor = (out.get("noise_floor") or {}).get("share")
    share = out["agreement"]["share"]
    if floor and share is not None and share < FLOOR_SHARE * floor:
        checks.append(f"greedy agreement with transformers {same_dtype} {share:.0%} is below half its noise floor "
                      f"{floor:.0%} (transformers {same_dtype} vs {base_dtype})")
    if served_ppl is not None:
        perplexity = {"value": served_ppl["value"], "tokens": served_ppl["tokens"],
                      "windows": served_ppl["windows"], "context": served_ppl["context"],
                      "stride": served_ppl["stride"]}
        for dtype, key in ((same_dtype, "transformers_value"), (base_dtype, f"transformers_{base_dtype}_value")):
            p = (ref.get(dtype) or {}).get("perplexity")
            if p is not None:
                perplexity[key] = p["value"]
                perplexity["transformers_tokens"] = p["tokens"]
        perplexity["transformers_dtype"] = same_dtype
        if "transformers_value" in perplexity:
            gap = perplexity["value"] / perplexity["transformers_value"] - 1
            perplexity["gap"] = gap
            if abs(gap) > PPL_TOLERANCE:
                checks.append(f"perplexity {perplexity['value']:.3f} is {gap:+.1%} from transformers {same_dtype}'s "
                              f"{perplexity['transformers_value']:.3f} on the same windows (tolerance "
                              f"{PPL_TOLERANCE:.0%})")
        out["perplexity"] = perplexity
    out["checks"] = checks
    return out
