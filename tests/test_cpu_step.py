"""The compiled CPU step (aaren_rl.kernels.cpu_step): the same actions and state as the torch path."""

import numpy as np
import pytest
import torch

import helpers
from aaren_rl.kernels import cpu_step
from aaren_rl.model import DecisionModel, ModelConfig
from aaren_rl.policy import StreamingPolicy

needs_compiler = pytest.mark.skipif(not cpu_step.available(), reason="no C compiler: the torch path is used")


def make_model(discrete=False, n_layer=2, embed_dim=32, n_head=2, obs_dim=5, act_dim=3, max_timestep=1000, seed=0):
    return helpers.make_model("aaren", "episode", discrete, n_layer, embed_dim, n_head, obs_dim, act_dim,
                              max_timestep=max_timestep, seed=seed)


def rollout(n_envs, T, obs_dim, act_dim, discrete, seed=1):
    """Observations, rewards, episode starts (random, some rows restarting mid-run) and the
    actions "executed" (sometimes overriding the policy's own), for T steps of n_envs envs."""
    rng = np.random.default_rng(seed)
    obs = (rng.normal(size=(T, n_envs, obs_dim)) * 2).astype(np.float32)
    rewards = rng.normal(size=(T, n_envs)).astype(np.float32)
    starts = rng.random((T, n_envs)) < 0.15
    starts[0] = True
    taken = rng.integers(0, act_dim, (T, n_envs)) if discrete else rng.uniform(-2, 1, (T, n_envs, act_dim)).astype(np.float32)
    override = rng.random(T) < 0.3
    return obs, rewards, starts, taken, override


def state_arrays(state):
    if isinstance(state, cpu_step.FastAarenPolicy):  # the compiled step's buffers
        return [state.m, state.u, state.w]
    return [torch.stack([getattr(s, k) for s in state.backbone]).numpy() for k in ("m", "u", "w")]


def assert_state_close(got, want):
    for g, w in zip(got, want):
        assert np.array_equal(np.isneginf(g), np.isneginf(w))
        fin = np.isfinite(w)
        scale = max(1.0, float(np.abs(w[fin]).max()))
        assert np.abs(g[fin] - w[fin]).max() <= 1e-5 * scale


CONFIGS = {  # (n_layer, embed_dim, n_head, obs_dim, act_dim, max_timestep)
    "small-2-heads": (2, 32, 2, 5, 3, 1000),
    "dt-default": (3, 128, 1, 17, 6, 1000),
    "timestep-clamp": (1, 48, 3, 4, 2, 8),  # episodes outrun the timestep table
}


@needs_compiler
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("n_envs", [1, 4, 7])
@pytest.mark.parametrize("discrete", [False, True])
def test_fast_policy_equals_reference_with_episode_starts(config, n_envs, discrete):
    L, E, H, obs_dim, act_dim, tmax = CONFIGS[config]
    model = make_model(discrete, L, E, H, obs_dim, act_dim, tmax)
    ref, fast = StreamingPolicy(model, 7.0, fast=False), StreamingPolicy(model, 7.0, fast=True)
    lean = cpu_step.FastAarenPolicy(model, 7.0, n_envs)
    assert ref.fast_step is None and fast.fast_step is not None
    obs, rewards, starts, taken, override = rollout(n_envs, 25, obs_dim, act_dim, discrete)
    s_ref = s_fast = None
    for t in range(len(obs)):
        rew = rewards[t - 1] if t else None
        a_ref, s_ref = ref.predict(obs[t], s_ref, episode_start=starts[t], reward=rew)
        a_fast, s_fast = fast.predict(obs[t], s_fast, episode_start=starts[t], reward=rew)
        a_lean = lean.predict(obs[t], episode_start=starts[t], reward=rew).copy()
        if discrete:
            assert (a_fast == a_ref).all() and (a_lean == a_ref).all()
        else:
            tol = 1e-5 * max(1.0, float(np.abs(a_ref).max()))  # float32, relative to the actions' scale
            assert np.abs(a_fast - a_ref).max() <= tol
            assert np.abs(a_lean - a_ref).max() <= tol
        if override[t]:
            s_ref = ref.record_action(s_ref, taken[t])
            s_fast = fast.record_action(s_fast, taken[t])
            lean.record_action(taken[t])
        assert_state_close(state_arrays(s_fast), state_arrays(s_ref))
    assert_state_close([lean.m, lean.u, lean.w], state_arrays(s_ref))
    assert np.array_equal(s_fast.timestep, s_ref.timestep.numpy()) and np.array_equal(lean.timestep, s_ref.timestep.numpy())


@needs_compiler
def test_bf16_variant_stays_close_to_the_reference():
    if not cpu_step.load_library().aaren_has_bf16():
        pytest.skip("this CPU has no AVX512_BF16")
    model = make_model(False, 3, 128, 1, 17, 6)  # perturbed weights: a harder case than a trained model
    ref = StreamingPolicy(model, 7.0, fast=False)
    lean = cpu_step.FastAarenPolicy(model, 7.0, 3, precision="bfloat16")
    obs, rewards, starts, _, _ = rollout(3, 30, 17, 6, False)
    s_ref, diffs = None, []
    for t in range(len(obs)):
        rew = rewards[t - 1] if t else None
        a_ref, s_ref = ref.predict(obs[t], s_ref, episode_start=starts[t], reward=rew)
        diffs.append(np.abs(lean.predict(obs[t], episode_start=starts[t], reward=rew) - a_ref).max())
    # bf16 keeps 8 bits of mantissa: not 1e-5, but close (actions span [-2, 1] here)
    assert max(diffs) <= 0.15 and np.median(diffs) <= 0.05


