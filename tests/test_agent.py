"""The agent model and its streaming policy: streaming actions == the parallel forward pass."""

import numpy as np
import pytest
import torch

from aaren_rl.model import DecisionModel, ModelConfig
from aaren_rl.policy import StreamingPolicy
from helpers import make_model


def trajectory(T=40, obs_dim=5, act_dim=3, discrete=False, seed=1):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(T, obs_dim)).astype(np.float32) * 2
    actions = rng.integers(0, act_dim, size=T) if discrete else rng.uniform(-2, 1, size=(T, act_dim)).astype(np.float32)
    rewards = rng.normal(size=T).astype(np.float32)
    return obs, actions, rewards


def parallel_actions(model, obs, actions, rewards, target):
    """What the parallel forward pass predicts at every t of a logged trajectory, in env units."""
    T = len(obs)
    rtg = target - np.concatenate([[0.0], np.cumsum(rewards)[:-1]])
    with torch.no_grad():
        o = model.normalize_obs(torch.as_tensor(obs)[None])
        a = model.normalize_action(torch.as_tensor(actions)[None])
        pred = model(torch.as_tensor(rtg, dtype=torch.float32)[None], o, a, torch.arange(T)[None])[0]
    return pred.argmax(-1).numpy() if model.config.discrete else model.unnormalize_action(pred).numpy()


def streamed_actions(policy, obs, actions, rewards, steps=None):
    out, state = [], None
    for t in range(steps or len(obs)):
        a, state = policy.predict(obs[t], state, reward=None if t == 0 else rewards[t - 1])
        out.append(a)
        state = policy.record_action(state, actions[t])  # follow the logged trajectory
    return np.array(out)


@pytest.mark.parametrize("backbone", ["aaren", "transformer", "aaren-recency"])
@pytest.mark.parametrize("discrete", [False, True])
def test_streaming_actions_equal_parallel_forward(backbone, discrete):
    recency = 0.2 if backbone == "aaren-recency" else 0.0
    model = make_model(backbone.split("-")[0], "episode", discrete, recency=recency)
    obs, actions, rewards = trajectory(discrete=discrete)
    target = float(rewards.sum()) + 3.0
    want = parallel_actions(model, obs, actions, rewards, target)
    got = streamed_actions(StreamingPolicy(model, target), obs, actions, rewards)
    if discrete:
        assert (got == want).all()
    else:
        assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("backbone", ["aaren", "transformer"])
def test_window_policy_equals_parallel_forward_within_the_window(backbone):
    model = make_model(backbone, "window", K=8)
    obs, actions, rewards = trajectory(T=30)
    target = 5.0
    want = parallel_actions(model, obs, actions, rewards, target)
    got = streamed_actions(StreamingPolicy(model, target, mode="window"), obs, actions, rewards)
    assert np.abs(got[:8] - want[:8]).max() <= 1e-5  # the window still holds the whole history
    # later, each action is the forward pass over the last K steps alone
    t = 20
    rtg = target - np.concatenate([[0.0], np.cumsum(rewards)[:-1]])
    with torch.no_grad():
        sl = slice(t - 7, t + 1)
        pred = model(torch.as_tensor(rtg[sl], dtype=torch.float32)[None], model.normalize_obs(torch.as_tensor(obs[sl])[None]),
                     model.normalize_action(torch.as_tensor(actions[sl])[None]), torch.arange(t - 7, t + 1)[None])
    assert np.abs(got[t] - model.unnormalize_action(pred[0, -1]).numpy()).max() <= 1e-5


