"""The importance matrix: llama-imatrix's statistic (mean squared input per column of each weight), keyed by the
GGUF tensor names llama.cpp's converter gives those weights."""

import pytest


def _model(tiny_model, tie: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _gguf_names(n_layers: int, tied: bool) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    for i in range(n_layers):
        names |= {f"blk.{i}.{t}.weight" for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                  "ffn_up", "ffn_down", "attn_norm", "ffn_norm")}
    return names


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_names_follow_llama_cpp(tiny_model, tied):
    from compress.backends.imatrix import gguf_tensor_names

    model = _model(tiny_model, tie=tied)
    names = gguf_tensor_names(model, "llama", _gguf_names(2, tied))
    assert names["model.layers.0.self_attn.q_proj"] == "blk.0.attn_q.weight"
    assert names["model.layers.1.self_attn.o_proj"] == "blk.1.attn_output.weight"
    assert names["model.layers.1.mlp.down_proj"] == "blk.1.ffn_down.weight"
    # a tied output matrix is the embedding table in llama.cpp, and llama-imatrix records it under that name
    assert names["lm_head"] == ("token_embd.weight" if tied else "output.weight")
    assert len(names) == 2 * 7 + 1


def test_importance_is_mean_squared_input_per_column(tiny_model):
    import torch

    from compress.backends.imatrix import gguf_tensor_names, importance_matrix

    model = _model(tiny_model)
    names = gguf_tensor_names(model, "llama", _gguf_names(2, tied=False))
    windows = [[5, 17, 42, 8, 99, 3], [7, 7, 120, 64]]
    imatrix = importance_matrix(model, windows, names)
    assert set(imatrix) == set(names.values())
    assert imatrix["blk.0.attn_q.weight"].shape == (64,) and imatrix["blk.0.ffn_down.weight"].shape == (128,)

    # by hand for layer 0's q_proj: its input is the RMS-normed embeddings of every token of both windows
    rows = []
    with torch.no_grad():
        for w in windows:
            h = model.model.embed_tokens(torch.tensor([w]))
            rows.append(model.model.layers[0].input_layernorm(h)[0])
    x = torch.cat(rows).double()
    expected = (x * x).mean(0).float().numpy()
    assert imatrix["blk.0.attn_q.weight"] == pytest.approx(expected, rel=1e-5)
    # q, k and v read the same input
    assert imatrix["blk.0.attn_k.weight"] == pytest.approx(expected, rel=1e-5)
    assert all(v.min() >= 0 for v in imatrix.values())
