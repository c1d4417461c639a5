"""Aaren: attention as a recurrent network (Feng et al., 2024).

One head of Aaren is softmax attention with a *learned* query ``q`` over the tokens seen so far.
Each token i contributes a triple ``(m_i, u_i, w_i) = (s_i, 1, v_i)`` with score
``s_i = q . k_i / sqrt(d)``; prefix outputs are ``o_k = w_k / u_k`` where the triples are folded
with one associative operator (``combine`` below). The parallel form (``Aaren.forward``) folds
all prefixes at once with ``prefix_scan``; the recurrent form (``Aaren.step``) folds new tokens
into a state of constant size. Both call the same ``combine``: that is why they agree.

Why a chunked scan: inside a chunk of C tokens all prefixes are computed densely as one masked
(C x C) weight matrix times the values (a matrix product, which CPUs and GPUs run well); the
chunks' totals are then scanned the same way (recursively), and each chunk's prefixes are
combined with the total of the chunks before it. Work is O(N C), the number of sequential steps
O(log_C N), and memory O(N C) for the weights instead of Hillis-Steele's O(N log N) copies of the
values. Every exponent is taken relative to a running max, so scores of any magnitude are safe.

Recency (``recency = lam > 0``, off by default): the score of token i seen from the query at
token k becomes s_i - lam (k - i), an exponential decay of old tokens' weights (e^(-lam) per token,
ALiBi's linear bias with a learned-query twist). It keeps the scan associative: softmax over i of
s_i - lam (k - i) equals softmax of s_i + lam i (lam k is the same for every i), so the parallel
form adds lam i to the scores before the scan, and the recurrent form keeps its state's m referred
to its last token: m - lam per token that comes after. A window-trained model that streams over a
whole episode then sees old tokens fade as they did beyond its windows.

Packed episodes (``episode_ids``, training rows of several episodes one after another): token i of
episode g gets EPISODE_GAP * g added to its score, so a query in episode g weighs every token of an
earlier episode by at most e^(-EPISODE_GAP) (plus their score difference) against its own
episode's: each episode's outputs are those of a scan that starts empty at its first token, the
same associative operator and kernels (it is a ramp like recency's, in float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

NEG_INF = float("-inf")
SCAN_CHUNK = 64
# added to the scores per episode of a packed row: e^-64 ~ 1.6e-28 is what an earlier episode's
# tokens weigh at most (scores differ by far less); float32 keeps 0.002 of a score at 30 000
EPISODE_GAP = 64.0


# ----------------------------------------------------------------------------------------------
# The combine rule, written once


def _exp_shift(m: Tensor, ref: Tensor) -> Tensor:
    """exp(m - ref), with an empty reference (-inf) treated as 0 so that -inf - -inf gives 0, not NaN."""
    ref = torch.where(torch.isneginf(ref), torch.zeros_like(ref), ref)
    return torch.exp(m - ref)


def combine(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor]):
    """(m_a, u_a, w_a) (+) (m_b, u_b, w_b): the triple of ``a``'s tokens followed by ``b``'s.

    m, u have shape (...), w has shape (..., d). (-inf, 0, 0) is the identity.
    """
    (ma, ua, wa), (mb, ub, wb) = a, b
    m = torch.maximum(ma, mb)
    ea, eb = _exp_shift(ma, m), _exp_shift(mb, m)
    return m, ua * ea + ub * eb, wa * ea.unsqueeze(-1) + wb * eb.unsqueeze(-1)


def _dense_prefix(m: Tensor, u: Tensor, w: Tensor):
    """All prefixes along dim -1 (length C) at once: a masked (C x C) weight matrix times (u, w)."""
    C = m.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=m.device).tril()  # [k, i]: i <= k
    if torch.onnx.is_in_onnx_export():  # ONNX has no cummax: the same maxima from the masked (C x C) matrix
        run_max = torch.where(causal, m.unsqueeze(-2), NEG_INF).amax(-1)
    else:
        run_max = torch.cummax(m, dim=-1).values  # (..., C)
    ref = torch.where(torch.isneginf(run_max), torch.zeros_like(run_max), run_max)
    # mask before exp so that no inf appears (exp(inf) * 0 would give NaN gradients)
    logits = torch.where(causal, m.unsqueeze(-2) - ref.unsqueeze(-1), NEG_INF)  # (..., C_k, C_i)
    weights = torch.exp(logits)
    prefix_u = (weights @ u.unsqueeze(-1)).squeeze(-1)  # (..., C)
    prefix_w = weights.to(w.dtype) @ w  # (..., C, d); float32 weights of a recency ramp meet bf16 values
    return run_max, prefix_u, prefix_w


def prefix_scan(m: Tensor, u: Tensor, w: Tensor, chunk: int = SCAN_CHUNK):
    """Inclusive prefix fold of triples along the sequence dim: m, u (..., N), w (..., N, d)."""
    N = m.shape[-1]
    if N <= chunk:
        return _dense_prefix(m, u, w)
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N
    if pad:  # pad with the identity, which changes no prefix
        m = F.pad(m, (0, pad), value=NEG_INF)
        u = F.pad(u, (0, pad))
        w = F.pad(w, (0, 0, 0, pad))
    lead = m.shape[:-1]
    d = w.shape[-1]
    pm, pu, pw = _dense_prefix(
        m.reshape(*lead, n_chunks, chunk), u.reshape(*lead, n_chunks, chunk),
        w.reshape(*lead, n_chunks, chunk, d),
    )
    # totals of each chunk, scanned (recursively) across chunks, then shifted: what came before
    tm, tu, tw = prefix_scan(pm[..., -1], pu[..., -1], pw[..., -1, :], chunk)
    tm = F.pad(tm[..., :-1], (1, 0), value=NEG_INF)
    tu = F.pad(tu[..., :-1], (1, 0))
    tw = F.pad(tw[..., :-1, :], (0, 0, 1, 0))
    om, ou, ow = combine((tm.unsqueeze(-1), tu.unsqueeze(-1), tw.unsqueeze(-2)), (pm, pu, pw))
    om = om.reshape(*lead, n_chunks * chunk)[..., :N]
    ou = ou.reshape(*lead, n_chunks * chunk)[..., :N]
    ow = ow.reshape(*lead, n_chunks * chunk, d)[..., :N, :]
    return om, ou, ow


def _ramp(s: Tensor, recency: float, positions: Tensor) -> Tensor:
    """s + recency * positions, in at least float32 (a bf16 score could not hold lam i at i ~ 1000)."""
    dtype = torch.promote_types(s.dtype, torch.float32)
    return s.to(dtype) + recency * positions.to(dtype)


def score_offset(T: int, recency: float, episode_ids: Tensor | None, device,
                 dtype: torch.dtype = torch.float32) -> Tensor | None:
    """What the parallel form adds to the scores before the scan, (B or 1, T) in ``dtype`` (at
    least float32): recency * i (a decay per token) plus EPISODE_GAP * episode id (packed rows);
    None when neither applies."""
    offset = None
    dtype = torch.promote_types(dtype, torch.float32)
    if recency:
        offset = recency * torch.arange(T, device=device, dtype=dtype)[None]
    if episode_ids is not None:
        gap = EPISODE_GAP * episode_ids.to(dtype)
        offset = gap if offset is None else offset + gap
    return offset


def check_episode_ids(episode_ids, x: Tensor):
    if _check_per_token("episode_ids", episode_ids, x) is None:
        return None
    if episode_ids.dtype.is_floating_point or episode_ids.dtype == torch.bool:
        raise ValueError(f"episode_ids must be an integer tensor (each token's episode in its row), got {episode_ids.dtype}")
    return episode_ids


def as_array(t: Tensor):
    """A tensor as a float32 NumPy array on the host (for ``export_step_weights``)."""
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _readout(u: Tensor, w: Tensor) -> Tensor:
    """o = w / u; an empty prefix (u = 0: only padding so far) reads out as 0."""
    empty = u == 0
    return torch.where(empty.unsqueeze(-1), 0.0, w / torch.where(empty, 1.0, u).unsqueeze(-1))


# ----------------------------------------------------------------------------------------------
# The recurrent state


@dataclass
class AarenState:
    """(m, u, w) per batch row and head: m, u (batch, heads), w (batch, heads, head_dim).

    Its size never depends on how many tokens were folded in.
    """

    m: Tensor
    u: Tensor
    w: Tensor

    @classmethod
    def empty(cls, batch_size: int, num_heads: int, head_dim: int, device=None, dtype=None):
        dtype = dtype or torch.get_default_dtype()
        return cls(
            m=torch.full((batch_size, num_heads), NEG_INF, device=device, dtype=dtype),
            u=torch.zeros(batch_size, num_heads, device=device, dtype=dtype),
            w=torch.zeros(batch_size, num_heads, head_dim, device=device, dtype=dtype),
        )

    @property
    def batch_size(self) -> int:
        return self.m.shape[0]

    def reset(self, rows: Tensor) -> "AarenState":
        """A new state whose rows where ``rows`` (bool, (batch,)) is True are empty again."""
        rows = _check_rows(rows, self.batch_size, self.m.device)
        r = rows.unsqueeze(-1)
        return AarenState(
            m=self.m.masked_fill(r, NEG_INF),
            u=self.u.masked_fill(r, 0.0),
            w=self.w.masked_fill(r.unsqueeze(-1), 0.0),
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.m, self.u, self.w))


def _check_rows(rows, batch_size: int, device) -> Tensor:
    rows = torch.as_tensor(rows, device=device)
    if rows.dtype != torch.bool or rows.shape != (batch_size,):
        raise ValueError(
            f"rows must be a bool tensor of shape ({batch_size},), got {tuple(rows.shape)} {rows.dtype}"
        )
    return rows


def check_tokens(name: str, x: Tensor, width: int, ranks=(3,)) -> None:
    """Shared input checks for the layer and the blocks: a clear ValueError naming the argument."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        want = " or ".join(f"{r}-d" for r in ranks)
        raise ValueError(f"{name} must be {want} (batch, [seq,] {width}), got shape {tuple(x.shape)}")
    if x.shape[-1] != width:
        raise ValueError(f"{name} has width {x.shape[-1]} in its last dim, expected {width}")
    if _can_read_back(x) and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


