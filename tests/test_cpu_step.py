"""The compiled CPU step (aaren_rl.kernels.cpu_step behind backends.CompiledStep): the same
actions and state as the PyTorch step, the same errors, a layout checked by name, a private cache."""

import copy
import ctypes
import os
import stat

import numpy as np
import pytest
import torch

import helpers
from aaren_rl.backends import CompiledStep, TorchStep
from aaren_rl.kernels import cpu_step
from aaren_rl.model import DecisionModel, ModelConfig
from aaren_rl.policy import StreamingPolicy

needs_compiler = pytest.mark.skipif(not cpu_step.available(), reason="no C compiler: the PyTorch step is used")


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
    return [state.memory.m, state.memory.u, state.memory.w]


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
def test_compiled_step_equals_torch_step_with_episode_starts(config, n_envs, discrete):
    L, E, H, obs_dim, act_dim, tmax = CONFIGS[config]
    _compare_backends(make_model(discrete, L, E, H, obs_dim, act_dim, tmax), n_envs, obs_dim, act_dim, discrete)


@needs_compiler
@pytest.mark.parametrize("recency", [0.05, 1.5])
@pytest.mark.parametrize("discrete", [False, True])
def test_compiled_step_with_recency_equals_torch_step(recency, discrete):
    """A model built with ``model.recency``: the C step drops m by the decay before every token
    (the padded a-token at an episode start too), as the PyTorch step refers m to the last token."""
    torch.manual_seed(0)
    model = helpers.make_model("aaren", "window", discrete, 2, 32, 2, 5, 3, recency=recency)
    _compare_backends(model, 4, 5, 3, discrete)


def _compare_backends(model, n_envs, obs_dim, act_dim, discrete):
    ref, fast = StreamingPolicy(model, 7.0, backend="torch"), StreamingPolicy(model, 7.0, backend="compiled")
    assert isinstance(ref.backend, TorchStep) and isinstance(fast.backend, CompiledStep)
    assert isinstance(StreamingPolicy(model, 7.0).backend, CompiledStep)  # the default where it applies
    obs, rewards, starts, taken, override = rollout(n_envs, 25, obs_dim, act_dim, discrete)
    s_ref = s_fast = None
    for t in range(len(obs)):
        rew = rewards[t - 1] if t else None
        a_ref, s_ref = ref.predict(obs[t], s_ref, episode_start=starts[t], reward=rew)
        a_fast, s_fast = fast.predict(obs[t], s_fast, episode_start=starts[t], reward=rew)
        if discrete:
            assert (a_fast == a_ref).all()
        else:
            tol = 1e-5 * max(1.0, float(np.abs(a_ref).max()))  # float32, relative to the actions' scale
            assert np.abs(a_fast - a_ref).max() <= tol
        if override[t]:
            s_ref = ref.record_action(s_ref, taken[t])
            s_fast = fast.record_action(s_fast, taken[t])
        assert type(s_fast) is type(s_ref) and type(s_fast.memory) is type(s_ref.memory)  # one state type
        assert_state_close(state_arrays(s_fast), state_arrays(s_ref))
        assert np.array_equal(s_fast.timestep, s_ref.timestep)
        assert np.allclose(s_fast.returns_to_go, s_ref.returns_to_go)


@needs_compiler
def test_bf16_variant_stays_close_to_the_reference():
    if not cpu_step.has_bf16():
        pytest.skip("this CPU has no AVX512_BF16")
    model = make_model(False, 3, 128, 1, 17, 6)  # perturbed weights: a harder case than a trained model
    ref = StreamingPolicy(model, 7.0, backend="torch")
    bf16 = StreamingPolicy(model, 7.0, backend=CompiledStep(model, precision="bfloat16"))
    obs, rewards, starts, _, _ = rollout(3, 30, 17, 6, False)
    s_ref = s_bf16 = None
    diffs = []
    for t in range(len(obs)):
        rew = rewards[t - 1] if t else None
        a_ref, s_ref = ref.predict(obs[t], s_ref, episode_start=starts[t], reward=rew)
        a_bf16, s_bf16 = bf16.predict(obs[t], s_bf16, episode_start=starts[t], reward=rew)
        diffs.append(np.abs(a_bf16 - a_ref).max())
    # bf16 keeps 8 bits of mantissa: not 1e-5, but close (actions span [-2, 1] here)
    assert max(diffs) <= 0.15 and np.median(diffs) <= 0.05


