"""The Aaren layer: parallel scan == token-by-token steps == chunked steps == naive softmax."""

import math

import pytest
import torch

from aaren_rl import Aaren, AarenState
from aaren_rl.layer import prefix_scan

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def naive(layer: Aaren, x: torch.Tensor, padding_mask=None) -> torch.Tensor:
    """Masked softmax over the prefix with the same learned query, keys and values (and the
    layer's recency: token i's score minus recency * (k - i) for the query at token k)."""
    B, T, E = x.shape
    H, Dh = layer.num_heads, layer.head_dim
    k, v = layer.kv(x).split(E, dim=-1)
    k = k.view(B, T, H, Dh).transpose(1, 2)
    v = v.view(B, T, H, Dh).transpose(1, 2)
    s = torch.einsum("bhtd,hd->bht", k, layer.query) / math.sqrt(Dh)  # (B, H, T)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()  # [query k, key i]
    if padding_mask is not None:
        allowed = allowed & ~padding_mask[:, None, None, :]
    pos = torch.arange(T, dtype=s.dtype)
    decay = layer.recency * (pos[:, None] - pos[None, :])  # [k, i]
    scores = (s[:, :, None, :] - decay).masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-padding prefix reads out as 0
    o = (attn @ v).transpose(1, 2).reshape(B, T, E)
    y = layer.out(o)
    if padding_mask is not None:
        y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    return y


