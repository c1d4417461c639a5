"""The fast training paths (TrainConfig.compile) compute what the eager loop computes.

On CPU: mode names and devices, fixed-length episode batches (what a graph needs) give the same
loss, the capturable optimizer (fused, learning rate as a tensor) steps as the eager one and its
checkpoint state is portable, and (slow) torch.compile. On CUDA only: the whole update replayed
from a CUDA graph gives eager mode's losses, and resuming from a checkpoint (from either mode)
gives the straight run's weights.
"""

import io

import numpy as np
import pytest
import torch

from aaren_rl.blocks import Backbone
from aaren_rl.data import Episode, TrajectoryDataset
from aaren_rl.layer import check_tokens
from aaren_rl.train import (
    TrainConfig, make_capturable, make_update_step, model_config_for, portable_state, resolve_compile, train,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_dataset(lengths=(30, 12, 25, 7), seed=0):
    rng = np.random.default_rng(seed)
    eps = [Episode(observations=rng.normal(size=(n, 5)).astype(np.float32),
                   actions=rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
                   rewards=rng.normal(size=n).astype(np.float32), truncated=True) for n in lengths]
    return TrajectoryDataset(eps, action_low=-np.ones(2), action_high=np.ones(2), name="tiny")


def tiny_update(ds, mode="none", device="cpu", context="episode", backbone="aaren", max_len=None, dropout=0.0,
                capturable=False, batch=3, seed=0):
    mc = model_config_for(ds, backbone=backbone, context=context, context_len=6, embed_dim=16, n_layer=2,
                          dropout=dropout)
    tc = TrainConfig(batch_size=batch, warmup_steps=3, learning_rate=1e-3, seed=seed, compile=mode, amp=False,
                     max_episode_len=max_len)
    update = make_update_step(mc, tc, ds, device)  # training's own setup
    if capturable:  # on the CPU too: the optimizer a graph needs, stepped eagerly
        make_capturable(update.optimizer)
    return update.model, update


def losses_of(update, n):
    out = []
    for _ in range(n):
        update()
        out.append(update.pop_mean_loss())
    return np.array(out)


def test_compile_modes_are_checked_and_auto_is_eager_on_cpu():
    with pytest.raises(ValueError, match="compile must be one of"):
        TrainConfig(compile="fast").validate()
    assert resolve_compile("auto", torch.device("cpu")) == "none"
    assert resolve_compile("torch.compile", torch.device("cpu")) == "torch.compile"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_compile("cudagraph", torch.device("cpu"))
    if torch.cuda.is_available():
        assert resolve_compile("auto", torch.device("cuda")) == "torch.compile+cudagraph"


def test_fixed_length_episode_batches_give_the_same_losses():
    """A graph needs one batch shape: episodes padded to the dataset's longest, not the batch's."""
    ds = tiny_dataset()
    _, eager = tiny_update(ds)
    _, fixed = tiny_update(ds, max_len=ds.max_episode_length)
    np.testing.assert_allclose(losses_of(fixed, 5), losses_of(eager, 5), rtol=1e-5)


def test_capturable_optimizer_steps_as_the_eager_one_and_saves_portable_state():
    ds = tiny_dataset()
    model_a, eager = tiny_update(ds, context="window", dropout=0.1)
    model_b, fast = tiny_update(ds, context="window", dropout=0.1, capturable=True)
    assert isinstance(fast.optimizer.param_groups[0]["lr"], torch.Tensor)
    torch.manual_seed(1)  # the same dropout masks for both
    b = losses_of(fast, 5)
    torch.manual_seed(1)
    np.testing.assert_allclose(b, losses_of(eager, 5), rtol=1e-5)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert float(fast.optimizer.param_groups[0]["lr"]) == pytest.approx(1e-3)  # warm-up done, schedule applied
    opt_state, sched_state = portable_state(fast.optimizer, fast.scheduler)
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in opt_state["param_groups"])
    assert all(isinstance(x, float) for x in sched_state["_last_lr"])
    # the eager optimizer takes it (through a file, as a checkpoint does), and goes on as the fast one does
    buf = io.BytesIO()
    torch.save({"optimizer": opt_state, "scheduler": sched_state}, buf)
    buf.seek(0)
    saved = torch.load(buf, map_location="cpu", weights_only=True)
    eager.optimizer.load_state_dict(saved["optimizer"])
    eager.scheduler.load_state_dict(saved["scheduler"])
    model_a.load_state_dict(model_b.state_dict())
    gen_state = fast.generators[0].get_state()
    eager.generators[0].set_state(gen_state)
    torch.manual_seed(1)
    a = losses_of(eager, 3)
    torch.manual_seed(1)
    b = losses_of(fast, 3)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_layer_input_check_still_rejects_nan_outside_compiled_code():
    x = torch.randn(2, 3, 8)
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or inf"):
        check_tokens("x", x, 8)
    with pytest.raises(ValueError, match="contains NaN or inf"):
        Backbone("aaren", 1, 8, 1)(x)


