"""Model-side code: the embedded tiny model, tokenizers, generation, per-position log-probs, the fixed probe.

Everything here needs the ``[model]`` extra (torch, transformers); the analysis core never imports it.
"""
