"""The exported streaming step (ONNX, run by ONNX Runtime) against the PyTorch policy, and its errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from helpers import make_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from aaren_rl.checkpoint import save_checkpoint  # noqa: E402
from aaren_rl.cli import main  # noqa: E402
from aaren_rl.export import export_policy  # noqa: E402
from aaren_rl.policy import StreamingPolicy  # noqa: E402
from aaren_rl.runtime import OnnxPolicy  # noqa: E402

PENDULUM = ("Pendulum-v1", dict(obs_dim=3, act_dim=1))
CARTPOLE = ("CartPole-v1", dict(discrete=True, obs_dim=4, act_dim=2))
# name: env, backbone, training context, policy mode; K = 4, so that DT's windows slide within an episode
FORMS = {
    "aaren-continuous": (PENDULUM, "aaren", "episode", "recurrent"),
    "aaren-discrete": (CARTPOLE, "aaren", "episode", "recurrent"),
    "aaren-window": (PENDULUM, "aaren", "window", "window"),
    "aaren-recency": (PENDULUM, "aaren", "window", "recurrent"),  # built with model.recency = 0.3
    "dt-window-continuous": (PENDULUM, "transformer", "window", "window"),
    "dt-window-discrete": (CARTPOLE, "transformer", "window", "window"),
    "dt-kvcache": (PENDULUM, "transformer", "episode", "recurrent"),
    "dt-sliding": (PENDULUM, "transformer", "episode", "sliding"),
}


@pytest.fixture(scope="module", params=sorted(FORMS))
def exported(request, tmp_path_factory):
    (env_id, kw), backbone, context, mode = FORMS[request.param]
    model = make_model(backbone, context, K=4, recency=0.3 if request.param == "aaren-recency" else 0.0, **kw)
    folder = export_policy(model, tmp_path_factory.mktemp("export") / "policy", target_return=5.0, env_id=env_id,
                           mode=mode)
    return env_id, model, folder, mode


@pytest.fixture(scope="module")
def aaren_exported(tmp_path_factory):
    model = make_model(**PENDULUM[1])
    return export_policy(model, tmp_path_factory.mktemp("export") / "policy", target_return=5.0, env_id=PENDULUM[0])


def _run_side_by_side(env, onnx_policy, torch_policy, steps):
    """Both policies on the same observations (the PyTorch one's actions drive the env)."""
    vector = isinstance(env, gym.vector.VectorEnv)
    obs, _ = env.reset(seed=0)
    n = env.num_envs if vector else 1
    so = st = None
    starts, reward = np.ones(n, bool), np.zeros(n, np.float32)
    worst, resets = 0.0, 0
    for _ in range(steps):
        ao, so = onnx_policy.predict(obs, so, episode_start=starts, reward=reward)
        at, st = torch_policy.predict(obs, st, episode_start=starts, reward=reward)
        worst = max(worst, float(np.abs(np.asarray(ao, np.float64) - at).max()))
        obs, r, term, trunc, _ = env.step(at)
        if vector:
            reward, starts = np.asarray(r, np.float32), term | trunc
        else:
            reward, starts = np.array([r], np.float32), np.array([term or trunc])
            if term or trunc:
                obs, _ = env.reset()
        resets += int(np.sum(starts))
    return worst, resets


@pytest.mark.parametrize("n_envs", [1, 3])
def test_exported_actions_equal_the_pytorch_policy_over_whole_episodes(exported, n_envs):
    env_id, model, folder, mode = exported
    onnx_policy, torch_policy = OnnxPolicy(folder), StreamingPolicy(model, 5.0, mode=mode, backend="torch")
    assert onnx_policy.target_return == 5.0 and onnx_policy.mode == mode  # the spec's
    steps, kw = 130, {"max_episode_steps": 60}  # whole episodes and resets (two and more per env)
    if n_envs == 1:
        env = gym.make(env_id, **kw)
    else:
        env = gym.make_vec(env_id, num_envs=n_envs, vectorization_mode="sync", **kw,
                           vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    try:
        worst, resets = _run_side_by_side(env, onnx_policy, torch_policy, steps)
    finally:
        env.close()
    assert resets >= 2 * n_envs
    assert worst <= 1e-5


def test_the_state_has_the_size_the_spec_says(exported):
    _, model, folder, mode = exported
    policy = OnnxPolicy(folder)
    spec = json.loads((folder / "spec.json").read_text())
    state = policy.reset(2)
    obs = np.zeros((2, model.config.observation_dim), np.float32)
    for t in range(1, 6):
        _, state = policy.predict(obs, state, reward=np.zeros(2))
        if spec["state_bytes_per_env"] is None:  # the growing key/value cache: 3 tokens a step
            assert policy.state_nbytes(state) == 2 * t * spec["state_bytes_per_env_per_step"]
        else:
            assert policy.state_nbytes(state) == 2 * spec["state_bytes_per_env"]
    assert (spec["state_bytes_per_env"] is None) == (model.config.backbone == "transformer" and mode == "recurrent")
    assert spec["model_config"] == model.config.to_dict() and spec["mode"] == mode
    assert spec["normalization"]["obs_mean"] == pytest.approx(model.obs_mean.tolist())


def test_the_runtime_imports_and_acts_without_torch(exported):
    env_id, model, folder, mode = exported
    obs = np.random.default_rng(0).normal(size=(4, 2, model.config.observation_dim)).astype(np.float32)
    code = f"""
import sys, numpy as np
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, NoTorch())
from aaren_rl.runtime import OnnxPolicy
p = OnnxPolicy({str(folder)!r})
obs = np.array({obs.tolist()!r}, np.float32)
state, out = None, []
for t in range(obs.shape[0]):
    a, state = p.predict(obs[t], state, reward=None if t == 0 else np.ones(2))
    out.append(np.asarray(a, np.float64).tolist())
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print(repr(out))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = np.array(eval(res.stdout.strip().splitlines()[-1]))
    torch_policy, state, want = StreamingPolicy(model, 5.0, mode=mode, backend="torch"), None, []
    for t in range(obs.shape[0]):
        a, state = torch_policy.predict(obs[t], state, reward=None if t == 0 else np.ones(2))
        want.append(a)
    np.testing.assert_allclose(got, np.array(want, np.float64), atol=1e-5)


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    dst.mkdir()
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_missing_or_corrupt_onnx_file_is_a_clear_error(aaren_exported, tmp_path):
    folder = _copy(aaren_exported, tmp_path)
    (folder / "step.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="does not match its spec"):
        OnnxPolicy(folder)
    spec = json.loads((folder / "spec.json").read_text())
    del spec["onnx_sha256"]  # without the checksum, ONNX Runtime itself refuses it
    (folder / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        OnnxPolicy(folder)
    (folder / "step.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="step.onnx: the exported model is missing"):
        OnnxPolicy(folder)
    with pytest.raises(FileNotFoundError, match="no spec.json"):
        OnnxPolicy(tmp_path)


def test_a_spec_that_does_not_match_the_model_is_a_clear_error(aaren_exported, tmp_path):
    folder = _copy(aaren_exported, tmp_path)
    spec = json.loads((folder / "spec.json").read_text())
    spec["model_config"]["observation_dim"] += 1
    (folder / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="does not match its spec: input obs has shape"):
        OnnxPolicy(folder)
    spec["model_config"]["observation_dim"] -= 1
    spec["state"]["w"]["shape"][-1] *= 2
    (folder / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="input w has shape"):
        OnnxPolicy(folder)
    (folder / "spec.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="format 'something else'"):
        OnnxPolicy(folder)
    (folder / "spec.json").write_text('{"format": "aaren-rl-step/1"}')
    with pytest.raises(ValueError, match="older aaren-rl: export the checkpoint again"):
        OnnxPolicy(folder)


def test_export_and_evaluate_from_the_command_line(tmp_path, capsys):
    model = make_model(obs_dim=3, act_dim=1)
    save_checkpoint(tmp_path / "run", 1, model, {"env_id": "Pendulum-v1", "target_return": 5.0})
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["spec.json", "step.onnx"]
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0  # an export is replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written left
    assert main(["evaluate", str(out), "--episodes", "2", "--json", str(tmp_path / "res.json")]) == 0
    res = json.loads((tmp_path / "res.json").read_text())
    ref = main(["evaluate", str(tmp_path / "run"), "--episodes", "2", "--json", str(tmp_path / "ref.json")])
    assert ref == 0
    np.testing.assert_allclose(res["returns"], json.loads((tmp_path / "ref.json").read_text())["returns"], rtol=1e-4)
    # an env whose spaces differ: one line, no traceback
    with pytest.raises(SystemExit, match=r"^error: CartPole-v1 does not match the exported policy .*observations have 4"):
        main(["evaluate", str(out), "--env", "CartPole-v1", "--episodes", "1"])
    # a folder that is neither a checkpoint nor an export, as --out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="exists and is not an exported policy folder"):
        main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "other")])


def test_a_decision_transformer_exports_in_each_mode_from_the_command_line(tmp_path, capsys):
    model = make_model("transformer", "episode", K=4, obs_dim=3, act_dim=1)
    save_checkpoint(tmp_path / "run", 1, model, {"env_id": "Pendulum-v1", "target_return": 5.0})
    for mode in ("window", "recurrent", "sliding"):
        out = tmp_path / mode
        assert main(["export", str(tmp_path / "run"), "--out", str(out), "--mode", mode]) == 0
        assert f"mode {mode}" in capsys.readouterr().out
        assert json.loads((out / "spec.json").read_text())["mode"] == mode
    assert main(["evaluate", str(tmp_path / "sliding"), "--episodes", "1"]) == 0
    with pytest.raises(SystemExit, match="exported in mode 'sliding'; --mode window needs the checkpoint"):
        main(["evaluate", str(tmp_path / "sliding"), "--mode", "window", "--episodes", "1"])
    save_checkpoint(tmp_path / "da", 1, make_model(obs_dim=3, act_dim=1), {"env_id": "Pendulum-v1"})
    with pytest.raises(SystemExit, match="mode 'sliding' is a Transformer's"):
        main(["export", str(tmp_path / "da"), "--out", str(tmp_path / "x"), "--mode", "sliding"])


def test_bench_step_in_onnxruntime_times_every_policy_and_writes_its_json(tmp_path, capsys):
    assert main(["bench", "step", "--engine", "onnxruntime", "--quick", "--batch", "1", "2",
                 "--json", str(tmp_path / "step.json")]) == 0
    res = json.loads((tmp_path / "step.json").read_text())
    assert res["engine"] == "onnxruntime" and res["machine"]["intra_op_threads"] == 1
    got = {(r["method"], r["batch"], r["t"]) for r in res["timing"]}
    assert got == {(m, n, t) for m in ("aaren", "dt_window", "dt_kvcache", "dt_sliding") for n in (1, 2) for t in (10, 100)}
    bytes_ = {(r["method"], r["batch"], r["t"]): r["state_bytes"] for r in res["timing"]}
    assert bytes_[("aaren", 1, 100)] == bytes_[("aaren", 1, 10)] == 1560  # 3 layers x (128 + 2) float32
    assert bytes_[("dt_kvcache", 1, 100)] == 10 * bytes_[("dt_kvcache", 1, 10)]  # grows with t
    assert bytes_[("dt_sliding", 2, 100)] == bytes_[("dt_sliding", 2, 10)] == 2 * bytes_[("dt_sliding", 1, 10)]
    assert set(res["onnx_bytes"]) == {"aaren", "dt_window", "dt_kvcache", "dt_sliding"}
    assert "Decision Transformer, sliding key/value cache" in capsys.readouterr().out
