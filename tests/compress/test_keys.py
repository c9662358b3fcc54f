"""The cache key comes from the schema: every field of every variant class changes it, or the class says why not;
and the variants of the first recipe formats keep the keys their checkpoints were built under."""

import json

import pytest

from compress.recipe import VARIANT_CLASSES, parse_variant
from conftest import ROOT

# per class: field -> (a variant where the field applies, the same variant with that field changed). A field added
# to a class without an entry here (or in the class's NOT_KEYED, with its reason) fails the walk below.
GPTQ = {"name": "v", "method": "gptq", "group_size": 64}
AUTO = {"name": "v", "method": "auto", "target": {"effective_bits": 4.5}}
CHANGES = {
    "UnchangedVariant": {
        "name": ({"name": "v", "method": "baseline"}, {"name": "w"}),
        "method": ({"name": "v", "method": "none", "kv_cache": {"dtype": "int8"}}, {"method": "baseline",
                                                                                     "kv_cache": None}),
        "ignore": ({"name": "v", "method": "none", "kv_cache": {"dtype": "int8"}}, {"ignore": []}),
        "kv_cache": ({"name": "v", "method": "none", "kv_cache": {"dtype": "int8"}}, {"kv_cache": {"dtype": "int4"}}),
        "distill": ({"name": "v", "method": "none", "distill": {"student": {"layers": 2}}},
                    {"distill": {"student": {"layers": 3}}}),
        "samples": ({"name": "v", "method": "none", "kv_cache": {"dtype": "fp8"}},
                    {"samples": 8}),
        "seq_len": ({"name": "v", "method": "none", "kv_cache": {"dtype": "fp8"}},
                    {"seq_len": 64}),
    },
    "LLMCompressorVariant": {
        "name": (GPTQ, {"name": "w"}),
        "method": (GPTQ, {"method": "rtn"}),
        "scheme": (GPTQ, {"scheme": "W4A8-INT"}),
        "rotate": (GPTQ, {"rotate": "spinquant"}),
        "bits": (GPTQ, {"bits": 8}),
        "group_size": (GPTQ, {"group_size": 32}),
        "symmetric": (GPTQ, {"symmetric": False}),
        "ignore": (GPTQ, {"ignore": []}),
        "samples": (GPTQ, {"samples": 8}),
        "seq_len": (GPTQ, {"seq_len": 64}),
        "kv_cache": (GPTQ, {"kv_cache": {"dtype": "fp8"}}),
        "distill": (GPTQ, {"distill": {"student": {"layers": 2}}}),
        "smoothing_strength": ({"name": "v", "method": "smoothquant-gptq"}, {"smoothing_strength": 0.5}),
        "dampening_frac": (GPTQ, {"dampening_frac": 0.05}),
        "iters": ({"name": "v", "method": "autoround"}, {"iters": 20}),
        "lr": ({"name": "v", "method": "autoround"}, {"lr": 0.01}),
    },
    "BnbVariant": {
        "name": ({"name": "v", "method": "bnb-nf4"}, {"name": "w"}),
        "method": ({"name": "v", "method": "bnb-int8"}, {"method": "bnb-nf4"}),
        "ignore": ({"name": "v", "method": "bnb-nf4"}, {"ignore": []}),
        "compute_dtype": ({"name": "v", "method": "bnb-nf4"}, {"compute_dtype": "bfloat16"}),
        "double_quant": ({"name": "v", "method": "bnb-nf4"}, {"double_quant": False}),
        "distill": ({"name": "v", "method": "bnb-nf4"}, {"distill": {"student": {"layers": 2}}}),
    },
    "GGUFVariant": {
        "name": ({"name": "v", "method": "gguf", "gguf_type": "Q4_0"}, {"name": "w"}),
        "gguf_type": ({"name": "v", "method": "gguf", "gguf_type": "Q4_0"}, {"gguf_type": "Q8_0"}),
        "imatrix": ({"name": "v", "method": "gguf", "gguf_type": "Q4_0"}, {"imatrix": True}),
        "samples": ({"name": "v", "method": "gguf", "gguf_type": "Q4_0", "imatrix": True}, {"samples": 8}),
        "seq_len": ({"name": "v", "method": "gguf", "gguf_type": "Q4_0", "imatrix": True}, {"seq_len": 64}),
        "distill": ({"name": "v", "method": "gguf", "gguf_type": "Q4_0"}, {"distill": {"student": {"layers": 2}}}),
    },
    "AutoVariant": {
        "name": (AUTO, {"name": "w"}),
        "formats": (AUTO, {"formats": ["W4A16", "unquantized"]}),
        "group_size": (AUTO, {"group_size": 32}),
        "target": (AUTO, {"target": {"effective_bits": 6}}),
        "granularity": (AUTO, {"granularity": "decoder-layer"}),
        "algorithm": (AUTO, {"algorithm": "rtn"}),
        "analysis": (AUTO, {"analysis": {"score": "fisher"}}),
        "ignore": (AUTO, {"ignore": []}),
        "samples": (AUTO, {"samples": 8}),
        "seq_len": (AUTO, {"seq_len": 64}),
        "kv_cache": (AUTO, {"kv_cache": {"dtype": "fp8"}}),
        "distill": (AUTO, {"distill": {"student": {"layers": 2}}}),
        "predicted_cap": ({**AUTO, "target": {"max_kl": 0.05}}, {"predicted_cap": 0.03}),  # verify strict's next point
    },
}
# fields that cannot take another value in a class (its validator refuses them, saying why, or it has one method)
REFUSED = {"BnbVariant": {"kv_cache", "samples", "seq_len"}, "GGUFVariant": {"kv_cache", "ignore", "method"},
           "AutoVariant": {"method"}}