@needs_compiler
def test_compiled_policy_sees_weight_updates():
    model = make_model()
    ref, fast = StreamingPolicy(model, 3.0, backend="torch"), StreamingPolicy(model, 3.0, backend="compiled")
    obs, rewards, starts, _, _ = rollout(2, 6, 5, 3, False)
    s_ref, s_fast = None, None
    for t in range(5):
        rew = rewards[t - 1] if t else None
        _, s_ref = ref.predict(obs[t], s_ref, episode_start=starts[t], reward=rew)
        _, s_fast = fast.predict(obs[t], s_fast, episode_start=starts[t], reward=rew)
    before, _ = fast.predict(obs[5], s_fast.copy(), reward=rewards[4])
    with torch.no_grad():  # training goes on: the next step must use the new weights
        model.backbone.blocks[0].mlp.fc.weight.mul_(1.5)
    a_fast, _ = fast.predict(obs[5], s_fast, reward=rewards[4])
    a_ref, _ = ref.predict(obs[5], s_ref, reward=rewards[4])
    assert np.abs(a_fast - a_ref).max() <= 1e-5
    assert np.abs(a_fast - before).max() > 1e-4


@needs_compiler
def test_state_copy_branches_and_predict_updates_in_place():
    policy = StreamingPolicy(make_model(), 1.0)
    obs, rewards, _, _, _ = rollout(2, 4, 5, 3, False)
    _, state = policy.predict(obs[0])
    branch = state.copy()
    a1, same = policy.predict(obs[1], state, reward=rewards[0])
    assert same is state and not np.array_equal(state.memory.w, branch.memory.w)
    a2, _ = policy.predict(obs[1], branch, reward=rewards[0])
    assert np.array_equal(a1, a2)  # the branch went on from where it was copied


@needs_compiler
def test_state_bytes_are_constant():
    policy = StreamingPolicy(make_model(), 1.0)
    state, nbytes = None, []
    for t in range(300):
        _, state = policy.predict(np.ones((3, 5), np.float32), state, reward=None if t == 0 else np.zeros(3))
        nbytes.append(policy.state_nbytes(state))
    assert len(set(nbytes)) == 1 and nbytes[0] == 2 * (4 * 2 * 3 * 2) + 4 * 2 * 3 * 32


def test_unsupported_models_fall_back_to_the_torch_step():
    cfg = dict(observation_dim=3, action_dim=2, action_low=[-1, -1], action_high=[1, 1], n_layer=1, embed_dim=32, n_head=1)
    transformer = DecisionModel(ModelConfig(backbone="transformer", **cfg))
    assert isinstance(StreamingPolicy(transformer, 1.0, mode="recurrent").backend, TorchStep)
    with pytest.raises(ValueError, match="backbone is 'transformer'"):
        StreamingPolicy(transformer, 1.0, mode="recurrent", backend="compiled")
    narrow = DecisionModel(ModelConfig(**{**cfg, "embed_dim": 24, "n_head": 2}))
    assert isinstance(StreamingPolicy(narrow, 1.0, mode="recurrent").backend, TorchStep)
    aaren = DecisionModel(ModelConfig(**cfg))
    assert isinstance(StreamingPolicy(aaren, 1.0, mode="window").backend, TorchStep)
    assert isinstance(StreamingPolicy(aaren, 1.0).backend, CompiledStep) or not cpu_step.available()
    assert isinstance(StreamingPolicy(copy.deepcopy(aaren).double(), 1.0).backend, TorchStep)  # float32 only
    with pytest.raises(ValueError, match="mode is 'window'"):
        StreamingPolicy(aaren, 1.0, mode="window", backend="compiled")
    with pytest.raises(ValueError, match="backend must be one of"):
        StreamingPolicy(aaren, 1.0, backend="fast")