@pytest.mark.slow
def test_backbone_compiles_as_one_graph_so_no_input_check_syncs():
    torch.manual_seed(0)
    model = Backbone("aaren", 1, 16, 1)
    x = torch.randn(2, 10, 16)
    compiled = torch.compile(model, fullgraph=True)  # a host read-back would break the graph: an error here
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_mode_gives_the_eager_losses():
    ds = tiny_dataset()
    _, eager = tiny_update(ds, context="window", dropout=0.0)
    _, compiled = tiny_update(ds, mode="torch.compile", context="window", dropout=0.0)
    np.testing.assert_allclose(losses_of(compiled, 4), losses_of(eager, 4), rtol=1e-4)


# ---------------------------------------------------------------------------------- CUDA only


def logged_losses(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return np.array([e.value for e in acc.Scalars("train/loss")])


def run_train(ds, logdir, mode, updates=8, resume=False, backbone="aaren", context="window", dropout=0.1):
    mc = model_config_for(ds, backbone=backbone, context=context, context_len=6, embed_dim=32, n_layer=2,
                          dropout=dropout)
    tc = TrainConfig(updates=updates, batch_size=4, warmup_steps=4, learning_rate=1e-3, log_every=1, eval_every=0,
                     eval_episodes=0, checkpoint_every=4, seed=3, device="cuda", compile=mode)
    model = train(mc, tc, ds, logdir, progress=False, resume=resume)
    return model, logged_losses(logdir)


@cuda
@pytest.mark.parametrize("backbone,context,mode", [
    ("aaren", "window", "cudagraph"), ("transformer", "window", "cudagraph"), ("aaren", "episode", "cudagraph"),
    ("aaren", "window", "torch.compile+cudagraph"), ("aaren", "episode", "torch.compile+cudagraph"),
])
def test_fast_training_gives_the_eager_losses(tmp_path, backbone, context, mode):
    # episode context pads to the batch's longest episode eagerly and to the dataset's longest in
    # a graph: the same loss, but dropout masks of another shape, so no dropout there (compiled
    # code draws its dropout masks with its own generator: equal in distribution, not bit for bit)
    dropout = 0.0 if context == "episode" else 0.1
    ds = tiny_dataset()
    _, eager = run_train(ds, tmp_path / "eager", "none", backbone=backbone, context=context, dropout=dropout)
    _, fast = run_train(ds, tmp_path / "fast", mode, backbone=backbone, context=context, dropout=dropout)
    assert len(eager) == len(fast) == 8
    np.testing.assert_allclose(fast, eager, rtol=2e-2)  # bf16 autocast; fused vs foreach AdamW
    assert len(np.unique(fast)) == 8  # every replay drew a new batch


@cuda
@pytest.mark.parametrize("first_mode,mode", [("cudagraph", "cudagraph"), ("none", "cudagraph"),
                                             ("torch.compile+cudagraph", "torch.compile+cudagraph")])
def test_resume_gives_the_straight_runs_weights(tmp_path, first_mode, mode):
    ds = tiny_dataset()
    straight, _ = run_train(ds, tmp_path / "straight", mode)
    run_train(ds, tmp_path / "resumed", first_mode, updates=4)  # stopped after the checkpoint at 4
    resumed, losses = run_train(ds, tmp_path / "resumed", mode, resume=True)
    assert np.isfinite(losses).all()
    tol = dict(rtol=1e-4, atol=1e-5) if first_mode == mode else dict(rtol=1e-3, atol=1e-4)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(q, p, **tol, msg=lambda m, name=name: f"{name}: {m}")
