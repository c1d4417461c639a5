"""The fused Triton scan == the plain scan + readout, forward and backward.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
imported); without Triton the file is skipped.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined (import)
pytest.importorskip("triton")

from aaren_rl import Aaren, kernels  # noqa: E402
from aaren_rl.kernels import triton_scan  # noqa: E402
from aaren_rl.layer import _readout, prefix_scan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter evaluates both sides of tl.where, e.g. 1 / 0 where u == 0, with NumPy
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
NEG_INF = float("-inf")


def reference(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The plain path of Aaren.forward: scan the triples (s, 1, v), read out w / u."""
    u = torch.where(torch.isneginf(s), 0.0, 1.0).to(s.dtype)
    _, u, w = prefix_scan(s, u, v)
    return _readout(u, w)


class AarenScan(torch.autograd.Function):
    """The kernels on the two views s, v (the packed variant is what the layer runs)."""

    @staticmethod
    def forward(ctx, s, v):
        o, r, u = triton_scan.scan_forward(s, v)
        ctx.save_for_backward(s, v, o, r, u)
        return o

    @staticmethod
    def backward(ctx, g):
        return triton_scan.scan_backward(*ctx.saved_tensors, g)


aaren_scan = AarenScan.apply


def inputs(B, H, T, D, seed, scale=3.0, pad=None):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, H, T, generator=g, dtype=torch.float64) * scale
    v = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    if pad is not None:
        s = s.masked_fill(pad.unsqueeze(1), NEG_INF)
    return s, v


def rel_err(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-30)).item()


SHAPES = [(1, 1, 1, 4), (2, 1, 7, 8), (2, 3, 64, 16), (1, 2, 100, 24), (3, 1, 70, 32)]  # several blocks of 16


# (Dh per program, segments of T): whole, Dh split, T split (the carry-in from earlier
# segments' totals), both; T = 100 in blocks of 16 and 3 segments leaves a short last one
SPLITS = [(None, None), (8, None), (None, 3), (8, 2)]


@pytest.mark.parametrize("B,H,T,D", SHAPES)
@pytest.mark.parametrize("block_d,segments", SPLITS)
def test_forward_equals_plain_scan(B, H, T, D, block_d, segments):
    s, v = inputs(B, H, T, D, seed=T + D)
    o, r, u = triton_scan.scan_forward(s.float().to(DEVICE), v.float().to(DEVICE), block_t=16, block_d=block_d,
                                       segments=segments)
    assert torch.isfinite(o).all()
    assert rel_err(o, reference(s, v)) < 1e-5
    assert rel_err(r, torch.cummax(s, -1).values) < 1e-6


@pytest.mark.parametrize("scale", [0.1, 30.0, 300.0])
def test_forward_stable_for_any_score_magnitude(scale):
    # e^s overflows float32 for s > 88: every exponent must be taken relative to a running max
    s, v = inputs(2, 1, 100, 16, seed=1, scale=scale)
    o = aaren_scan(s.float().to(DEVICE), v.float().to(DEVICE))
    assert rel_err(o, reference(s, v)) < 1e-5


def padding_masks(B, T):
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, :5] = True  # padding first: an empty prefix reads out as 0
    pad[1, 20:40] = True  # a gap in the middle, across a block boundary
    pad[2, :] = True  # nothing at all
    return pad


def test_padding_matches_plain_scan_and_gives_zero_for_empty_prefix():
    B, T = 3, 70
    s, v = inputs(B, 2, T, 8, seed=3, pad=padding_masks(B, T))
    o = aaren_scan(s.float().to(DEVICE), v.float().to(DEVICE))
    assert torch.isfinite(o).all()
    assert rel_err(o, reference(s, v)) < 1e-5
    assert (o[0, :, :5] == 0).all() and (o[2] == 0).all()