def test_no_compiler_falls_back_cleanly(monkeypatch):
    monkeypatch.setenv("AAREN_RL_NO_CPU_KERNEL", "1")
    cpu_step.load_library.cache_clear()
    try:
        model = make_model()
        policy = StreamingPolicy(model, 1.0)
        assert isinstance(policy.backend, TorchStep)
        a, _ = policy.predict(np.zeros(5, np.float32))
        assert a.shape == (3,)
        with pytest.raises(ValueError, match="no C compiler"):
            StreamingPolicy(model, 1.0, backend="compiled")
    finally:
        cpu_step.load_library.cache_clear()


@needs_compiler
def test_sampled_discrete_actions_match_the_reference_path():
    model = make_model(discrete=True)
    ref, fast = StreamingPolicy(model, 7.0, backend="torch"), StreamingPolicy(model, 7.0)
    obs, rewards, starts, _, _ = rollout(4, 30, 5, 3, True)
    got, want, s_ref, s_fast, differs_from_argmax = [], [], None, None, 0
    for t in range(len(obs)):
        rew = rewards[t - 1] if t else None
        torch.manual_seed(t)
        a_ref, s_ref = ref.predict(obs[t], s_ref, episode_start=starts[t], reward=rew, deterministic=False)
        greedy, _ = fast.predict(obs[t], s_fast.copy() if s_fast else None, episode_start=starts[t], reward=rew)
        torch.manual_seed(t)
        a_fast, s_fast = fast.predict(obs[t], s_fast, episode_start=starts[t], reward=rew, deterministic=False)
        want.append(a_ref)
        got.append(a_fast)
        differs_from_argmax += int((a_fast != greedy).any())
    assert np.array_equal(np.array(got), np.array(want))  # same logits, same seed: same samples
    assert differs_from_argmax > 0  # really sampled, not the argmax every time


@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("what", ["observation", "reward"])
@pytest.mark.parametrize("value", [np.nan, np.inf, 1e30])
def test_non_finite_or_huge_inputs_raise_the_same_error_on_every_backend(backend, what, value):
    if backend == "compiled" and not cpu_step.available():
        pytest.skip("no C compiler")
    policy = StreamingPolicy(make_model(), 1.0, backend=backend)
    obs = np.zeros((2, 5), np.float32)
    _, state = policy.predict(obs)
    reward = np.zeros(2, np.float32)
    (obs if what == "observation" else reward)[1] = value
    w_before = state.memory.w.copy()
    with pytest.raises(ValueError, match=f"^{what} contains NaN or inf, or a value beyond 1e\\+15"):
        policy.predict(obs, state, reward=reward)
    assert np.array_equal(state.memory.w, w_before)  # nothing was stepped


# ------------------------------------------------------------------- a whole episode at DT's size


@needs_compiler
def test_a_whole_episode_at_dt_size_matches_a_float64_forward():
    """1000 steps (3000 tokens) of DT's size (3 layers, width 128, 1 head), queries sharpened 30x
    (peaked attention: the scores' errors matter most), each step's action against a float64
    parallel forward over the same trajectory. Measured: the compiled step 3.0e-5, the float32
    PyTorch step 4.7e-5 at most (actions span [-2, 1]). Tolerance: 2e-4 for both, and the
    compiled step no worse than twice the PyTorch step."""
    T = 1000
    model = make_model(False, 3, 128, 1, 17, 6)
    with torch.no_grad():
        for block in model.backbone.blocks:
            block.mixer.query.mul_(30)
    rng = np.random.default_rng(1)
    obs = (rng.normal(size=(T, 17)) * 2).astype(np.float32)
    rewards = rng.normal(size=T).astype(np.float32)
    target = 5.0
    m64 = copy.deepcopy(model).double()
    rtg = target - np.concatenate([[0.0], np.cumsum(rewards.astype(np.float64))[:-1]])

    def errors(backend):
        policy, state, actions = StreamingPolicy(model, target, backend=backend), None, []
        for t in range(T):
            a, state = policy.predict(obs[t], state, reward=None if t == 0 else rewards[t - 1:t])
            actions.append(a)
        actions = np.array(actions)
        with torch.no_grad():  # the float64 parallel forward over the trajectory this policy took
            o = m64.normalize_obs(torch.as_tensor(obs, dtype=torch.float64)[None])
            act = m64.normalize_action(torch.as_tensor(actions, dtype=torch.float64)[None])
            pred = m64(torch.as_tensor(rtg)[None], o, act, torch.arange(T)[None])[0]
        return np.abs(actions - m64.unnormalize_action(pred).numpy()).max()

    err_c, err_t = errors("compiled"), errors("torch")
    assert err_t <= 2e-4 and err_c <= 2e-4, (err_c, err_t)
    assert err_c <= 2 * err_t, (err_c, err_t)