@needs_compiler
def test_step_torch_leaves_the_given_state_unchanged_and_policies_see_weight_updates():
    model = make_model()
    ref, fast = StreamingPolicy(model, 3.0, fast=False), StreamingPolicy(model, 3.0)
    obs, rewards, starts, _, _ = rollout(2, 6, 5, 3, False)
    s_ref, s_fast = None, None
    for t in range(5):
        rew = rewards[t - 1] if t else None
        _, s_ref = ref.predict(obs[t], s_ref, episode_start=starts[t], reward=rew)
        _, s_fast = fast.predict(obs[t], s_fast, episode_start=starts[t], reward=rew)
    # the functional step: the same inputs twice give the same outputs, and the input state stays
    before = [a.copy() for a in state_arrays(s_ref)]
    args = (model.normalize_obs(torch.as_tensor(obs[5])), s_ref.prev_action, s_ref.returns_to_go, s_ref.timestep,
            torch.zeros(2, dtype=torch.bool), s_ref.backbone)
    out1, _ = fast.fast_step.step_torch(*args)
    out2, _ = fast.fast_step.step_torch(*args)
    assert torch.equal(out1, out2)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, state_arrays(s_ref)))
    with torch.no_grad():  # training goes on: the next step must use the new weights
        model.backbone.blocks[0].mlp.fc.weight.mul_(1.5)
    a_fast, _ = fast.predict(obs[5], s_fast, reward=rewards[4])
    a_ref, _ = ref.predict(obs[5], s_ref, reward=rewards[4])
    assert np.abs(a_fast - a_ref).max() <= 1e-5
    out3, _ = fast.fast_step.step_torch(*args)
    assert (out3 - out1).abs().max() > 1e-4


@needs_compiler
def test_lean_policy_state_bytes_are_constant():
    model = make_model()
    lean = cpu_step.FastAarenPolicy(model, 1.0, 3)
    nbytes = []
    for t in range(300):
        lean.predict(np.ones((3, 5), np.float32), reward=np.zeros(3, np.float32))
        nbytes.append(lean.state_nbytes())
    assert len(set(nbytes)) == 1 and nbytes[0] == 2 * (4 * 2 * 3 * 2) + 4 * 2 * 3 * 32


def test_unsupported_models_fall_back_to_the_torch_path():
    cfg = dict(observation_dim=3, action_dim=2, action_low=[-1, -1], action_high=[1, 1], n_layer=1, embed_dim=32, n_head=1)
    transformer = DecisionModel(ModelConfig(backbone="transformer", **cfg))
    assert StreamingPolicy(transformer, 1.0, mode="recurrent").fast_step is None
    with pytest.raises(ValueError, match="backbone is 'transformer'"):
        StreamingPolicy(transformer, 1.0, mode="recurrent", fast=True)
    narrow = DecisionModel(ModelConfig(**{**cfg, "embed_dim": 24, "n_head": 2}))
    assert StreamingPolicy(narrow, 1.0, mode="recurrent").fast_step is None
    aaren = DecisionModel(ModelConfig(**cfg))
    assert StreamingPolicy(aaren, 1.0, mode="window").fast_step is None
    assert StreamingPolicy(aaren, 1.0, mode="recurrent").fast_step is not None or not cpu_step.available()
    assert StreamingPolicy(aaren.double(), 1.0, mode="recurrent").fast_step is None  # float32 only
    with pytest.raises(ValueError, match="mode is 'window'"):
        StreamingPolicy(aaren, 1.0, mode="window", fast=True)


def test_no_compiler_falls_back_cleanly(monkeypatch):
    monkeypatch.setenv("AAREN_RL_NO_CPU_KERNEL", "1")
    cpu_step.load_library.cache_clear()
    try:
        model = make_model()
        policy = StreamingPolicy(model, 1.0)
        assert policy.fast_step is None
        a, _ = policy.predict(np.zeros(5, np.float32))
        assert a.shape == (3,)
        with pytest.raises(ValueError, match="no C compiler"):
            StreamingPolicy(model, 1.0, fast=True)
    finally:
        cpu_step.load_library.cache_clear()


@needs_compiler
def test_sampled_discrete_actions_match_the_reference_path():
    model = make_model(discrete=True)
    ref, fast = StreamingPolicy(model, 7.0, fast=False), StreamingPolicy(model, 7.0)
    obs, rewards, starts, _, _ = rollout(4, 30, 5, 3, True)
    got, want, s_ref, s_fast, differs_from_argmax = [], [], None, None, 0
    for t in range(len(obs)):
        rew = rewards[t - 1] if t else None
        torch.manual_seed(t)
        a_ref, s_ref = ref.predict(obs[t], s_ref, episode_start=starts[t], reward=rew, deterministic=False)
        torch.manual_seed(t)
        a_fast, s_fast = fast.predict(obs[t], s_fast, episode_start=starts[t], reward=rew, deterministic=False)
        want.append(a_ref)
        got.append(a_fast)
        differs_from_argmax += int((a_fast != s_fast.out.argmax(-1)).any())
    got, want = np.array(got), np.array(want)
    assert np.array_equal(got, want)  # same logits, same seed: same samples, and the states follow them
    assert differs_from_argmax > 0  # really sampled, not the argmax every time
