"""KV-cache formats: the tensor functions on hand-made tensors, the hook on a tiny Llama, the fp8 scales in the
checkpoint where vLLM reads them, the memory arithmetic, and the whole KV pipeline with its report."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DynamicCache

from compress import run as run_mod
from eval import kvcache, perplexity
from compress.recipe import KVCache, load_recipe
from conftest import TEXT, perplexity_data, write_recipe


def _kv(**kw) -> KVCache:
    return KVCache(**kw)


def _keys_with_outlier_channel(seed=0) -> torch.Tensor:
    """(batch 1, 2 heads, 40 tokens, head_dim 16) with channel 3 about 20x larger than the rest, as real keys have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 40, 16, generator=g)
    x[..., 3] *= 20
    return x


def test_16bit_kv_is_identity_within_rounding():
    x = torch.randn(2, 3, 17, 16)
    for dtype, eps in (("bf16", 2**-8), ("fp16", 2**-11)):
        k, v = kvcache.fake_quantize(x, x, _kv(dtype=dtype))
        assert torch.allclose(k, x, rtol=eps, atol=1e-6) and not torch.equal(k, x)
        assert torch.equal(kvcache.round_trip_16bit(k, dtype), k)  # idempotent: already representable


def test_int_levels_and_errors():
    x = _keys_with_outlier_channel()
    q4 = kvcache.per_token(x, 4, None)
    assert all(len(torch.unique(q4[0, h, t])) <= 16 for h in range(2) for t in range(40))
    err = {bits: (kvcache.per_token(x, bits, None) - x).abs().mean() for bits in (4, 8)}
    assert err[8] < err[4] / 8  # each extra bit halves the step
    # KIVI's point: with an outlier channel, per-channel keys lose less than per-token keys
    assert (kvcache.per_channel_keys(x, 4, 8) - x).abs().mean() < 0.5 * err[4]
    # grouping channels within a token helps too (llama.cpp's blocks of 32 on a 64-wide head)
    assert (kvcache.per_token(x, 4, 4) - x).abs().mean() < err[4]


def test_per_channel_keys_short_last_block_keeps_shape_and_range():
    x = torch.randn(1, 2, 37, 8)  # 37 = 4 blocks of 8 + 5
    q = kvcache.per_channel_keys(x, 4, 8)
    assert q.shape == x.shape
    last = x[:, :, 32:]
    lo, hi = last.amin(2, keepdim=True), last.amax(2, keepdim=True)
    slack = 0.01 * (hi - lo)  # scale and minimum are stored in fp16
    assert (q[:, :, 32:] >= lo - slack).all() and (q[:, :, 32:] <= hi + slack).all()


def test_fp8_static_round_trip_saturates():
    scale = torch.tensor([0.01])
    x = torch.tensor([0.0, 0.013, -1.0, 10.0])
    q = kvcache.fp8_static(x, scale)
    assert q[0] == 0 and abs(q[1] - 0.013) < 0.013 / 8  # e4m3 has 3 mantissa bits
    assert q[2] == pytest.approx(-0.96)  # -100 lies halfway between e4m3's -96 and -104: ties to even
    assert q[3] == pytest.approx(4.48)  # 448 x 0.01: saturated, not inf


@pytest.mark.parametrize("kw, message", [
    ({"dtype": "int8", "granularity": "tensor"}, "static per-tensor/per-head scales are for fp8"),
    ({"dtype": "fp8", "granularity": "token"}, "per 'tensor' or per 'head'"),
    ({"dtype": "bf16", "granularity": "token"}, "has no scales"),
])
def test_bad_kv_settings_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        KVCache(**kw)


def _kl(model, reference, ids) -> float:
    out = perplexity.evaluate_tokens(model, ids, context=64, stride=64, max_windows=4, reference=reference)
    return out["kl"]["mean"]


