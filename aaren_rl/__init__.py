"""aaren-rl: offline reinforcement learning with Aaren, attention computed as a recurrent network.

The names below are loaded on first use, so that ``import aaren_rl.runtime`` (acting with an
exported policy) needs no PyTorch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Aaren": "layer", "AarenState": "layer", "combine": "layer", "prefix_scan": "layer",
    "AarenBlock": "blocks", "Backbone": "blocks", "CausalSelfAttention": "blocks", "KVCache": "blocks",
    "TransformerBlock": "blocks",
}

__all__ = [
    "Aaren", "AarenState", "AarenBlock", "Backbone", "CausalSelfAttention", "KVCache",
    "TransformerBlock", "combine", "prefix_scan",
]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