@pytest.mark.parametrize("cls", VARIANT_CLASSES, ids=lambda c: c.__name__)
def test_every_field_changes_the_key_or_is_declared(cls):
    changes = CHANGES[cls.__name__]
    declared = set(cls.NOT_KEYED)
    assert all(cls.NOT_KEYED.values()), "a field left out of the key must say why"
    unaccounted = set(cls.model_fields) - set(changes) - declared - REFUSED.get(cls.__name__, set())
    assert not unaccounted, f"{cls.__name__}: fields {sorted(unaccounted)} neither change the key here nor are declared"
    for field, (base, change) in changes.items():
        before, after = parse_variant(base), parse_variant({**base, **change})
        assert type(before) is cls, (field, type(before))
        assert before.key_fields() != after.key_fields(), f"{cls.__name__}.{field}: {change} did not change the key"


def test_the_first_formats_keep_their_keys():
    """The variants of every lab recipe and each older method, keyed as compress 84ca625 keyed them (the fixture was
    written by that code): their checkpoints are reused, not rebuilt."""
    for case in json.loads((ROOT / "tests" / "fixtures" / "legacy_variant_keys.json").read_text()):
        assert parse_variant(case["recipe"]).key_fields() == case["key"], case["recipe"]


def test_a_first_format_variant_and_its_scheme_spelling_share_a_key():
    """`method: fp8` is rtn writing FP8-dynamic and `bits: 8` is W8A16: the same checkpoint, the same key."""
    assert (parse_variant({"name": "f", "method": "fp8"}).key_fields()
            == parse_variant({"name": "f", "method": "rtn", "scheme": "FP8-dynamic"}).key_fields())
    assert (parse_variant({"name": "g", "method": "gptq", "bits": 8}).key_fields()
            == parse_variant({"name": "g", "method": "gptq", "scheme": "W8A16"}).key_fields())
    assert (parse_variant({"name": "a", "method": "awq"}).key_fields()
            == parse_variant({"name": "a", "method": "awq", "scheme": "W4A16-asym"}).key_fields())
    # a default the method fills in is part of a new method's key (changing the default rebuilds)
    assert parse_variant({"name": "a", "method": "autoround"}).key_fields()["iters"] == 200