def make(E=16, H=2, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    layer = Aaren(E, H, **kw).to(dtype)
    with torch.no_grad():
        layer.query.normal_()  # larger than the init's 0.02, so the softmax is far from uniform
    return layer


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,T,E,H", [(1, 1, 8, 1), (3, 7, 16, 2), (2, 63, 12, 3), (2, 65, 16, 4), (1, 333, 8, 1), (2, 4099, 8, 2)])
def test_forward_equals_naive_softmax(dtype, B, T, E, H):
    layer = make(E, H, dtype, seed=T)
    x = torch.randn(B, T, E, dtype=dtype)
    with torch.no_grad():
        assert max_err(layer(x), naive(layer, x)) <= TOL[dtype]


@pytest.mark.parametrize("bias", [True, False])
def test_folded_score_projection_has_the_gradients_of_keys_and_query(bias):
    """The layer folds the key projection into the query (one score row per head): the
    parameters' gradients are those of computing keys and dot products explicitly."""
    layer = make(12, 3, torch.float64, seed=5, bias=bias)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    grads = []
    for fn in (layer, lambda x: naive(layer, x)):
        layer.zero_grad()
        fn(x).square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        assert max_err(a, b) < 1e-10


@pytest.mark.parametrize("chunk", [2, 3, 5])
def test_recursive_scan_levels_agree(chunk):
    # a tiny chunk forces several levels of the recursive scan over chunk totals
    layer = make(8, 2, seed=chunk, scan_chunk=chunk)
    x = torch.randn(2, 201, 8, dtype=torch.float64)
    with torch.no_grad():
        assert max_err(layer(x), naive(layer, x)) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,T,H", [(1, 1, 1), (2, 9, 2), (3, 70, 4)])
def test_forward_equals_token_by_token_and_chunked_steps(dtype, B, T, H):
    layer = make(16, H, dtype, seed=B * T)
    x = torch.randn(B, T, 16, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        state = layer.init_state(B)
        steps = []
        for t in range(T):
            out, state = layer.step(x[:, t], state)
            steps.append(out)
        assert max_err(torch.stack(steps, 1), y) <= TOL[dtype]
        state, chunks, t = layer.init_state(B), [], 0
        for size in [3, 1, 5, 64, 2, 100]:  # ragged chunk sizes
            if t >= T:
                break
            out, state = layer.step(x[:, t:t + size], state)
            chunks.append(out)
            t += size
        if t < T:
            out, state = layer.step(x[:, t:], state)
            chunks.append(out)
        assert max_err(torch.cat(chunks, 1), y) <= TOL[dtype]


@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_huge_scores_stay_finite_and_exact(magnitude):
    layer = make(8, 2, seed=1)
    with torch.no_grad():
        layer.query.mul_(magnitude)
    x = torch.randn(2, 300, 8, dtype=torch.float64) * 10
    with torch.no_grad():
        s, _ = layer._tokens(x)
        assert s.abs().max() > magnitude  # the scores really are that large
        y = layer(x)
        state, outs = layer.init_state(2), []
        for t in range(300):
            o, state = layer.step(x[:, t], state)
            outs.append(o)
    assert torch.isfinite(y).all()
    assert max_err(y, naive(layer, x)) <= 1e-9 * max(1.0, y.abs().max().item())
    assert max_err(torch.stack(outs, 1), y) <= 1e-9 * max(1.0, y.abs().max().item())


def test_million_streamed_tokens_constant_state_exact_output():
    torch.manual_seed(0)
    E, H, N, chunk = 4, 2, 1_000_000, 50_000
    layer = make(E, H, seed=3)
    with torch.no_grad():
        layer.query.mul_(3000.0)  # scores up to about 1e4
    x = torch.randn(1, N, E, dtype=torch.float64)
    with torch.no_grad():
        state = layer.init_state(1)
        _, state1 = layer.step(x[:, 0], state)
        size_after_one = state1.nbytes()
        state = layer.init_state(1)
        for start in range(0, N, chunk):
            out, state = layer.step(x[:, start:start + chunk], state)
            assert torch.isfinite(out).all()
        assert state.nbytes() == size_after_one
        assert tuple(state.w.shape) == (1, H, E // H)
        # reference for the last output: softmax over all one million scores
        s, v = layer._tokens(x)  # (1, H, N), (1, H, N, Dh)
        assert s.abs().max() > 3e3
        o = (torch.softmax(s, -1).unsqueeze(-1) * v).sum(-2)  # (1, H, Dh)
        ref = layer.out(o.reshape(1, E))
    assert max_err(out[:, -1], ref) <= 1e-9


def test_gradcheck_through_forward():
    layer = make(4, 2, seed=5, scan_chunk=3)
    x = torch.randn(2, 11, 4, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, :3] = True  # left padding in the second row
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))
    assert torch.autograd.gradcheck(lambda x: layer(x, padding_mask=pad), (x,))
    params = (layer.query, layer.kv.weight)
    assert torch.autograd.gradcheck(lambda q, w: _with_params(layer, q, w, x.detach()), params)


def _with_params(layer, q, w, x):
    return torch.func.functional_call(layer, {"query": q, "kv.weight": w}, (x,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padding_changes_no_real_output(dtype):
    layer = make(8, 2, dtype, seed=7)
    lengths = [5, 9, 3]
    seqs = [torch.randn(n, 8, dtype=dtype) for n in lengths]
    T = max(lengths)
    with torch.no_grad():
        alone = [layer(s.unsqueeze(0))[0] for s in seqs]
        for side in ["left", "right"]:
            x = torch.randn(len(seqs), T, 8, dtype=dtype) * 1e3  # wild values under the padding
            pad = torch.ones(len(seqs), T, dtype=torch.bool)
            for i, s in enumerate(seqs):
                sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
                x[i, sl], pad[i, sl] = s, False
            y = layer(x, padding_mask=pad)
            for i, s in enumerate(seqs):
                sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
                assert max_err(y[i, sl], alone[i]) <= TOL[dtype]
            assert (y[pad] == 0).all()


def test_reset_rows_of_a_batched_state():
    layer = make(8, 2, seed=11)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer.step(x[:, :4], layer.init_state(3))
        state = state.reset(torch.tensor([True, False, True]))
        y_after, _ = layer.step(x[:, 4:], state)
        fresh, _ = layer.step(x[:, 4:], layer.init_state(3))
        full = layer(x)
    assert max_err(y_after[[0, 2]], fresh[[0, 2]]) <= 1e-12  # reset rows start over
    assert max_err(y_after[1], full[1, 4:]) <= 1e-10  # the other row goes on
    assert torch.isneginf(layer.init_state(2).m).all()  # the empty state is m = -inf, not 0


def test_bad_inputs_raise_clear_errors():
    layer = make(8, 2, seed=0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="x must be 3-d"):
        layer(x[0, 0])
    with pytest.raises(ValueError, match="x has width 7"):
        layer(torch.randn(2, 5, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="x contains NaN"):
        layer(x.clone().index_put_((torch.tensor([1]),), torch.tensor(float("nan"), dtype=torch.float64)))
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        layer(x, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask must be a bool"):
        layer(x, padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="state has w of shape"):
        layer.step(x[:, 0], layer.init_state(3))
    with pytest.raises(ValueError, match="state must be an AarenState"):
        layer.step(x[:, 0], None)
    with pytest.raises(ValueError, match="x must be 2-d or 3-d"):
        layer.step(x[0, 0], layer.init_state(2))
    with pytest.raises(ValueError, match="rows must be a bool tensor"):
        layer.init_state(2).reset(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        Aaren(10, 3)


def test_prefix_scan_matches_sequential_combine():
    from aaren_rl.layer import combine

    torch.manual_seed(2)
    m = torch.randn(3, 50, dtype=torch.float64) * 50
    m[0, :7] = float("-inf")  # leading identity elements
    u = torch.rand(3, 50, dtype=torch.float64) * (~torch.isneginf(m))
    w = torch.randn(3, 50, 4, dtype=torch.float64) * (~torch.isneginf(m)).unsqueeze(-1)
    pm, pu, pw = prefix_scan(m, u, w, chunk=4)
    acc = (torch.full((3,), float("-inf"), dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
           torch.zeros(3, 4, dtype=torch.float64))
    for t in range(50):
        acc = combine(acc, (m[:, t], u[:, t], w[:, t]))
        assert torch.equal(pm[:, t], acc[0])
        assert torch.allclose(pu[:, t], acc[1], rtol=1e-12, atol=0)
        assert torch.allclose(pw[:, t], acc[2], rtol=1e-12, atol=1e-300)


def test_state_is_a_small_typed_container():
    s = make(8, 2).init_state(4, dtype=torch.float32)
    assert isinstance(s, AarenState) and s.w.dtype == torch.float32 and s.batch_size == 4
    assert s.nbytes() == 4 * 2 * (2 + 4) * 4


@pytest.mark.parametrize("recency", [0.05, 0.7, 3.0])
@pytest.mark.parametrize("T", [40, 300])
def test_recency_decay_in_parallel_and_recurrent_forms_equals_naive_softmax(recency, T):
    """Scores decayed by recency per token: the scan (s_i + lam i, chunked over several levels at
    T = 300), one token at a time and uneven chunks (m referred to the last token) all give the
    naive masked softmax of s_i - lam (k - i), with padding."""
    layer = make(recency=recency)
    x = torch.randn(3, T, 16, dtype=torch.float64)
    pad = torch.zeros(3, T, dtype=torch.bool)
    pad[1, :7] = True  # a left-padded row, as DT's windows are
    want = naive(layer, x, pad)
    assert (layer(x, pad) - want).abs().max() < TOL[torch.float64] * 100
    state, outs, pos = layer.init_state(3, dtype=torch.float64), [], 0
    for c in [1, 5, 13, 1] + [1] * (T - 60) + [40]:
        y, state = layer.step(x[:, pos:pos + c], state, pad[:, pos:pos + c])
        outs.append(y)
        pos += c
    got = torch.cat(outs, 1).masked_fill(pad.unsqueeze(-1), 0.0)
    assert (got - want).abs().max() < TOL[torch.float64] * 100
    # and the decay does something: without it the outputs differ
    plain = make()
    assert (naive(plain, x, pad) - want).abs().max() > 1e-3


def test_recency_keeps_a_long_stream_finite_and_forgets_the_far_past():
    """Over 20,000 streamed tokens the state stays finite, and with a strong decay the output
    depends on the recent tokens only: two streams that differ only before the last 100 tokens agree."""
    layer = make(recency=0.5, dtype=torch.float32)
    torch.manual_seed(3)
    tail = torch.randn(2, 100, 16)
    outs = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        state = layer.init_state(2)
        for _ in range(20):
            _, state = layer.step(torch.randn(2, 1000, 16, generator=g), state)
        y, state = layer.step(tail, state)
        assert all(torch.isfinite(t).all() for t in (state.m, state.u, state.w))
        outs.append(y[:, -1])
    assert (outs[0] - outs[1]).abs().max() < 1e-5


def test_recency_must_be_a_finite_non_negative_number():
    for bad in (-0.1, float("inf"), float("nan"), "0.1"):
        with pytest.raises(ValueError, match="recency must be a finite number >= 0"):
            Aaren(16, 2, recency=bad)
