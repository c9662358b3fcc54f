"""One module per method family. Each declares its recipe options as a `VariantBase` subclass (compress/options.py)
with its `method` values (`methods()`), its own keys and rules, `label`, and `build(job) -> record dict`; the heavy
library it drives is imported inside its functions only, so reading a recipe stays light.

    unchanged.py      baseline, none          the model's own weights (plus a KV format or a student)
    llmcompressor.py  METHODS x SCHEMES       compressed-tensors checkpoints (the only llm-compressor user): its two
                                              tables say which method writes which scheme, and everything about both
    bnb.py            bnb-nf4 bnb-int8        bitsandbytes, quantized as transformers loads
    gguf.py           gguf                    one llama.cpp file (compress/llamacpp.py drives llama.cpp)

compress/recipe.py unites the classes on `method`; compress/build.py holds the steps every Hugging Face checkpoint
shares. README: "How to add a method or an engine".
"""