@pytest.mark.parametrize("B,H,T,D", SHAPES[1:])
@pytest.mark.parametrize("block_d,segments", SPLITS)
def test_backward_equals_autograd_of_plain_scan(B, H, T, D, block_d, segments):
    pad = padding_masks(B, T) if B >= 3 else None
    s, v = inputs(B, H, T, D, seed=T * D, pad=pad)
    g = torch.randn(B, H, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(T * D + 1))
    # reference: float64 autograd through the plain scan
    s64, v64 = s.clone().requires_grad_(), v.clone().requires_grad_()
    reference(s64, v64).backward(g)
    # kernel, float32
    sf, vf, gf = (t.float().to(DEVICE) for t in (s, v, g))
    o, r, u = triton_scan.scan_forward(sf, vf, block_t=16, block_d=block_d, segments=segments)
    ds, dv = triton_scan.scan_backward(sf, vf, o, r, u, gf, block_t=16, block_d=block_d, segments=segments)
    assert torch.isfinite(ds).all() and torch.isfinite(dv).all()
    ref_ds = torch.nan_to_num(s64.grad)  # padding: no gradient
    assert rel_err(dv, v64.grad) < 1e-5
    assert rel_err(ds, ref_ds) < 1e-5
    if pad is not None:
        assert (ds.cpu()[pad.unsqueeze(1).expand_as(ds)] == 0).all()


# scores of +-300 make each softmax one-hot: ds = e (v . K - C) then cancels, and float32 keeps
# ~1e-4 of it for some gradients (the kernel with or without segments alike; the plain float32
# scan ~1e-5); the outputs and dv stay at 1e-6
DS_TOL = {0.1: 1e-5, 300.0: 1e-3}


