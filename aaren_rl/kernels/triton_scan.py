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

Segments of T. With few rows (the model's 64 x 3000 tokens: 64 rows of Dh blocks, one or two
programs per multiprocessor) each program's walk over T is a long chain of dependent blocks,
bound by latency, not bandwidth. Then T is cut into segments, one program each: a first,
scan-free pass reduces every segment to its totals (forward: its triple (m, u, w); backward: K
and C at its first token, from its own tokens), and each program starts from the fold of the
totals before it (forward) or after it (backward, every total moved to the segment's end with
e^(r_end - r_first) <= 1). It costs one more read of v (forward) or of g and o (backward), so
``_plan`` only cuts T when programs are scarce. On the H200 it halves the backward at the
model's shape (benchmarks/NOTES.md).

``AarenScanPacked`` runs the same kernels on the layer's packed projection (values, one score
per head, zero columns) and writes the gradient of that one buffer.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# block shapes: tokens per block; Dh per program (None: split Dh until there are programs_per_sm
# programs per multiprocessor); segments of T (None: cut T until there are programs_per_sm programs
# per multiprocessor, see ``_plan``); warps per program. ``aaren-rl bench scan --tune`` measures
# alternatives (benchmarks/NOTES.md)
DEFAULTS = {  # tuned on an H200 over the model's shape in bf16 and a large one, 2026-11-30 (benchmarks/NOTES.md)
    "fwd": dict(block_t=64, block_d=32, programs_per_sm=8, segments=None, num_warps=2),
    "bwd": dict(block_t=32, block_d=64, programs_per_sm=16, segments=None, num_warps=2),
}


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _linear_combine(a1, x1, a2, x2):
    # y_k = a_k y_{k-1} + x_k: segment 1 then segment 2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _program(T, H, D, seg_len, FIRST_SEG: tl.constexpr, BLOCK_D: tl.constexpr):
    """The work this program owns: its (batch, head) row pid_bh = b * H + h, its block of Dh
    (pid_d, offsets, mask) and its segment of T, [t0, t_end) (segment numbers from FIRST_SEG)."""
    pid_bh = tl.program_id(0)
    pid_d = tl.program_id(1)
    seg = tl.program_id(2) + FIRST_SEG
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t0 = seg * seg_len
    return pid_bh, pid_bh // H, pid_bh % H, pid_d, offs_d, offs_d < D, seg, t0, tl.minimum(t0 + seg_len, T)


@triton.jit
def _neg_inf_scalar(BLOCK_T: tl.constexpr):
    """-inf as a float32 scalar tensor that a loop can carry (the empty triple's m)."""
    return tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), axis=0)


@triton.jit
def _zero_scalar(BLOCK_T: tl.constexpr):
    """0 as a float32 scalar tensor that a loop can carry (the empty triple's u, a C share)."""
    return tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)