def test_sliding_cache_equals_window_recompute_where_it_should():
    """A sliding key/value cache of the last K timesteps against DT's window recompute: equal for a
    one-layer model at every step, and, in a deeper model, for the first K steps of an episode;
    after that they differ by construction (a deeper layer's cached keys were computed from the
    window of the step that made them, ``policy.py``)."""
    obs, actions, rewards = trajectory(T=30)
    K = 8
    for n_layer in (1, 2):
        model = make_model("transformer", "window", K=K, n_layer=n_layer)
        window = streamed_actions(StreamingPolicy(model, 5.0, mode="window"), obs, actions, rewards)
        sliding_policy = StreamingPolicy(model, 5.0, mode="sliding")
        sliding = streamed_actions(sliding_policy, obs, actions, rewards)
        diff = np.abs(window - sliding).max(-1)
        assert diff[:K].max() <= 1e-5
        if n_layer == 1:
            assert diff.max() <= 1e-5
        else:
            assert diff[K:].max() > 1e-2
    # the same with two environments, one of which begins a new episode on the way
    model = make_model("transformer", "episode", K=K, n_layer=1)
    got = {}
    for mode in ("window", "sliding"):
        policy, state, out = StreamingPolicy(model, 5.0, mode=mode), None, []
        for t in range(25):
            a, state = policy.predict(np.stack([obs[t], obs[t + 5]]), state, episode_start=np.array([t == 0, t in (0, 11)]),
                                      reward=np.stack([rewards[t], rewards[t + 5]]))
            out.append(a)
            if mode == "sliding":
                sizes = {policy.state_nbytes(state)} | (sizes if t else set())
        got[mode] = np.array(out)
    assert np.abs(got["window"] - got["sliding"]).max() <= 1e-5
    assert len(sizes) == 1  # constant size from the first step
    with pytest.raises(ValueError, match="mode 'sliding' is a Transformer's"):
        StreamingPolicy(make_model("aaren"), 1.0, mode="sliding")


def test_vectorized_streaming_with_episode_starts_matches_separate_runs():
    model = make_model("aaren", "episode")
    policy = StreamingPolicy(model, 4.0)
    trajs = [trajectory(T=12, seed=s) for s in range(3)]
    # env 0 runs 12 steps; env 1 starts a new episode (traj 2) after its 5th step
    state, got0, got1 = None, [], []
    for t in range(12):
        o1 = trajs[1][0][t] if t < 5 else trajs[2][0][t - 5]
        obs = np.stack([trajs[0][0][t], o1])
        start = np.array([t == 0, t == 0 or t == 5])
        rew = np.array([trajs[0][2][t - 1] if t else 0.0, (trajs[1][2][t - 1] if t < 5 else trajs[2][2][t - 6]) if t not in (0, 5) else 0.0])
        a, state = policy.predict(obs, state, episode_start=start, reward=rew)
        got0.append(a[0])
        got1.append(a[1])
        taken = np.stack([trajs[0][1][t], trajs[1][1][t] if t < 5 else trajs[2][1][t - 5]])
        state = policy.record_action(state, taken)
    want0 = streamed_actions(StreamingPolicy(model, 4.0), *trajs[0])
    want2 = streamed_actions(StreamingPolicy(model, 4.0), *trajs[2], steps=7)
    assert np.abs(np.array(got0) - want0).max() <= 1e-5
    assert np.abs(np.array(got1[5:]) - want2).max() <= 1e-5


def test_aaren_policy_state_is_constant_and_transformer_cache_grows():
    obs, actions, rewards = trajectory(T=60)
    sizes = {}
    for backbone in ["aaren", "transformer"]:
        policy = StreamingPolicy(make_model(backbone, "episode"), 1.0)
        state, nbytes = None, []
        for t in range(60):
            _, state = policy.predict(obs[t], state, reward=rewards[t - 1] if t else None)
            nbytes.append(policy.state_nbytes(state))
        sizes[backbone] = nbytes
    assert len(set(sizes["aaren"])) == 1
    assert sizes["transformer"][-1] > 30 * sizes["transformer"][0]


def test_bad_policy_inputs_fail_clearly():
    policy = StreamingPolicy(make_model(), 1.0)
    obs, _, _ = trajectory()
    with pytest.raises(ValueError, match=r"observation must have shape \(n_envs, 5\)"):
        policy.predict(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="observation contains NaN"):
        policy.predict(np.full(5, np.nan, np.float32))
    _, state = policy.predict(obs[:2])
    with pytest.raises(ValueError, match="reward is required"):
        policy.predict(obs[:2], state)
    with pytest.raises(ValueError, match="state must be .* for 3 environments"):
        policy.predict(obs[:3], state, reward=np.zeros(3))
    with pytest.raises(ValueError, match=r"reward must have shape \(2,\)"):
        policy.predict(obs[:2], state, reward=np.zeros(3))
    with pytest.raises(ValueError, match="mode must be one of"):
        StreamingPolicy(make_model(), 1.0, mode="cache")


