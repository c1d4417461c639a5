"""Blocks and backbones: one interface for Aaren and for the causal Transformer.

Every block has ``forward(x, padding_mask)`` (parallel, training), ``init_state(batch)`` and
``step(x, state) -> (y, state)`` (recurrent, acting). An Aaren block's state is constant in size;
a Transformer block's state is a key/value cache that grows with every token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import Aaren, AarenState, _check_rows, as_array, check_padding_mask, check_episode_ids, check_tokens


class MLP(nn.Module):
    def __init__(self, embed_dim: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(embed_dim, 4 * embed_dim)
        self.proj = nn.Linear(4 * embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


# ----------------------------------------------------------------------------------------------
# Causal self-attention with a key/value cache


@dataclass
class KVCache:
    """Keys and values of the tokens seen, (batch, heads, seq, head_dim), and which are valid.

    ``valid`` (batch, seq) is False for entries dropped by ``reset`` (a row that began a new
    episode keeps its slots but no longer attends to them). Without a ``window`` it grows by one
    entry per token. With one (a sliding window, in tokens) each token attends to itself and the
    ``window - 1`` tokens before it, and the cache keeps exactly ``window - 1`` entries (invalid
    ones until that many tokens were seen): a constant size.
    """

    k: Tensor
    v: Tensor
    valid: Tensor
    window: int | None = None

    @classmethod
    def empty(cls, batch_size: int, num_heads: int, head_dim: int, window: int | None = None, device=None,
              dtype=None) -> "KVCache":
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive number of tokens, got {window}")
        slots = 0 if window is None else window - 1
        k = torch.zeros(batch_size, num_heads, slots, head_dim, device=device, dtype=dtype)
        return cls(k, k.clone(), torch.zeros(batch_size, slots, dtype=torch.bool, device=device), window)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    def reset(self, rows: Tensor) -> "KVCache":
        rows = _check_rows(rows, self.batch_size, self.k.device)
        return replace(self, valid=self.valid & ~rows.unsqueeze(-1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.valid))


class CausalSelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out = nn.Linear(embed_dim, embed_dim)
        self.attn_dropout = dropout

    def _heads(self, x: Tensor):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.embed_dim, dim=-1)
        return [t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)]  # (B, H, T, Dh)

    def _merge(self, y: Tensor) -> Tensor:
        B, H, T, Dh = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, H * Dh))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, episode_ids: Tensor | None = None) -> Tensor:
        q, k, v = self._heads(x)
        dropout = self.attn_dropout if self.training else 0.0
        if padding_mask is None and episode_ids is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_of(x, padding_mask, episode_ids), dropout_p=dropout)
        return self._merge(y)

    def init_state(self, batch_size: int, device=None, dtype=None, window: int | None = None) -> KVCache:
        """An empty cache; ``window`` (tokens): a sliding window of constant size (``KVCache``)."""
        p = self.qkv.weight
        return KVCache.empty(batch_size, self.num_heads, self.head_dim, window, device or p.device, dtype or p.dtype)

    def step(self, x: Tensor, cache: KVCache, padding_mask: Tensor | None = None) -> tuple[Tensor, KVCache]:
        """x (B, t, E): append the t new keys/values and attend causally over the cache (within its
        window, if it has one); a windowed cache then drops its oldest entries.

        Padding tokens (``padding_mask`` True) are stored as invalid: no later token attends to them.
        """
        q, k, v = self._heads(x)
        t = x.shape[1]
        k = torch.cat([cache.k, k], dim=2)
        v = torch.cat([cache.v, v], dim=2)
        new_valid = torch.ones(x.shape[0], t, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        valid = torch.cat([cache.valid, new_valid], dim=1)
        key_pos = torch.arange(k.shape[2], device=x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(key_pos[-t:], key_pos, ~valid, cache.window))
        if cache.window is not None:
            keep = cache.window - 1
            k, v, valid = k[:, :, k.shape[2] - keep:], v[:, :, k.shape[2] - keep:], valid[:, valid.shape[1] - keep:]
        return self._merge(y), KVCache(k, v, valid, cache.window)


def mask_of(x: Tensor, padding_mask: Tensor | None, episode_ids: Tensor | None) -> Tensor:
    """The parallel form's attention mask (B or 1, 1, T, T): causal, not to padding, and within
    the query's own episode (packed rows, ``episode_ids`` (B, T))."""
    pos = torch.arange(x.shape[1], device=x.device)
    allowed = _allowed(pos, pos, padding_mask, None)
    if episode_ids is not None:
        allowed = allowed & (episode_ids[:, None, :, None] == episode_ids[:, None, None, :])
    return allowed