@triton.jit
def _fwd_totals_kernel(
    S, V, TM, TU, TW,
    T, H, D, n_seg, seg_len,
    s_sb, s_sh, s_st,
    v_sb, v_sh, v_st,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The triple (m, u, w) of each segment of seg_len tokens but the last (no scan: a reduction)."""
    pid_bh, b, h, pid_d, offs_d, mask_d, seg, t0, t_end = _program(T, H, D, seg_len, 0, BLOCK_D)
    S += b * s_sb + h * s_sh
    V += b * v_sb + h * v_sh
    idx = tl.arange(0, BLOCK_T)
    neg_inf = float("-inf")
    m_c = _neg_inf_scalar(BLOCK_T)
    u_c = _zero_scalar(BLOCK_T)
    w_c = tl.zeros([BLOCK_D], tl.float32)
    for start in range(t0, t_end, BLOCK_T):
        t = start + idx
        mask_t = t < t_end
        s = tl.load(S + t * s_st, mask=mask_t, other=neg_inf).to(tl.float32)
        v = tl.load(V + t[:, None] * v_st + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :],
                    other=0.0).to(tl.float32)
        m = tl.maximum(m_c, tl.max(s, axis=0))
        ref = tl.where(m == neg_inf, 0.0, m)
        carry = tl.exp(m_c - ref)
        e = tl.exp(s - ref)
        u_c = carry * u_c + tl.sum(e, axis=0)
        w_c = carry * w_c + tl.sum(e[:, None] * v, axis=0)
        m_c = m
    row = pid_bh * n_seg + seg
    tl.store(TW + row * D + offs_d, w_c, mask=mask_d)
    if pid_d == 0:
        tl.store(TM + row, m_c)
        tl.store(TU + row, u_c)


@triton.jit
def _scan_fwd_kernel(
    S, V, O, R, U, TM, TU, TW,
    T, H, D, n_seg, seg_len,
    s_sb, s_sh, s_st,
    v_sb, v_sh, v_st,
    o_sb, o_sh, o_st,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, b, h, pid_d, offs_d, mask_d, seg, t0, t_end = _program(T, H, D, seg_len, 0, BLOCK_D)
    S += b * s_sb + h * s_sh
    V += b * v_sb + h * v_sh
    O += b * o_sb + h * o_sh
    R += pid_bh * T
    U += pid_bh * T
    idx = tl.arange(0, BLOCK_T)
    is_last = idx == BLOCK_T - 1
    neg_inf = float("-inf")

    # the triple of all tokens before the current block: the empty one, then the earlier
    # segments' totals folded in (``combine``)
    m_c = _neg_inf_scalar(BLOCK_T)
    u_c = _zero_scalar(BLOCK_T)
    w_c = tl.zeros([BLOCK_D], tl.float32)
    for j in range(0, seg):
        row = pid_bh * n_seg + j
        tm = tl.load(TM + row)
        m = tl.maximum(m_c, tm)
        ref = tl.where(m == neg_inf, 0.0, m)
        ea = tl.exp(m_c - ref)
        eb = tl.exp(tm - ref)
        u_c = ea * u_c + eb * tl.load(TU + row)
        w_c = ea * w_c + eb * tl.load(TW + row * D + offs_d, mask=mask_d, other=0.0)
        m_c = m
    # the next block's inputs are loaded one iteration ahead, so their latency overlaps the scan
    t = t0 + idx
    s_next = tl.load(S + t * s_st, mask=t < t_end, other=neg_inf)
    s_prev_next = tl.load(S + (t - 1) * s_st, mask=(t >= 1) & (t - 1 < t_end), other=neg_inf)
    v_next = tl.load(V + t[:, None] * v_st + offs_d[None, :], mask=(t < t_end)[:, None] & mask_d[None, :],
                     other=0.0)
    for start in range(t0, t_end, BLOCK_T):
        t = start + idx
        mask_t = t < t_end
        s = s_next.to(tl.float32)
        s_prev = s_prev_next.to(tl.float32)
        v = v_next.to(tl.float32)
        tn = t + BLOCK_T
        s_next = tl.load(S + tn * s_st, mask=tn < t_end, other=neg_inf)
        s_prev_next = tl.load(S + (tn - 1) * s_st, mask=tn - 1 < t_end, other=neg_inf)
        v_next = tl.load(V + tn[:, None] * v_st + offs_d[None, :], mask=(tn < t_end)[:, None] & mask_d[None, :],
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
        # past the segment the scores are -inf, so the block's last row is the state after its last token
        m_c = tl.max(r, axis=0)
        u_c = tl.sum(tl.where(is_last, u, 0.0), axis=0)
        w_c = tl.sum(tl.where(is_last[:, None], w, 0.0), axis=0)


@triton.jit
def _bwd_totals_kernel(
    O, G, R, U, KT, CT,
    T, H, D, BH, n_seg, seg_len,
    o_sb, o_sh, o_st,
    g_sb, g_sh, g_st,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """K and this Dh block's share of C at the first token a of each segment but the first, from
    its own tokens only: sum_k e^(r_a - r_k) (g_k, g_k . o_k) / u_k (no scan: a reduction)."""
    pid_bh, b, h, pid_d, offs_d, mask_d, seg, t0, t_end = _program(T, H, D, seg_len, 1, BLOCK_D)
    O += b * o_sb + h * o_sh
    G += b * g_sb + h * g_sh
    R += pid_bh * T
    U += pid_bh * T
    idx = tl.arange(0, BLOCK_T)
    neg_inf = float("-inf")
    r_a = tl.load(R + t0)
    k_c = tl.zeros([BLOCK_D], tl.float32)
    c_c = _zero_scalar(BLOCK_T)
    for start in range(t0, t_end, BLOCK_T):
        t = start + idx
        mask_t = t < t_end
        mask = mask_t[:, None] & mask_d[None, :]
        g = tl.load(G + t[:, None] * g_st + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        o = tl.load(O + t[:, None] * o_st + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + t, mask=mask_t, other=neg_inf)
        u = tl.load(U + t, mask=mask_t, other=0.0)
        wt = tl.where((r == neg_inf) | (u == 0), 0.0, tl.exp(r_a - r) / u)  # r_a <= r
        k_c += tl.sum(wt[:, None] * g, axis=0)
        c_c += tl.sum(wt * tl.sum(g * o, axis=1), axis=0)
    row = pid_bh * n_seg + seg
    tl.store(KT + row * D + offs_d, k_c, mask=mask_d)
    tl.store(CT + pid_d * BH * n_seg + row, c_c)


@triton.jit
def _scan_bwd_kernel(
    S, V, O, G, R, U, DV, DSP, KT, CT,
    T, H, D, BH, n_seg, seg_len,
    s_sb, s_sh, s_st,
    v_sb, v_sh, v_st,
    o_sb, o_sh, o_st,
    g_sb, g_sh, g_st,
    dv_sb, dv_sh, dv_st,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, b, h, pid_d, offs_d, mask_d, seg, t0, t_end = _program(T, H, D, seg_len, 0, BLOCK_D)
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
    # the tokens after the current block, and r at the first of them: to begin with, the later
    # segments' totals, each moved from its first token to the first token after this segment
    r_c = tl.load(R + t_end, mask=t_end < T, other=neg_inf)
    k_c = tl.zeros([BLOCK_D], tl.float32)
    c_c = _zero_scalar(BLOCK_T)
    for i in range(seg + 1, n_seg):
        row = pid_bh * n_seg + i
        r_a = tl.load(R + i * seg_len)
        f = tl.where(r_a == neg_inf, 0.0, tl.exp(r_c - r_a))  # r_c <= r_a
        k_c += f * tl.load(KT + row * D + offs_d, mask=mask_d, other=0.0)
        c_c += f * tl.load(CT + pid_d * BH * n_seg + row)
    first_block = t0 // BLOCK_T
    n_blocks = tl.cdiv(t_end, BLOCK_T) - first_block
    # the block in reverse order: the scan runs from late to early tokens; g, o and v of the
    # next block (in that order) are loaded one iteration ahead
    t = (first_block + n_blocks - 1) * BLOCK_T + BLOCK_T - 1 - j
    mask = (t < t_end)[:, None] & mask_d[None, :]
    g_next = tl.load(G + t[:, None] * g_st + offs_d[None, :], mask=mask, other=0.0)
    o_next = tl.load(O + t[:, None] * o_st + offs_d[None, :], mask=mask, other=0.0)
    v_next = tl.load(V + t[:, None] * v_st + offs_d[None, :], mask=mask, other=0.0)
    for i in range(0, n_blocks):
        start = (first_block + n_blocks - 1 - i) * BLOCK_T
        t = start + BLOCK_T - 1 - j
        mask_t = t < t_end
        mask = mask_t[:, None] & mask_d[None, :]
        g = g_next.to(tl.float32)
        o = o_next.to(tl.float32)
        v = v_next.to(tl.float32)
        tn = t - BLOCK_T
        mask_n = (tn >= t0)[:, None] & mask_d[None, :]
        g_next = tl.load(G + tn[:, None] * g_st + offs_d[None, :], mask=mask_n, other=0.0)
        o_next = tl.load(O + tn[:, None] * o_st + offs_d[None, :], mask=mask_n, other=0.0)
        v_next = tl.load(V + tn[:, None] * v_st + offs_d[None, :], mask=mask_n, other=0.0)

        r = tl.load(R + t, mask=mask_t, other=neg_inf)
        r_next = tl.load(R + t + 1, mask=t + 1 < t_end, other=neg_inf)
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


MIN_SEGMENT_BLOCKS = 4  # a segment of T walks at least this many blocks (its carry-in costs a little)
SPLIT_T_BELOW = 4  # programs per multiprocessor under which T is cut into segments at all


def _plan(B: int, H: int, T: int, D: int, device, cfg: dict):
    """(block_d, Dh blocks, segment length, segments): Dh is split first (``_block_d``). If that
    leaves fewer than SPLIT_T_BELOW programs per multiprocessor (few, long rows: the model's
    64 x 3000 tokens), T is cut into segments too, up to ``programs_per_sm`` programs per
    multiprocessor. Segments cost a pass over the inputs for their totals, which pays only when
    programs are that scarce. ``segments`` in the config overrides the count."""
    block_t = cfg["block_t"]
    block_d = cfg["block_d"] or _block_d(D, B * H, cfg["programs_per_sm"], device)
    n_d = triton.cdiv(D, block_d)
    n_blocks = triton.cdiv(T, block_t)
    segments = cfg.get("segments")
    if segments is None:
        n_sm = _sm_count(device)
        want = cfg["programs_per_sm"] * n_sm if B * H * n_d < SPLIT_T_BELOW * n_sm else 1
        segments = min(triton.cdiv(want, B * H * n_d), max(1, n_blocks // MIN_SEGMENT_BLOCKS))
    segments = max(1, min(int(segments), n_blocks))
    seg_len = triton.cdiv(n_blocks, segments) * block_t
    return block_d, n_d, seg_len, triton.cdiv(T, seg_len)


def _check(s: torch.Tensor, v: torch.Tensor) -> None:
    if s.dim() != 3 or v.dim() != 4 or v.shape[:3] != s.shape:
        raise ValueError(f"expected s (B, H, T) and v (B, H, T, Dh), got {tuple(s.shape)} and {tuple(v.shape)}")
    if s.device != v.device:
        raise ValueError(f"s is on {s.device}, v on {v.device}")


def _config(direction: str, overrides: dict) -> dict:
    cfg = dict(DEFAULTS[direction])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown scan kernel settings {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update({k: x for k, x in overrides.items() if x is not None})
    return cfg


def scan_forward(s: torch.Tensor, v: torch.Tensor, **config):
    """o (B, H, T, Dh) as a view of a (B, T, H, Dh) buffer, and r, u (B, H, T) float32.

    ``config`` overrides ``DEFAULTS["fwd"]`` (block_t, block_d, programs_per_sm, segments, num_warps).
    """
    _check(s, v)
    cfg = _config("fwd", config)
    B, H, T, D = v.shape
    if v.stride(-1) != 1:
        v = v.contiguous()
    o = torch.empty(B, T, H, D, device=v.device, dtype=v.dtype).transpose(1, 2)  # (B, H, T, Dh) view
    r = torch.empty(B, H, T, device=v.device, dtype=torch.float32)
    u = torch.empty_like(r)
    block_d, n_d, seg_len, n_seg = _plan(B, H, T, D, v.device, cfg)
    # each segment's own triple, for the segments after it (the last one's is never needed)
    tm = torch.empty(B * H, n_seg, device=v.device, dtype=torch.float32)
    tu = torch.empty_like(tm)
    tw = torch.empty(B * H, n_seg, D, device=v.device, dtype=torch.float32)
    strides = (s.stride(0), s.stride(1), s.stride(2), v.stride(0), v.stride(1), v.stride(2))
    if n_seg > 1:
        _fwd_totals_kernel[(B * H, n_d, n_seg - 1)](
            s, v, tm, tu, tw, T, H, D, n_seg, seg_len, *strides,
            BLOCK_T=cfg["block_t"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
        )
    _scan_fwd_kernel[(B * H, n_d, n_seg)](
        s, v, o, r, u, tm, tu, tw, T, H, D, n_seg, seg_len, *strides,
        o.stride(0), o.stride(1), o.stride(2),
        BLOCK_T=cfg["block_t"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )
    return o, r, u


def scan_backward(s, v, o, r, u, g, dv=None, **config):
    """(ds, dv) for the upstream gradient g = dL/do; ``config`` overrides ``DEFAULTS["bwd"]``.

    ``dv``: where to write dv (a (B, H, T, Dh) view with unit stride in Dh); a new buffer if None.
    """
    cfg = _config("bwd", config)
    B, H, T, D = v.shape
    g, v, o = (x if x.stride(-1) == 1 else x.contiguous() for x in (g, v, o))
    block_d, n_d, seg_len, n_seg = _plan(B, H, T, D, v.device, cfg)
    if dv is None:
        dv = torch.empty(B, T, H, D, device=v.device, dtype=v.dtype).transpose(1, 2)
    ds_part = torch.empty(n_d, B, H, T, device=v.device, dtype=torch.float32)  # one share per Dh block
    # each segment's own K and C shares at its first token, for the segments before it
    kt = torch.empty(B * H, n_seg, D, device=v.device, dtype=torch.float32)
    ct = torch.empty(n_d, B * H, n_seg, device=v.device, dtype=torch.float32)
    og_strides = (o.stride(0), o.stride(1), o.stride(2), g.stride(0), g.stride(1), g.stride(2))
    if n_seg > 1:
        _bwd_totals_kernel[(B * H, n_d, n_seg - 1)](
            o, g, r, u, kt, ct, T, H, D, B * H, n_seg, seg_len, *og_strides,
            BLOCK_T=cfg["block_t"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
        )
    _scan_bwd_kernel[(B * H, n_d, n_seg)](
        s, v, o, g, r, u, dv, ds_part, kt, ct,
        T, H, D, B * H, n_seg, seg_len,
        s.stride(0), s.stride(1), s.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *og_strides,
        dv.stride(0), dv.stride(1), dv.stride(2),
        BLOCK_T=cfg["block_t"], BLOCK_D=block_d, num_warps=cfg["num_warps"],
    )
    ds = ds_part[0] if n_d == 1 else ds_part.sum(0)
    return ds.to(s.dtype), dv


def _split_packed(sv: torch.Tensor, num_heads: int, head_dim: int):
    B, T, _ = sv.shape
    E = num_heads * head_dim
    v = sv[..., :E].view(B, T, num_heads, head_dim).transpose(1, 2)  # (B, H, T, Dh)
    return sv[..., E:E + num_heads].transpose(1, 2), v  # s (B, H, T)


class AarenScanPacked(torch.autograd.Function):
    """The scan of a packed projection sv = (values | one score per head | padding), (B, T, F).

    ``scan_forward``/``scan_backward`` on the two views, with one (B, T, F) gradient buffer that
    the backward kernel writes dv into directly, so no slice of sv needs a gradient of its own
    (which autograd would assemble with extra passes over the values' size).
    """

    @staticmethod
    def forward(ctx, sv: torch.Tensor, num_heads: int, head_dim: int, padding_mask: torch.Tensor | None,
                recency: float = 0.0, offset: torch.Tensor | None = None):
        s, v = _split_packed(sv, num_heads, head_dim)
        if recency:  # a decay per token (layer.py): + recency * i, in float32 (not in sv's bf16)
            s = s.float() + recency * torch.arange(s.shape[-1], device=s.device, dtype=torch.float32)
        if offset is not None:  # a float32 (B or 1, T) addition to every head's scores (layer.score_offset)
            s = s.float() + offset.to(torch.float32).unsqueeze(1)
        if padding_mask is not None:  # a masked score gets no gradient, as with masked_fill
            s = s.masked_fill(padding_mask.unsqueeze(1), float("-inf"))
        o, r, u = scan_forward(s, v)
        ctx.shape = num_heads, head_dim
        ctx.save_for_backward(sv, s, o, r, u)
        return o

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        sv, s, o, r, u = ctx.saved_tensors
        H, Dh = ctx.shape
        _, v = _split_packed(sv, H, Dh)
        d_sv = torch.empty_like(sv)
        d_s, d_v = _split_packed(d_sv, H, Dh)
        ds, _ = scan_backward(s, v, o, r, u, g, dv=d_v)
        d_s.copy_(ds)
        d_sv[..., H * Dh + H:].zero_()  # the padding columns
        return d_sv, None, None, None, None, None


def aaren_scan_packed(sv: torch.Tensor, num_heads: int, head_dim: int,
                      padding_mask: torch.Tensor | None = None, recency: float = 0.0,
                      offset: torch.Tensor | None = None) -> torch.Tensor:
    """o (B, H, T, Dh) from sv (B, T, F): values in the first H * Dh columns, then one score per
    head, then any padding columns (ignored; their gradient is 0).

    ``padding_mask`` (B, T), True = padding: those tokens contribute nothing. ``recency`` > 0:
    token i's score plus recency * i (float32), a decay of recency per token (``layer.Aaren``).
    ``offset`` (B or 1, T), float32: added to every head's scores of those tokens (a ramp, packed
    episodes' gaps; ``layer.score_offset``); its gradient is not computed.
    """
    if sv.dim() != 3 or sv.shape[-1] < num_heads * (head_dim + 1):
        raise ValueError(f"expected sv (B, T, F) with F >= H * (Dh + 1) = {num_heads * (head_dim + 1)}, "
                         f"got {tuple(sv.shape)}")
    if sv.stride(-1) != 1:
        sv = sv.contiguous()
    if padding_mask is not None and padding_mask.shape != sv.shape[:2]:
        raise ValueError(f"padding_mask must have shape {tuple(sv.shape[:2])}, got {tuple(padding_mask.shape)}")
    if offset is not None and (offset.dim() != 2 or offset.shape[1] != sv.shape[1]
                               or offset.shape[0] not in (1, sv.shape[0])):
        raise ValueError(f"offset must have shape ({sv.shape[0]} or 1, {sv.shape[1]}), got {tuple(offset.shape)}")
    return AarenScanPacked.apply(sv, num_heads, head_dim, padding_mask, float(recency), offset)