def test_recency_is_aarens_and_must_be_a_finite_non_negative_decay():
    kw = dict(observation_dim=3, action_dim=1, action_low=[-1], action_high=[1])
    for bad in (dict(recency=-0.5), dict(recency=float("inf")), dict(backbone="transformer", recency=0.1)):
        with pytest.raises(ValueError, match="bad recency .*a finite decay >= 0 per token, and 0 unless backbone"):
            ModelConfig(**bad, **kw).validate()
    model = DecisionModel(ModelConfig(recency=0.25, **kw))
    assert all(b.mixer.recency == 0.25 for b in model.backbone.blocks)
    layers = model.export_step_weights()[2]
    assert all((layer["decay"] == 0.25).all() for layer in layers)


def test_model_config_rejects_bad_values():
    with pytest.raises(ValueError, match="bad backbone = 'lstm'"):
        ModelConfig(backbone="lstm", observation_dim=3, action_dim=1, action_low=[-1], action_high=[1]).validate()
    with pytest.raises(ValueError, match="bad query_init = -1.0; expected a non-negative std"):
        ModelConfig(query_init=-1.0, observation_dim=3, action_dim=1, action_low=[-1], action_high=[1]).validate()
    with pytest.raises(ValueError, match="bad context"):
        ModelConfig(context="all", observation_dim=3, action_dim=1, action_low=[-1], action_high=[1]).validate()
    with pytest.raises(ValueError, match="bad action_low"):
        ModelConfig(observation_dim=3, action_dim=2, action_low=[-1], action_high=[1]).validate()


def test_loss_ignores_padding():
    model = make_model().train()
    B, T = 2, 6
    pred, target = torch.rand(B, T, 3), torch.rand(B, T, 3)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 4:] = True
    changed = target.clone()
    changed[1, 4:] += 100  # targets under padding must not matter
    assert torch.equal(model.loss(pred, target, pad), model.loss(pred, changed, pad))


def test_default_policy_modes():
    # Aaren always streams with its constant state; a window-trained Transformer recomputes windows
    assert StreamingPolicy(make_model("aaren", "window"), 0.0).mode == "recurrent"
    assert StreamingPolicy(make_model("aaren", "episode"), 0.0).mode == "recurrent"
    assert StreamingPolicy(make_model("transformer", "window"), 0.0).mode == "window"
    assert StreamingPolicy(make_model("transformer", "episode"), 0.0).mode == "recurrent"


def test_reset_then_predict_with_either_backend():
    obs, actions, rewards = trajectory(T=5)
    for backend in ("torch", "auto"):
        policy = StreamingPolicy(make_model(), 2.0, backend=backend)
        state = policy.reset(1)
        a0, state = policy.predict(obs[:1], state)  # rows fresh from reset begin an episode
        a1, state = policy.predict(obs[1:2], state, reward=rewards[:1])
        want = streamed_actions(StreamingPolicy(make_model(), 2.0, backend="torch"), obs[:2], [a0[0], a1[0]], rewards)
        assert np.abs(np.stack([a0[0], a1[0]]) - want).max() <= 1e-5


# ----------------------------------------------------------------------------------------------
# segment context: K-step segments that continue the exact state of their episode's earlier steps


def uneven_dataset(seed=0, lengths=(30, 45, 12, 60), obs_dim=3, act_dim=2):
    from aaren_rl.data import Episode, TrajectoryDataset

    rng = np.random.default_rng(seed)
    eps = [Episode(observations=rng.normal(size=(T, obs_dim)).astype(np.float32),
                   actions=rng.uniform(-1, 1, size=(T, act_dim)).astype(np.float32),
                   rewards=rng.normal(size=T).astype(np.float32), truncated=True) for T in lengths]
    return TrajectoryDataset(eps, action_low=-np.ones(act_dim), action_high=np.ones(act_dim), name=f"u{seed}")