def _allowed(query_pos: Tensor, key_pos: Tensor, padding_mask: Tensor | None, window: int | None) -> Tensor:
    """Which keys each query attends to, (B or 1, 1, t, T): the keys at or before it (within
    ``window`` tokens of it) that are not padding, and always itself, so that a padded query has
    no empty row (NaN). Positions are compared, not masks cut from a square: the same code serves
    the parallel form, the cache and the ONNX graph (where the sizes are not known in advance)."""
    before = key_pos <= query_pos[:, None]  # (t, T)
    if window is not None:
        before = before & (key_pos > query_pos[:, None] - window)
    itself = key_pos == query_pos[:, None]
    if padding_mask is None:
        return before | itself
    return (before & ~padding_mask[:, None, None, :]) | itself


# ----------------------------------------------------------------------------------------------
# Blocks: norm, mixer, residual, norm, feed-forward, residual (pre-norm, as GPT-2 and DT)


class Block(nn.Module):
    """A pre-norm residual block around a sequence mixer (Aaren or causal self-attention)."""

    def __init__(self, mixer: nn.Module, embed_dim: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(embed_dim)
        self.mixer = mixer
        self.ln_2 = nn.LayerNorm(embed_dim)
        self.mlp = MLP(embed_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, episode_ids: Tensor | None = None) -> Tensor:
        mixed = self.mixer(self.ln_1(x), padding_mask=padding_mask, episode_ids=episode_ids)
        x = x + self.dropout(mixed)
        return x + self.mlp(self.ln_2(x))

    def init_state(self, batch_size: int, device=None, dtype=None, **kwargs):
        return self.mixer.init_state(batch_size, device=device, dtype=dtype, **kwargs)

    def step(self, x: Tensor, state, padding_mask: Tensor | None = None):
        """x (B, t, E): the chunk's outputs and the new state (padding tokens leave it unchanged)."""
        h, state = self.mixer.step(self.ln_1(x), state, padding_mask=padding_mask)
        x = x + self.dropout(h)
        return x + self.mlp(self.ln_2(x)), state

    def export_step_weights(self) -> dict:
        """The block's weights by name for a backend outside PyTorch (matrices as (in, out));
        the mixer's from its own ``export_step_weights``."""
        mlp = self.mlp
        return {"ln1_w": as_array(self.ln_1.weight), "ln1_b": as_array(self.ln_1.bias),
                **self.mixer.export_step_weights(),
                "ln2_w": as_array(self.ln_2.weight), "ln2_b": as_array(self.ln_2.bias),
                "fc_w": as_array(mlp.fc.weight.T), "fc_b": as_array(mlp.fc.bias),
                "proj_w": as_array(mlp.proj.weight.T), "proj_b": as_array(mlp.proj.bias)}


class AarenBlock(Block):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, query_init: float = 0.02,
                 recency: float = 0.0):
        super().__init__(Aaren(embed_dim, num_heads, query_init=query_init, recency=recency), embed_dim, dropout)


class TransformerBlock(Block):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__(CausalSelfAttention(embed_dim, num_heads, dropout), embed_dim, dropout)


BLOCKS = {"aaren": AarenBlock, "transformer": TransformerBlock}


