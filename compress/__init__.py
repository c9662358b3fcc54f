"""compress: quantize or distill a causal LM into ready-to-serve checkpoints, and measure what each variant costs.

The pipeline is visible in the module names: recipe -> load -> calibration -> quantize -> checkpoint -> (card)
-> pipeline, driven by cli.
"""

__version__ = "0.1.0"