def test_segments_start_where_their_prefixes_end():
    ds = uneven_dataset()
    seg, pre = ds.sample_segments(32, 8, torch.Generator().manual_seed(0))
    P = (~pre.padding_mask).sum(1)
    assert torch.equal(seg.timesteps[:, 0], P)  # a segment at t starts after its t earlier steps
    for b in range(32):  # the prefix is the episode from t = 0, right-padded
        assert torch.equal(pre.timesteps[b, :P[b]], torch.arange(int(P[b])))
    assert pre.padding_mask.shape[1] == max(int(P.max()), 1)
    seg, pre = ds.sample_segments(32, 8, torch.Generator().manual_seed(0), max_prefix=5)
    assert pre.padding_mask.shape[1] == 5 and (~pre.padding_mask).sum(1).max() <= 5
    keep = (~pre.padding_mask).sum(1)
    assert all(pre.timesteps[b, keep[b] - 1] == seg.timesteps[b, 0] - 1 for b in range(32) if keep[b])


@pytest.mark.parametrize("n_head", [1, 2])
def test_a_segment_from_its_prefix_state_equals_the_whole_sequence(n_head):
    """forward(segment, state=prefix_state(prefix)) is the parallel forward over prefix + segment
    at the segment's steps: training sees exactly what the streaming policy computes."""
    ds = uneven_dataset()
    model = make_model("aaren", "segment", obs_dim=3, act_dim=2, n_head=n_head).eval()
    seg, pre = ds.sample_segments(12, 8, torch.Generator().manual_seed(1))
    act = lambda b: model.normalize_action(b.actions)
    with torch.no_grad():
        state = model.prefix_state(pre.returns_to_go, pre.observations, act(pre), pre.timesteps, pre.padding_mask)
        got = model(seg.returns_to_go, seg.observations, act(seg), seg.timesteps, seg.padding_mask, state=state)
        for b in range(12):
            P, S = int((~pre.padding_mask[b]).sum()), int((~seg.padding_mask[b]).sum())
            cat = lambda f: torch.cat([getattr(pre, f)[b, :P], getattr(seg, f)[b, :S]])[None]
            whole = model(cat("returns_to_go"), cat("observations"), model.normalize_action(cat("actions")),
                          cat("timesteps"))
            torch.testing.assert_close(got[b, :S], whole[0, P:], rtol=1e-5, atol=1e-6)
    assert StreamingPolicy(model, 0.0).mode == "recurrent"


def test_segment_context_is_aaren_only():
    with pytest.raises(ValueError, match="bad context"):
        ModelConfig(backbone="transformer", context="segment", observation_dim=3, action_dim=1, action_low=[-1],
                    action_high=[1]).validate()


def test_segment_training_learns():
    from aaren_rl.train import TrainConfig, make_update_step, model_config_for

    ds = uneven_dataset()
    mc = model_config_for(ds, backbone="aaren", context="segment", context_len=6, n_layer=1, embed_dim=16,
                          n_head=2, dropout=0.0)
    update = make_update_step(mc, TrainConfig(batch_size=8, warmup_steps=1, learning_rate=3e-3, seed=0, device="cpu",
                                              compile="none"), ds)
    losses = []
    for _ in range(60):
        update()
        losses.append(update.pop_mean_loss())
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_query_init_sets_the_std_of_every_aaren_query_and_nothing_else():
    kw = dict(embed_dim=64, n_head=2, observation_dim=3, action_dim=1, action_low=[-1], action_high=[1])
    torch.manual_seed(0)
    default = DecisionModel(ModelConfig(**kw))
    torch.manual_seed(0)
    wide = DecisionModel(ModelConfig(query_init=1.0, **kw))
    for a, b in zip(default.backbone.blocks, wide.backbone.blocks):
        qa, qb = a.mixer.query, b.mixer.query  # 2 heads x 32: 64 draws each
        assert 0.01 < qa.std().item() < 0.03 and 0.7 < qb.std().item() < 1.3
        torch.testing.assert_close(qb, qa / 0.02)  # the same draw, scaled: the RNG stream is unchanged
    other = lambda m: {k: v for k, v in m.state_dict().items() if not k.endswith("mixer.query")}
    for (k, v), w in zip(other(default).items(), other(wide).values()):
        torch.testing.assert_close(v, w, msg=k)
