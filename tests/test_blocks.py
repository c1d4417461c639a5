"""Blocks and backbones: one interface, parallel forward == recurrent step for both kinds."""

import pytest
import torch
import torch.nn.functional as F

from aaren_rl import Backbone, KVCache
from aaren_rl.layer import AarenState


def make(kind, E=16, H=2, n_layer=3, seed=0):
    torch.manual_seed(seed)
    return Backbone(kind, n_layer, E, H, dropout=0.1).double().eval()


@pytest.mark.parametrize("kind", ["aaren", "transformer"])
def test_forward_equals_steps_and_chunks(kind):
    net = make(kind)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    with torch.no_grad():
        y = net(x)
        state, outs = net.init_state(2), []
        for t in range(13):
            o, state = net.step(x[:, t], state)
            outs.append(o)
        assert (torch.stack(outs, 1) - y).abs().max() <= 1e-10
        state = net.init_state(2)
        a, state = net.step(x[:, :3], state)  # e.g. one (R, s, a) triple at a time
        b, state = net.step(x[:, 3:], state)
        assert (torch.cat([a, b], 1) - y).abs().max() <= 1e-10


@pytest.mark.parametrize("kind", ["aaren", "transformer"])
def test_padding_changes_no_real_output(kind):
    net = make(kind, seed=1)
    a, b = torch.randn(1, 7, 16, dtype=torch.float64), torch.randn(1, 4, 16, dtype=torch.float64)
    x = torch.randn(2, 7, 16, dtype=torch.float64) * 100
    x[0], x[1, 3:] = a[0], b[0]  # second row left-padded by 3
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, :3] = True
    with torch.no_grad():
        y = net(x, padding_mask=pad)
        assert (y[0] - net(a)[0]).abs().max() <= 1e-10
        assert (y[1, 3:] - net(b)[0]).abs().max() <= 1e-10


@pytest.mark.parametrize("kind", ["aaren", "transformer"])
def test_reset_state_rows_start_a_new_sequence(kind):
    net = make(kind, seed=2)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        _, state = net.step(x[:, :5], net.init_state(2))
        state = net.reset_state(state, torch.tensor([True, False]))
        y, _ = net.step(x[:, 5:], state)
        assert (y[0] - net(x[:1, 5:])[0]).abs().max() <= 1e-10
        assert (y[1] - net(x)[1, 5:]).abs().max() <= 1e-10


def test_aaren_state_is_constant_while_the_kv_cache_grows():
    aaren, tf = make("aaren"), make("transformer")
    x = torch.randn(1, 50, 16, dtype=torch.float64)
    with torch.no_grad():
        sa, st = aaren.init_state(1), tf.init_state(1)
        _, sa1 = aaren.step(x[:, :1], sa)
        _, st1 = tf.step(x[:, :1], st)
        _, sa50 = aaren.step(x, sa)
        _, st50 = tf.step(x, st)
    assert all(isinstance(s, AarenState) for s in sa50) and all(isinstance(s, KVCache) for s in st50)
    assert sum(s.nbytes() for s in sa1) == sum(s.nbytes() for s in sa50)
    assert sum(s.nbytes() for s in st50) > 10 * sum(s.nbytes() for s in st1)


def banded_forward(net, x, window):
    """The parallel form of a sliding window, written out here: each token attends to itself and
    the ``window - 1`` tokens before it, in every layer."""
    pos = torch.arange(x.shape[1])
    band = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - window)
    for b in net.blocks:
        q, k, v = b.mixer._heads(b.ln_1(x))
        x = x + b.mixer._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=band))
        x = x + b.mlp(b.ln_2(x))
    return net.ln_f(x)


def test_a_sliding_cache_is_banded_attention_and_has_a_constant_size():
    net, window = make("transformer", seed=4), 7
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    with torch.no_grad():
        want = banded_forward(net, x, window)
        state, outs, sizes = net.init_state(2, window=window), [], []
        for i in range(0, 23, 3):  # chunks of 3 tokens, as a policy feeds them; the last one shorter
            y, state = net.step(x[:, i:i + 3], state)
            outs.append(y)
            sizes.append(sum(s.nbytes() for s in state))
        assert (torch.cat(outs, 1) - want).abs().max() <= 1e-10
        assert len(set(sizes)) == 1 and all(s.k.shape[2] == window - 1 for s in state)
        # within the first window the band is the whole prefix: the same as the growing cache
        assert (want[:, :window] - net(x[:, :window])).abs().max() <= 1e-10
    with pytest.raises(ValueError, match="a sliding window is a Transformer's cache"):
        make("aaren").init_state(1, window=window)


def test_backbone_bad_inputs():
    with pytest.raises(ValueError, match="backbone kind must be one of"):
        Backbone("lstm", 2, 16, 2)
    net = make("aaren")
    with pytest.raises(ValueError, match="x has width 8"):
        net(torch.randn(2, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="state must be the list of 3"):
        net.step(torch.randn(2, 16, dtype=torch.float64), net.init_state(2)[:2])
    with pytest.raises(ValueError, match="state has batch size 3"):
        net.step(torch.randn(2, 16, dtype=torch.float64), net.init_state(3))


@pytest.mark.parametrize("kind", ["aaren", "transformer"])
def test_backbone_trains(kind):
    # gradients reach every parameter and a few steps reduce a simple loss
    torch.manual_seed(0)
    net = Backbone(kind, 2, 16, 2, dropout=0.0)
    x, target = torch.randn(4, 10, 16), torch.randn(4, 10, 16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (net(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("kind", ["aaren", "transformer"])
def test_padded_step_tokens_change_no_state(kind):
    # a row whose first chunk token is padding (an episode that just began has no previous action)
    net = make(kind, seed=3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pad = torch.tensor([[True, False, False], [False, False, False]])
    with torch.no_grad():
        _, state = net.step(x[:, :2], net.init_state(2))
        state = net.reset_state(state, torch.tensor([True, False]))
        y, state = net.step(x[:, 2:], state, padding_mask=pad)
        assert torch.isfinite(y).all()
        assert (y[0, 1:] - net(x[:1, 3:])[0]).abs().max() <= 1e-10  # as if the row began at token 3
        assert (y[1] - net(x[1:])[0, 2:]).abs().max() <= 1e-10