class Backbone(nn.Module):
    """A stack of blocks of one kind (``"aaren"`` or ``"transformer"``) and a final LayerNorm.

    ``forward`` runs whole sequences in parallel; ``init_state``/``step``/``reset_state`` run the
    same function token by token (or chunk by chunk) with one state per layer.
    """

    def __init__(self, kind: str, n_layer: int, embed_dim: int, num_heads: int, dropout: float = 0.0,
                 query_init: float = 0.02, recency: float = 0.0):
        super().__init__()
        if kind not in BLOCKS:
            raise ValueError(f"backbone kind must be one of {sorted(BLOCKS)}, got {kind!r}")
        if n_layer <= 0:
            raise ValueError(f"n_layer must be positive, got {n_layer}")
        self.kind, self.embed_dim = kind, embed_dim
        # Aaren's learned query (its init std) and score decay per token
        extra = {"query_init": query_init, "recency": recency} if kind == "aaren" else {}
        self.blocks = nn.ModuleList(BLOCKS[kind](embed_dim, num_heads, dropout, **extra) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, episode_ids: Tensor | None = None) -> Tensor:
        """x (B, T, E) -> (B, T, E). ``episode_ids`` (B, T) integers: each token sees only the earlier
        tokens of its own episode (several episodes packed into one row)."""
        check_tokens("x", x, self.embed_dim)
        padding_mask = check_padding_mask(padding_mask, x)
        episode_ids = check_episode_ids(episode_ids, x)
        for block in self.blocks:
            x = block(x, padding_mask, episode_ids)
        return self.ln_f(x)

    def init_state(self, batch_size: int, device=None, dtype=None, window: int | None = None) -> list:
        """One empty state per layer. ``window`` (Transformer only): sliding key/value caches in
        which each token attends to the last ``window`` tokens (itself included), of constant size."""
        if window is None:
            return [b.init_state(batch_size, device=device, dtype=dtype) for b in self.blocks]
        if self.kind != "transformer":
            raise ValueError(f"a sliding window is a Transformer's cache; the {self.kind!r} backbone's state "
                             f"has a constant size already")
        return [b.init_state(batch_size, device=device, dtype=dtype, window=window) for b in self.blocks]

    def step(self, x: Tensor, state: list, padding_mask: Tensor | None = None) -> tuple[Tensor, list]:
        """x (B, E) or (B, t, E) new tokens -> their outputs and the new per-layer states.

        ``padding_mask`` ((B,) or (B, t), True = padding) marks tokens that change no state.
        """
        check_tokens("x", x, self.embed_dim, ranks=(2, 3))
        if not isinstance(state, list) or len(state) != len(self.blocks):
            raise ValueError(f"state must be the list of {len(self.blocks)} per-layer states from init_state")
        single = x.dim() == 2
        h = x.unsqueeze(1) if single else x
        if padding_mask is not None:
            padding_mask = check_padding_mask(padding_mask.view(h.shape[0], -1), h)
        new_state = []
        for block, s in zip(self.blocks, state):
            if s.batch_size != h.shape[0]:
                raise ValueError(f"state has batch size {s.batch_size}, x has {h.shape[0]}")
            h, s = block.step(h, s, padding_mask)
            new_state.append(s)
        h = self.ln_f(h)
        return (h.squeeze(1) if single else h), new_state

    def export_step_weights(self) -> tuple[list[dict], dict]:
        """Per-layer weights (``Block.export_step_weights``) and the final norm's, for a backend
        that runs ``step`` outside PyTorch. Aaren only: its state has a fixed size to hand over."""
        if self.kind != "aaren":
            raise ValueError(f"only an Aaren backbone exports its step, not {self.kind!r}")
        with torch.no_grad():
            layers = [b.export_step_weights() for b in self.blocks]
        return layers, {"lnf_w": as_array(self.ln_f.weight), "lnf_b": as_array(self.ln_f.bias)}

    @staticmethod
    def reset_state(state: list, rows: Tensor) -> list:
        """Empty the rows of every layer's state where ``rows`` (bool, (batch,)) is True."""
        return [s.reset(rows) for s in state]


__all__ = ["AarenBlock", "AarenState", "Backbone", "Block", "CausalSelfAttention", "KVCache", "TransformerBlock"]