# ------------------------------------------------------------------------------- the library


@needs_compiler
def test_the_layout_is_checked_by_name():
    lib = cpu_step.load_library()
    names = list(lib.meta_names)
    assert "sv_w" in names and "E" in names
    dims, tensors, layers = make_model().export_step_weights()
    renamed = [("fc_weight" if n == "fc_w" else n) for n in names]
    with pytest.raises(RuntimeError, match=r"reads \['fc_weight'\].*not \['fc_w'\]"):
        cpu_step.pack(dims, tensors, layers, renamed, lib.aaren_panel_width())
    params, meta = cpu_step.pack(dims, tensors, layers, names, lib.aaren_panel_width())
    assert meta[names.index("E")] == 32 and meta[names.index("L")] == 2
    assert [n for n, _ in cpu_step.IO_FIELDS] == cpu_step._names(lib.aaren_io_names)


@needs_compiler
def test_loading_the_library_leaves_denormals_alone():
    """A library built with -ffast-math would switch the whole process to flush-to-zero."""
    cpu_step.load_library()
    tiny = np.array([1e-39], np.float32)
    assert (tiny * np.float32(1.0))[0] != 0 and (torch.tensor([1e-39]) * 1.0).item() != 0


@needs_compiler
def test_the_library_is_built_in_a_private_folder_and_never_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("AAREN_RL_CACHE", str(tmp_path / "cache"))
    cpu_step.load_library.cache_clear()
    try:
        assert cpu_step.load_library() is not None
        folder = tmp_path / "cache" / "cpu_step"
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700 and list(folder.glob("cpu_step-*.so"))
        cpu_step.load_library.cache_clear()
        os.chmod(folder, 0o777)  # a folder others could plant a library in: not used
        with pytest.warns(RuntimeWarning, match="can be written by other users"):
            assert cpu_step.load_library() is None
        cpu_step.load_library.cache_clear()
        os.chmod(folder, 0o700)
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("AAREN_RL_CACHE", str(tmp_path / "file"))  # no folder can be made: no fallback
        with pytest.warns(RuntimeWarning, match="private cache folder"):
            assert cpu_step.load_library() is None
    finally:
        cpu_step.load_library.cache_clear()
    monkeypatch.undo()
    assert isinstance(cpu_step.load_library(), ctypes.CDLL)


@needs_compiler
def test_bench_step_times_the_memory_tasks_agents_with_their_shapes(tmp_path):
    import json

    from aaren_rl.cli import main

    out = tmp_path / "step.json"
    assert main(["bench", "step", "--shape", "memory", "--quick", "--batch", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"]["shape"] == "memory" and res["model"]["discrete"] is True
    assert (res["model"]["embed_dim"], res["model"]["observation_dim"], res["model"]["action_dim"]) == (64, 3, 2)
    aaren = res["memory"]["aaren_compiled"]["points"]
    assert {p["state_bytes"] for p in aaren} == {3 * (64 + 2) * 4}  # 3 layers x (w: 64, m and u: 1 each) float32
    cache = res["memory"]["dt_kvcache"]["points"]
    # the whole-episode cache grows by the same bytes every step: 3 tokens x 3 layers x (key and value,
    # 64 float32 each, and a validity flag)
    assert len(cache) > 3 and all(p["cache_bytes"] == p["step"] * 3 * 3 * (2 * 64 * 4 + 1) for p in cache)
    assert main(["bench", "step", "--shape", "memory", "--engine", "onnxruntime", "--quick"]) == 2  # not silently ignored