def _can_read_back(x: Tensor) -> bool:
    """Whether an input check may read a value back to the host: not while torch.compile or the
    ONNX exporter traces (it would break the graph, or be baked into it), nor while a CUDA graph
    captures (a sync is illegal there), nor under ``torch.func.vmap`` (many runs stacked,
    ``aaren_rl.group``: a batched value has no one truth value). The compiled and batched paths
    run the training step, whose loss the loop checks at every log line instead; an exported
    step's inputs are checked by ``StreamingPolicy.predict``."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._functorch.is_batchedtensor(x):
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_per_token(name: str, value, x: Tensor):
    """None, or a tensor of shape (batch, seq) = x.shape[:2] (else a ValueError naming ``name``)."""
    if value is not None and (not isinstance(value, Tensor) or value.shape != x.shape[:2]):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must have shape (batch, seq) = {tuple(x.shape[:2])}, got {shape}")
    return value


def check_padding_mask(padding_mask, x: Tensor):
    if _check_per_token("padding_mask", padding_mask, x) is None:
        return None
    if padding_mask.dtype != torch.bool:
        raise ValueError(f"padding_mask must be a bool tensor (True = padding), got {padding_mask.dtype}")
    return padding_mask


# ----------------------------------------------------------------------------------------------
# The layer


class Aaren(nn.Module):
    """Multi-head Aaren attention: a learned query per head, key/value/output projections.

    ``forward`` computes every prefix output in parallel; ``step`` folds new tokens into a
    constant-size ``AarenState``. ``y[:, k]`` attends to tokens ``0..k`` inclusive.
    """

    def __init__(self, embed_dim: int, num_heads: int = 1, bias: bool = True, scan_chunk: int = SCAN_CHUNK,
                 query_init: float = 0.02, recency: float = 0.0):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scan_chunk = scan_chunk
        if not query_init >= 0:
            raise ValueError(f"query_init must be a non-negative std, got {query_init}")
        if not (isinstance(recency, (int, float)) and math.isfinite(recency) and recency >= 0):
            raise ValueError(f"recency must be a finite number >= 0 (a score decay per token), got {recency!r}")
        self.recency = float(recency)
        # the RNN's "initial hidden state": one query per head, not computed from the input,
        # drawn from N(0, query_init^2)
        self.query = nn.Parameter(torch.randn(num_heads, self.head_dim) * query_init)
        self.kv = nn.Linear(embed_dim, 2 * embed_dim, bias=bias)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)

    def _score_value_projection(self) -> tuple[Tensor, Tensor | None]:
        """One (E + H + zeros, E) projection: E rows for the values, H rows for the scores, then
        zero rows up to a multiple of 8.

        A key meets nothing but its head's query, so the key projection and the query fold into
        one row per head: s = q . (W_k x + b_k) / sqrt(d) = (W_k^T q / sqrt(d)) . x + b_k . q / sqrt(d).
        The parameters stay ``kv`` and ``query`` (the paper's, and the checkpoints'); what is
        computed per token is the values and H numbers instead of keys and a dot product.
        """
        E, H, Dh = self.embed_dim, self.num_heads, self.head_dim
        q = self.query / math.sqrt(Dh)  # (H, Dh)
        w_k, w_v = self.kv.weight.split(E)  # (E, E) each
        w_s = (q.unsqueeze(-1) * w_k.view(H, Dh, E)).sum(1)  # (H, E); elementwise, so float32 under autocast
        # zero rows up to a multiple of 8 outputs: rows of 16-byte multiples keep the matrix
        # products on their fast (aligned) kernels; an odd width like 129 falls back to slow ones
        pad = self.kv.weight.new_zeros(-(E + H) % 8, E)
        weight = torch.cat([w_v, w_s, pad])
        if self.kv.bias is None:
            return weight, None
        b_k, b_v = self.kv.bias.split(E)
        return weight, torch.cat([b_v, (b_k.view(H, Dh) * q).sum(-1), pad[:, 0]])

    @torch.no_grad()
    def export_step_weights(self) -> dict:
        """What ``step`` computes with, for a backend outside PyTorch, as float32 NumPy arrays with
        matrices as (in, out): ``sv_w`` (E, E + H), ``sv_b`` (E + H) (the values, then one score
        per head: the folded key projection), ``out_w`` (E, E), ``out_b`` (E)."""
        E, H = self.embed_dim, self.num_heads
        w, b = self._score_value_projection()
        b = w.new_zeros(w.shape[0]) if b is None else b
        out_b = self.out.weight.new_zeros(E) if self.out.bias is None else self.out.bias
        return {"sv_w": as_array(w[:E + H].T), "sv_b": as_array(b[:E + H]),
                "out_w": as_array(self.out.weight.T), "out_b": as_array(out_b),
                "decay": as_array(torch.full((H,), self.recency))}

    def _project(self, x: Tensor) -> Tensor:
        """x (B, T, E) -> sv (B, T, E + H + pad): the values, one score per head, zeros."""
        return F.linear(x, *self._score_value_projection())

    def _split(self, sv: Tensor):
        """sv (B, T, E + H + pad) -> scores (B, H, T) and values (B, H, T, Dh), both views."""
        B, T, _ = sv.shape
        E, H = self.embed_dim, self.num_heads
        v = sv[..., :E].view(B, T, H, self.head_dim).transpose(1, 2)
        return sv[..., E:E + H].transpose(1, 2), v

    def _tokens(self, x: Tensor):
        """Per-head token triples of x (batch, seq, E): scores (B, H, T) and values (B, H, T, Dh)."""
        return self._split(self._project(x))

    def _output(self, u: Tensor, w: Tensor) -> Tensor:
        B, H, T, Dh = w.shape
        o = _readout(u, w).transpose(1, 2).reshape(B, T, self.embed_dim)  # (B, T, E)
        return self.out(o)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, episode_ids: Tensor | None = None) -> Tensor:
        """x (batch, seq, embed_dim) -> y of the same shape; padding (True) contributes nothing.
        ``episode_ids`` (batch, seq) integers, nondecreasing along seq: a token attends only to the
        tokens with its own id (packed episodes; see the module's docstring)."""
        check_tokens("x", x, self.embed_dim)
        padding_mask = check_padding_mask(padding_mask, x)
        episode_ids = check_episode_ids(episode_ids, x)
        sv = self._project(x)
        # + lam i (a decay of lam per token between each token and the query), + a gap per packed episode
        offset = score_offset(x.shape[1], self.recency, episode_ids, x.device, sv.dtype)
        if kernels.use_fused_scan(x):  # CUDA with Triton: the same outputs from one fused kernel
            o = kernels.aaren_scan_packed(sv, self.num_heads, self.head_dim, padding_mask,
                                          offset=offset)  # (B, H, T, Dh)
            y = self.out(o.transpose(1, 2).flatten(2))  # (B, T, E), no copy
            return y if padding_mask is None else y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        s, v = self._split(sv)
        if offset is not None:
            s = s.to(torch.promote_types(s.dtype, torch.float32)) + offset.unsqueeze(1)
        u = torch.ones_like(s)
        if padding_mask is not None:
            pad = padding_mask.unsqueeze(1)  # (B, 1, T)
            s = s.masked_fill(pad, NEG_INF)
            u = u.masked_fill(pad, 0.0)
            v = v.masked_fill(pad.unsqueeze(-1), 0.0)
        _, u, w = prefix_scan(s, u, v, self.scan_chunk)
        y = self._output(u, w)
        if padding_mask is not None:
            y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return y

    def init_state(self, batch_size: int, device=None, dtype=None) -> AarenState:
        p = self.query
        return AarenState.empty(batch_size, self.num_heads, self.head_dim,
                                device=device or p.device, dtype=dtype or p.dtype)

    def step(self, x: Tensor, state: AarenState, padding_mask: Tensor | None = None) -> tuple[Tensor, AarenState]:
        """Fold one token (batch, E) or a chunk of t tokens (batch, t, E) into the state.

        Returns the new tokens' outputs (same shape as x) and the new state. Tokens where
        ``padding_mask`` ((batch,) or (batch, t), True = padding) is True leave the state as it is.
        """
        check_tokens("x", x, self.embed_dim, ranks=(2, 3))
        self._check_state(state, x.shape[0])
        single = x.dim() == 2
        if single:
            x = x.unsqueeze(1)
            padding_mask = None if padding_mask is None else padding_mask.unsqueeze(1)
        padding_mask = check_padding_mask(padding_mask, x)
        s, v = self._tokens(x)  # (B, H, t), (B, H, t, Dh)
        prev_m = state.m
        if self.recency:  # every score referred to the chunk's last token: old ones decayed by lam per token
            t = s.shape[-1]
            s = _ramp(s, self.recency, -torch.arange(t - 1, -1, -1, device=s.device))
            prev_m = state.m - self.recency * t
        if padding_mask is not None:
            pad = padding_mask.unsqueeze(1)  # (B, 1, t)
            s = s.masked_fill(pad, NEG_INF)
            v = v.masked_fill(pad.unsqueeze(-1), 0.0)
        u = torch.ones_like(s) if padding_mask is None else torch.ones_like(s).masked_fill(padding_mask.unsqueeze(1), 0.0)
        if s.shape[-1] == 1:
            pm, pu, pw = s, u, v
        else:
            pm, pu, pw = prefix_scan(s, u, v, self.scan_chunk)
        prev = (prev_m.unsqueeze(-1), state.u.unsqueeze(-1), state.w.unsqueeze(-2))
        m, u, w = combine(prev, (pm, pu, pw))
        y = self._output(u, w)
        new_state = AarenState(m[..., -1], u[..., -1], w[..., -1, :])
        return (y.squeeze(1) if single else y), new_state

    def _check_state(self, state, batch_size: int) -> None:
        if not isinstance(state, AarenState):
            raise ValueError(f"state must be an AarenState (from init_state), got {type(state).__name__}")
        want = (batch_size, self.num_heads, self.head_dim)
        if tuple(state.w.shape) != want or tuple(state.m.shape) != want[:2] or tuple(state.u.shape) != want[:2]:
            raise ValueError(
                f"state has w of shape {tuple(state.w.shape)}, expected (batch, heads, head_dim) = {want}"
            )
