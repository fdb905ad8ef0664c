"""Checkpoint formats of other code bases (transformers, big_vision, the papers' releases), each mapped onto our
parameter names by a function registered with ``backbones.weights.register_format``."""