def test_int4_kv_measurably_worse_than_int8_on_tiny_model(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok(" ".join(TEXT * 4), return_tensors="pt").input_ids[0]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    kl = {}
    for name, kv in (("bf16", _kv(dtype="bf16")), ("int8", _kv(dtype="int8")), ("int4", _kv(dtype="int4")),
                     ("int4-kivi", _kv(dtype="int4", granularity="channel", group_size=16))):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
        handles = kvcache.attach(model, kv)
        kl[name] = _kl(model, reference, ids)
        for h in handles:
            h.remove()
        assert _kl(model, reference, ids) == pytest.approx(0, abs=1e-9)  # removing the hooks restores the model
    assert kl["bf16"] < 1e-4 < kl["int8"] * 100  # 16-bit: rounding only
    assert kl["int4"] > 3 * kl["int8"] > 0, kl


def test_hook_quantizes_what_enters_a_real_cache(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    kvcache.attach(model, _kv(dtype="int4"))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([[5, 9, 23, 40, 7, 11]]), past_key_values=cache, use_cache=True)
    keys = cache.layers[0].keys  # (1, kv_heads, 6, head_dim)
    assert keys.shape[2] == 6
    assert all(len(torch.unique(keys[0, h, t])) <= 16 for h in range(keys.shape[1]) for t in range(6))
    out = model.generate(torch.tensor([[5, 9, 23]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


# ------------------------------------------------------------------------------------------------ pipeline

KV_VARIANTS = [
    {"name": "baseline", "method": "baseline"},
    {"name": "kv-fp8", "method": "none", "kv_cache": {"dtype": "fp8"}},
    {"name": "kv-fp8-head", "method": "none", "kv_cache": {"dtype": "fp8", "granularity": "head"}},
    {"name": "kv-int4", "method": "none", "kv_cache": {"dtype": "int4", "granularity": "channel", "group_size": 16}},
    {"name": "w4-kv-fp8", "method": "rtn", "bits": 4, "group_size": 32, "kv_cache": {"dtype": "fp8"}},
]


@pytest.fixture(scope="module")
def kv_run(tmp_path_factory, tiny_model, calib_file):
    tmp = tmp_path_factory.mktemp("kv")
    _, ev = perplexity_data(tmp)
    ev.update(throughput={"prompt_tokens": 8, "new_tokens": 4, "batch_sizes": [1], "repeats": 1},
              planner={"context": 2048, "batch": 4})
    recipe_path = write_recipe(tmp, tiny_model, calib_file, KV_VARIANTS, evaluation=ev)
    code = run_mod.run(load_recipe(recipe_path), recipe_path)
    results = json.loads((tmp / "run" / "results.json").read_text())
    return code, {r["name"]: r for r in results["variants"]}, tmp / "run"


@pytest.mark.parametrize("name, shape", [("kv-fp8", (1,)), ("kv-fp8-head", (2, 1, 1)), ("w4-kv-fp8", (1,))])
def test_fp8_kv_scales_are_where_vllm_reads_them(kv_run, name, shape):
    code, records, _ = kv_run
    assert code == 0
    record = records[name]
    folder = Path(record["checkpoint"])
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    kv = qc["kv_cache_scheme"]
    assert (kv["type"], kv["num_bits"], kv["symmetric"], kv["dynamic"]) == ("float", 8, True, False)
    assert kv["strategy"] == ("attn_head" if name == "kv-fp8-head" else "tensor")
    with safe_open(folder / "model.safetensors", "pt") as f:
        for layer in range(2):
            for s in ("k_scale", "v_scale"):
                t = f.get_tensor(f"model.layers.{layer}.self_attn.{s}")
                assert tuple(t.shape) == shape
                assert torch.isfinite(t).all() and (t > 0).all()
    assert record["serve"].endswith("--kv-cache-dtype fp8")
    assert record["selfcheck_max_abs_diff"] <= 1e-3
    assert record["kv_eval"]["scales"] == 4 * math.prod(shape)
    assert "throughput" not in record  # a simulated KV format has no honest decode speed here
    assert "fp8 e4m3 with static scales" in (folder / "README.md").read_text()


def test_int_kv_is_evaluated_not_written(kv_run):
    code, records, run_dir = kv_run
    r = records["kv-int4"]
    assert "quantization_config" not in json.loads((Path(r["checkpoint"]) / "config.json").read_text())
    assert r["serve"].endswith("--dtype bfloat16") and "eval/kvcache.py" in r["kv_eval"]["how"]
    base = records["baseline"]
    assert r["kl"]["mean"] > records["kv-fp8"]["kl"]["mean"] > 0 == base["kl"]["mean"]
    assert base["throughput"]["batches"]["1"]["tok_per_sec"] > 0
    assert r["kv_memory"]["bytes_per_token"] < records["kv-fp8"]["kv_memory"]["bytes_per_token"] \
        < base["kv_memory"]["bytes_per_token"]
    assert r["kv_memory"]["gpus"]["L4 24GB"]["extra_sequences"] > 0
    report = (run_dir / "report.md").read_text()
    assert "## KV cache" in report and "KV-int4-channel-g16" in report and "(+" in report
    assert 'id="kv"' in (run_dir / "report.html").read_text()