@pytest.mark.parametrize("scale", [0.1, 300.0])
def test_segments_across_padding_and_huge_scores(scale):
    """T cut into segments of 32 while a row's padding covers the whole first segment and more,
    and scores far beyond float32's exp range: forward and backward still match."""
    B, H, T, D = 3, 1, 70, 8
    pad = padding_masks(B, T)
    pad[0, :40] = True
    s, v = inputs(B, H, T, D, seed=5, scale=scale, pad=pad)
    g = torch.randn(B, H, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    s64, v64 = s.clone().requires_grad_(), v.clone().requires_grad_()
    ref = reference(s64, v64)
    ref.backward(g)
    sf, vf, gf = (t.float().to(DEVICE) for t in (s, v, g))
    o, r, u = triton_scan.scan_forward(sf, vf, block_t=16, segments=3)
    ds, dv = triton_scan.scan_backward(sf, vf, o, r, u, gf, block_t=16, segments=3)
    assert torch.isfinite(o).all() and torch.isfinite(ds).all() and torch.isfinite(dv).all()
    assert rel_err(o, ref.detach()) < 1e-5
    assert rel_err(dv, v64.grad) < 1e-5
    assert rel_err(ds, torch.nan_to_num(s64.grad)) < DS_TOL[scale]


def test_unknown_kernel_setting_is_named():
    s, v = inputs(1, 1, 8, 4, seed=0)
    with pytest.raises(ValueError, match="block_size"):
        triton_scan.scan_forward(s.float().to(DEVICE), v.float().to(DEVICE), block_size=16)


def test_autograd_function_gradcheck_in_float32():
    s, v = inputs(2, 1, 40, 8, seed=7)
    sf = s.float().to(DEVICE).requires_grad_()
    vf = v.float().to(DEVICE).requires_grad_()
    g = torch.randn(2, 1, 40, 8).to(DEVICE)
    aaren_scan(sf, vf).backward(g)
    s64, v64 = s.clone().requires_grad_(), v.clone().requires_grad_()
    reference(s64, v64).backward(g.double().cpu())
    assert rel_err(sf.grad, s64.grad) < 1e-5 and rel_err(vf.grad, v64.grad) < 1e-5


@pytest.mark.parametrize("with_pad", [False, True])
def test_packed_scan_equals_plain_scan_and_writes_one_gradient(with_pad):
    """sv = (values | one score per head | padding columns): outputs and d(sv) match autograd
    of the plain scan, and the padding columns get a zero gradient."""
    B, T, H, D = 3, 70, 2, 8
    F = H * D + H + 6
    g = torch.Generator().manual_seed(11)
    sv = torch.randn(B, T, F, generator=g, dtype=torch.float64)
    sv[..., H * D:] *= 3
    pad = padding_masks(B, T) if with_pad else None
    grad_o = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    # reference: float64 autograd through the plain scan of the two views
    ref_sv = sv.clone().requires_grad_()
    s, v = triton_scan._split_packed(ref_sv, H, D)
    if pad is not None:
        s = s.masked_fill(pad.unsqueeze(1), NEG_INF)
    ref_o = reference(s, v)
    ref_o.backward(grad_o)
    # the packed kernel, float32
    svf = sv.float().to(DEVICE).requires_grad_()
    o = kernels.aaren_scan_packed(svf, H, D, None if pad is None else pad.to(DEVICE))
    o.backward(grad_o.float().to(DEVICE))
    assert rel_err(o, ref_o.detach()) < 1e-5
    assert rel_err(svf.grad, torch.nan_to_num(ref_sv.grad)) < 1e-5
    assert (svf.grad[..., H * D + H:] == 0).all()
    if pad is not None:  # a padded token's score and value get no gradient
        assert (svf.grad.cpu()[pad] == 0).all()


@pytest.mark.parametrize("recency", [0.3, 4.0])
def test_packed_scan_with_recency_adds_the_ramp_in_float32(recency):
    """recency: the scores plus recency * i before the scan (the wrapper adds the ramp in float32,
    as a bf16 ramp could not tell i = 900 from 901); outputs and d(sv) as autograd of the plain scan."""
    B, T, H, D = 3, 150, 2, 8
    F = H * D + H
    g = torch.Generator().manual_seed(5)
    sv = torch.randn(B, T, F, generator=g, dtype=torch.float64)
    pad = padding_masks(B, T)
    grad_o = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    ref_sv = sv.clone().requires_grad_()
    s, v = triton_scan._split_packed(ref_sv, H, D)
    s = (s + recency * torch.arange(T, dtype=torch.float64)).masked_fill(pad.unsqueeze(1), NEG_INF)
    ref_o = reference(s, v)
    ref_o.backward(grad_o)
    svf = sv.float().to(DEVICE).requires_grad_()
    o = kernels.aaren_scan_packed(svf, H, D, pad.to(DEVICE), recency=recency)
    o.backward(grad_o.float().to(DEVICE))
    assert rel_err(o, ref_o.detach()) < 1e-5
    assert rel_err(svf.grad, torch.nan_to_num(ref_sv.grad)) < 1e-5


def test_packed_scan_with_an_offset_adds_it_to_every_heads_scores():
    """offset (B, T) float32 (the layer's recency ramp plus a gap per packed episode): the scores
    plus offset before the scan; outputs and d(sv) as autograd of the plain scan."""
    B, T, H, D = 2, 130, 2, 8
    F = H * D + H
    g = torch.Generator().manual_seed(6)
    sv = torch.randn(B, T, F, generator=g, dtype=torch.float64)
    offset = 64.0 * (torch.arange(T) // 40).to(torch.float64).expand(B, T) + 0.1 * torch.arange(T)
    grad_o = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    ref_sv = sv.clone().requires_grad_()
    s, v = triton_scan._split_packed(ref_sv, H, D)
    ref_o = reference(s + offset.unsqueeze(1), v)
    ref_o.backward(grad_o)
    svf = sv.float().to(DEVICE).requires_grad_()
    o = kernels.aaren_scan_packed(svf, H, D, offset=offset.float().to(DEVICE))
    o.backward(grad_o.float().to(DEVICE))
    assert rel_err(o, ref_o.detach()) < 1e-5
    assert rel_err(svf.grad, ref_sv.grad) < 1e-5
    with pytest.raises(ValueError, match="offset must have shape"):
        kernels.aaren_scan_packed(svf, H, D, offset=offset[:, :-1].float().to(DEVICE))


def test_packed_scan_rejects_a_bad_width():
    with pytest.raises(ValueError, match="H \\* \\(Dh \\+ 1\\)"):
        kernels.aaren_scan_packed(torch.zeros(2, 5, 9, device=DEVICE), 2, 4)


def test_plain_scan_on_cpu_tensors():
    assert not kernels.use_fused_scan(torch.zeros(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the layer dispatches to the kernel on CUDA only")
def test_aaren_layer_on_cuda_uses_kernel_with_same_outputs_and_gradients():
    torch.manual_seed(0)
    layer = Aaren(32, 2).cuda()
    with torch.no_grad():
        layer.query.normal_()
    x = torch.randn(3, 150, 32, device="cuda")
    pad = padding_masks(3, 150).cuda()
    outs = []
    for fused in (True, False):
        layer.zero_grad()
        with kernels.use_triton(fused):
            y = layer(x, padding_mask=pad)
        y.square().sum().backward()
        outs.append((y.detach(), layer.kv.weight.grad.clone(), layer.query.grad.clone()))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-4
