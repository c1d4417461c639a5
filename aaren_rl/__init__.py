"""aaren-rl: offline reinforcement learning with Aaren, attention computed as a recurrent network."""

from .blocks import AarenBlock, Backbone, CausalSelfAttention, KVCache, TransformerBlock
from .layer import Aaren, AarenState, combine, prefix_scan

__version__ = "0.1.0"

__all__ = [
    "Aaren", "AarenState", "AarenBlock", "Backbone", "CausalSelfAttention", "KVCache",
    "TransformerBlock", "combine", "prefix_scan",
]
