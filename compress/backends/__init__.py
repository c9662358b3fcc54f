"""One module per method family. Each declares its recipe options as a `VariantBase` subclass (compress/options.py)
with its `method` literal(s), its own keys and rules, `scheme`, and `build(job) -> record dict`; the heavy library it
drives is imported inside its functions only, so reading a recipe stays light.

    unchanged.py      baseline, none          the model's own weights (plus a KV format or a student)
    llmcompressor.py  rtn gptq awq smoothquant-gptq fp8   compressed-tensors checkpoints (the only llm-compressor user)
    bnb.py            bnb-nf4 bnb-int8        bitsandbytes, quantized as transformers loads
    gguf.py           gguf                    one llama.cpp file (compress/llamacpp.py drives llama.cpp)

compress/recipe.py unites the classes on `method`; compress/build.py holds the steps every Hugging Face checkpoint
shares. README: "How to add a method or an engine".
"""
