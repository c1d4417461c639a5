"""The Aaren scan fused into one Triton kernel each way (forward and backward).

Contract (the same as ``layer.prefix_scan`` + readout): scores s (B, H, T), padding already
-inf, and values v (B, H, T, Dh) give o (B, H, T, Dh), o_k = sum_{i<=k} softmax(s_{0..k})_i v_i,
and o_k = 0 where every score so far is -inf.

Forward. One program per (batch, head, block of Dh) walks T in blocks of BLOCK_T tokens and
carries the triple (m, u, w) of everything before the block in registers, so s and v are read
once and o written once. Inside a block the fold is a linear recurrence once the running max
r_k = max(m, s_..k) is known (a max-scan of the scores):

    u_k = a_k u_{k-1} + b_k,   w_k = a_k w_{k-1} + b_k v_k,   a_k = e^(r_{k-1} - r_k), b_k = e^(s_k - r_k)

which is ``combine`` with the maxima taken first; every exponent is <= 0, so it cannot overflow,
and a and b are per token (exponentials on a vector, not on the (BLOCK_T, Dh) tile). The tile
scan itself is multiply-adds (``tl.associative_scan``). The forward also writes r and u (two
numbers per token and head) for the backward; w is never stored.

Backward. With Z_k = u_k e^(r_k) and g_k = dL/do_k, for i <= k: do_k/dv_i = e^(s_i)/Z_k and
do_k/ds_i = e^(s_i)/Z_k (v_i - o_k). So, referring every exponent to r_i (stable: r_i <= r_k),

    K_i = sum_{k>=i} e^(r_i - r_k) g_k / u_k         (a vector; K_i = g_i/u_i + e^(r_i - r_{i+1}) K_{i+1})
    C_i = sum_{k>=i} e^(r_i - r_k) (g_k . o_k) / u_k  (a scalar, the same recurrence)
    dv_i = e^(s_i - r_i) K_i,   ds_i = e^(s_i - r_i) (v_i . K_i - C_i)

a reverse scan of the same shape as the forward (blocks walked from the end, each block loaded in
reverse order and scanned forwards). C is linear in g_k . o_k, so a program that owns one block
of Dh runs the C recurrence on its own share of that dot product and the shares of ds add up
(one small sum over Dh blocks after the kernel). It reads s, v, o, g, r, u and writes dv and ds:
four passes over tensors of v's size, the least a backward can do without recomputing o.
Nothing of size (T, Dh) is kept from the forward but o itself,
which the output projection keeps anyway (``o`` is returned as a view of a (B, T, H, Dh) buffer,
so the merge of heads costs no copy).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# block shapes: tokens per block; Dh per program (None: split Dh until there are programs_per_sm
# programs per multiprocessor); warps per program. ``aaren-rl bench scan --tune`` measures
# alternatives (benchmarks/NOTES.md)
DEFAULTS = {  # tuned on an H200, 2026-11-30 (benchmarks/NOTES.md)
    "fwd": dict(block_t=64, block_d=None, programs_per_sm=4, num_warps=2),
    "bwd": dict(block_t=32, block_d=None, programs_per_sm=8, num_warps=2),
}


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _linear_combine(a1, x1, a2, x2):
    # y_k = a_k y_{k-1} + x_k: segment 1 then segment 2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _scan_fwd_kernel(
    S, V, O, R, U,
    T, H, D,
    s_sb, s_sh, s_st,
    v_sb, v_sh, v_st,
    o_sb, o_sh, o_st,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    S += b * s_sb + h * s_sh
    V += b * v_sb + h * v_sh
    O += b * o_sb + h * o_sh
    R += pid_bh * T
    U += pid_bh * T
    idx = tl.arange(0, BLOCK_T)
    is_last = idx == BLOCK_T - 1
    neg_inf = float("-inf")

    # the triple of all tokens before the current block: the empty one to begin with
    m_c = tl.max(tl.full([BLOCK_T], neg_inf, tl.float32), axis=0)
    u_c = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
    w_c = tl.zeros([BLOCK_D], tl.float32)
    # the next block's inputs are loaded one iteration ahead, so their latency overlaps the scan
    t = idx
    s_next = tl.load(S + t * s_st, mask=t < T, other=neg_inf)
    s_prev_next = tl.load(S + (t - 1) * s_st, mask=(t >= 1) & (t - 1 < T), other=neg_inf)
    v_next = tl.load(V + t[:, None] * v_st + offs_d[None, :], mask=(t < T)[:, None] & mask_d[None, :], other=0.0)
    for start in range(0, T, BLOCK_T):
        t = start + idx
        mask_t = t < T
        s = s_next.to(tl.float32)
        s_prev = s_prev_next.to(tl.float32)
        v = v_next.to(tl.float32)
        tn = t + BLOCK_T
        s_next = tl.load(S + tn * s_st, mask=tn < T, other=neg_inf)
        s_prev_next = tl.load(S + (tn - 1) * s_st, mask=tn - 1 < T, other=neg_inf)
        v_next = tl.load(V + tn[:, None] * v_st + offs_d[None, :], mask=(tn < T)[:, None] & mask_d[None, :],
                         other=0.0)

        r = tl.maximum(tl.associative_scan(s, 0, _max_combine), m_c)  # running max up to t
        r_prev = tl.maximum(tl.associative_scan(s_prev, 0, _max_combine), m_c)  # up to t - 1
        r_ref = tl.where(r == neg_inf, 0.0, r)  # an empty prefix: any finite reference
        a = tl.exp(r_prev - r_ref)
        bb = tl.exp(s - r_ref)
        _, u_in = tl.associative_scan((a, bb), 0, _linear_combine)
        a2 = tl.broadcast_to(a[:, None], (BLOCK_T, BLOCK_D))
        _, w_in = tl.associative_scan((a2, bb[:, None] * v), 0, _linear_combine)
        carry = tl.exp(m_c - r_ref)  # m_c <= r; 0 while nothing came before
        u = carry * u_c + u_in
        w = carry[:, None] * w_c[None, :] + w_in
        inv_u = tl.where(u > 0, 1.0 / u, 0.0)  # an all-padding prefix reads out as 0
        o = w * inv_u[:, None]
        tl.store(O + t[:, None] * o_st + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=mask_t[:, None] & mask_d[None, :])
        if pid_d == 0:
            tl.store(R + t, r, mask=mask_t)
            tl.store(U + t, u, mask=mask_t)
        # past T the scores are -inf, so the block's last row is the state after its last token
        m_c = tl.max(r, axis=0)
        u_c = tl.sum(tl.where(is_last, u, 0.0), axis=0)
        w_c = tl.sum(tl.where(is_last[:, None], w, 0.0), axis=0)


@triton.jit
def _scan_bwd_kernel(
    S, V, O, G, R, U, DV, DSP,
    T, H, D, BH,
    s_sb, s_sh, s_st,
    v_sb, v_sh, v_st,
    o_sb, o_sh, o_st,
    g_sb, g_sh, g_st,
    dv_sb, dv_sh, dv_st,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    S += b * s_sb + h * s_sh
    V += b * v_sb + h * v_sh
    O += b * o_sb + h * o_sh
    G += b * g_sb + h * g_sh
    DV += b * dv_sb + h * dv_sh
    R += pid_bh * T
    U += pid_bh * T
    DSP += (pid_d * BH + pid_bh) * T
    j = tl.arange(0, BLOCK_T)
    is_last = j == BLOCK_T - 1
    neg_inf = float("-inf")

    # K and C (this Dh block's share of it: C is linear in g . o, which sums over Dh blocks) of
    # the tokens after the current block, and r at the first of them
    k_c = tl.zeros([BLOCK_D], tl.float32)
    c_c = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
    r_c = tl.max(tl.full([BLOCK_T], neg_inf, tl.float32), axis=0)
    n_blocks = tl.cdiv(T, BLOCK_T)
    # the block in reverse order: the scan runs from late to early tokens; g, o and v of the
    # next block (in that order) are loaded one iteration ahead
    t = (n_blocks - 1) * BLOCK_T + BLOCK_T - 1 - j
    mask = (t < T)[:, None] & mask_d[None, :]
    g_next = tl.load(G + t[:, None] * g_st + offs_d[None, :], mask=mask, other=0.0)
    o_next = tl.load(O + t[:, None] * o_st + offs_d[None, :], mask=mask, other=0.0)
    v_next = tl.load(V + t[:, None] * v_st + offs_d[None, :], mask=mask, other=0.0)
    for i in range(0, n_blocks):
        start = (n_blocks - 1 - i) * BLOCK_T
        t = start + BLOCK_T - 1 - j
        mask_t = t < T
        mask = mask_t[:, None] & mask_d[None, :]
        g = g_next.to(tl.float32)
        o = o_next.to(tl.float32)
        v = v_next.to(tl.float32)
        tn = t - BLOCK_T
        mask_n = (tn >= 0)[:, None] & mask_d[None, :]
        g_next = tl.load(G + tn[:, None] * g_st + offs_d[None, :], mask=mask_n, other=0.0)
        o_next = tl.load(O + tn[:, None] * o_st + offs_d[None, :], mask=mask_n, other=0.0)
        v_next = tl.load(V + tn[:, None] * v_st + offs_d[None, :], mask=mask_n, other=0.0)

        r = tl.load(R + t, mask=mask_t, other=neg_inf)
        r_next = tl.load(R + t + 1, mask=t + 1 < T, other=neg_inf)
        u = tl.load(U + t, mask=mask_t, other=0.0)
        s = tl.load(S + t * s_st, mask=mask_t, other=neg_inf).to(tl.float32)
        alpha = tl.where(r_next == neg_inf, 0.0, tl.exp(r - r_next))  # r <= r_next
        inv_u = tl.where(u > 0, 1.0 / u, 0.0)
        a2 = tl.broadcast_to(alpha[:, None], (BLOCK_T, BLOCK_D))
        _, k_in = tl.associative_scan((a2, g * inv_u[:, None]), 0, _linear_combine)
        _, c_in = tl.associative_scan((alpha, tl.sum(g * o, axis=1) * inv_u), 0, _linear_combine)
        carry = tl.where(r_c == neg_inf, 0.0, tl.exp(r - r_c))  # product of the alphas up to the next block
        k = k_in + carry[:, None] * k_c[None, :]
        c = c_in + carry * c_c
        e = tl.exp(s - tl.where(r == neg_inf, 0.0, r))  # s <= r; 0 for padding
        tl.store(DV + t[:, None] * dv_st + offs_d[None, :], (e[:, None] * k).to(DV.dtype.element_ty), mask=mask)
        tl.store(DSP + t, e * (tl.sum(v * k, axis=1) - c), mask=mask_t)
        k_c = tl.sum(tl.where(is_last[:, None], k, 0.0), axis=0)
        c_c = tl.sum(tl.where(is_last, c, 0.0), axis=0)
        r_c = tl.load(R + start)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _block_d(head_dim: int, programs_per_d: int, programs_per_sm: int, device) -> int:
    """Split Dh until there are ``programs_per_sm`` programs per multiprocessor (or Dh blocks of 16)."""
    block_d = triton.next_power_of_2(head_dim)
    n_sm = _sm_count(device)
    while block_d > 16 and programs_per_d * triton.cdiv(head_dim, block_d) < programs_per_sm * n_sm:
        block_d //= 2
    return block_d


def _check(s: torch.Tensor, v: torch.Tensor) -> None:
    if s.dim() != 3 or v.dim() != 4 or v.shape[:3] != s.shape:
        raise ValueError(f"expected s (B, H, T) and v (B, H, T, Dh), got {tuple(s.shape)} and {tuple(v.shape)}")
    if s.device != v.device:
        raise ValueError(f"s is on {s.device}, v on {v.device}")


def _config(direction: str, overrides: dict) -> dict:
    cfg = dict(DEFAULTS[direction])
    cfg.update({k: x for k, x in overrides.items() if x is not None})
    return cfg


def scan_forward(s: torch.Tensor, v: torch.Tensor, **config):
    """o (B, H, T, Dh) as a view of a (B, T, H, Dh) buffer, and r, u (B, H, T) float32.

    ``config`` overrides ``DEFAULTS["fwd"]`` (block_t, block_d, programs_per_sm, num_warps).
    """
    _check(s, v)
    cfg = _config("fwd", config)
    B, H, T, D = v.shape
    if v.stride(-1) != 1:
        v = v.contiguous()
    o = torch.empty(B, T, H, D, device=v.device, dtype=v.dtype).transpose(1, 2)  # (B, H, T, Dh) view
    r = torch.empty(B, H, T, device=v.device, dtype=torch.float32)
    u = torch.empty_like(r)
    block_d = cfg["block_d"] or _block_d(D, B * H, cfg["programs_per_sm"], v.device)
    grid = (B * H, triton.cdiv(D, block_d))
    _scan_fwd_kernel[grid](
        s, v, o, r, u, T, H, D,
        s.stride(0), s.stride(1), s.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        BLOCK_T=cfg["block_t"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )
    return o, r, u


def scan_backward(s, v, o, r, u, g, **config):
    """(ds, dv) for the upstream gradient g = dL/do; ``config`` overrides ``DEFAULTS["bwd"]``."""
    cfg = _config("bwd", config)
    B, H, T, D = v.shape
    g, v, o = (x if x.stride(-1) == 1 else x.contiguous() for x in (g, v, o))
    block_d = cfg["block_d"] or _block_d(D, B * H, cfg["programs_per_sm"], v.device)
    n_d = triton.cdiv(D, block_d)
    dv = torch.empty(B, T, H, D, device=v.device, dtype=v.dtype).transpose(1, 2)
    ds_part = torch.empty(n_d, B, H, T, device=v.device, dtype=torch.float32)  # one share per Dh block
    _scan_bwd_kernel[(B * H, n_d)](
        s, v, o, g, r, u, dv, ds_part,
        T, H, D, B * H,
        s.stride(0), s.stride(1), s.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        g.stride(0), g.stride(1), g.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        BLOCK_T=cfg["block_t"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )
    ds = ds_part[0] if n_d == 1 else ds_part.sum(0)
    return ds.to(s.dtype), dv


class AarenScan(torch.autograd.Function):
    """o = prefix softmax-weighted averages of v under scores s; see the module docstring."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o, r, u = scan_forward(s, v)
        ctx.save_for_backward(s, v, o, r, u)
        return o

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        s, v, o, r, u = ctx.saved_tensors
        ds, dv = scan_backward(s, v, o, r, u, g)
        return ds, dv


def aaren_scan(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Prefix softmax-weighted averages: s (B, H, T), v (B, H, T, Dh) -> o (B, H, T, Dh)."""
    _check(s, v)
    return AarenScan.apply(s, v)
