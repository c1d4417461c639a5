"""The long-memory task: bsuite's memory_len as a gymnasium env, its scripted expert, the tiers,
and the success rate."""

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("bsuite")

from aaren_rl.memory import (CHANCE, ENV_ID, ContextPolicy, env_id, episode_length,  # noqa: E402
                             memory_length_for, success_rate)


def run_episodes(policy_for, memory_length, n=8, seed=0):
    """Each env's first episode in a vector env: returns (n,), observations (n, T+1, 3), actions (n, T)."""
    env = gym.vector.SyncVectorEnv([lambda: gym.make(ENV_ID, memory_length=memory_length) for _ in range(n)])
    obs, _ = env.reset(seed=seed)
    policy = policy_for(n)
    start, total = np.ones(n, bool), np.zeros(n)
    observations, actions = [obs], []
    for _ in range(episode_length(memory_length)):
        a = policy(obs, start)
        actions.append(a)
        obs, r, term, trunc, _ = env.step(a)
        observations.append(obs)
        total += r
        start = term | trunc
    assert start.all() and not trunc.any()  # every episode terminated after exactly L + 1 actions
    env.close()
    return total, np.stack(observations, 1), np.array(actions).T


class LastK:
    """A policy with no memory beyond its last K observations: at the decision it answers a context
    it sees among them, or guesses. It is at chance once the cue is K or more steps back."""

    def __init__(self, n, memory_length, K=20, seed=0):
        self.L, self.K, self.t = memory_length, K, np.zeros(n, int)
        self.window, self.rng = [[] for _ in range(n)], np.random.default_rng(seed)

    def __call__(self, obs, start):
        self.t = np.where(start, 0, self.t + 1)
        actions = self.rng.integers(0, 2, len(self.t))
        for i, o in enumerate(obs):
            self.window[i] = ([] if start[i] else self.window[i])[-(self.K - 1):] + [o]
            seen = [w[2] for w in self.window[i] if w[2] != 0]
            if self.t[i] == self.L and seen:
                actions[i] = int(seen[-1] > 0)
        return actions


def test_spaces_and_episode_length():
    env = gym.make(env_id(50))
    assert env.observation_space == gym.spaces.Box(np.array([0, 0, -1], np.float32), 1.0, (3,), np.float32)
    assert env.action_space == gym.spaces.Discrete(2) and env.unwrapped.memory_length == 51 == memory_length_for(50)
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (3,) and info["context"] in (-1, 1)
    for t in range(episode_length(51) - 1):
        obs, r, term, trunc, _ = env.step(0)
        assert r == 0.0 and not term and not trunc, t
    obs, r, term, trunc, info = env.step(0)
    assert term and not trunc and r in (-1.0, 1.0) and info["success"] == (r > 0)
    with pytest.raises(RuntimeError, match="reset"):
        env.unwrapped.step(0)
    from aaren_rl.evaluate import check_env_matches

    check_env_matches("aaren_rl.memory:MemoryLength100-v0", 3, 2, True, "a test")  # a module: id resolves


def test_the_context_is_shown_in_the_first_two_observations_only():
    _, observations, _ = run_episodes(lambda n: ContextPolicy(n, 30), 30, n=16)
    context = observations[:, 0, 2]
    assert set(context) == {-1.0, 1.0}  # both contexts occur among 16 episodes
    np.testing.assert_array_equal(observations[:, 1, 2], context)  # bsuite's first step repeats it
    assert (observations[:, 2:, 2] == 0).all()
    np.testing.assert_allclose(observations[0, :, 0], [1.0] + [1 - t / 30 for t in range(31)], atol=1e-6)
    assert (observations[:, :, 1] == 0).all()  # one bit: the query is always 0


def test_episodes_are_reproducible_under_a_seed():
    def contexts(seed):
        env = gym.make(ENV_ID, memory_length=5)
        first = env.reset(seed=seed)[1]["context"]
        return [first] + [env.reset()[1]["context"] for _ in range(19)]

    assert contexts(1) == contexts(1)
    assert contexts(1) != contexts(2)
    assert 0 < contexts(3).count(1) < 20


def test_the_expert_succeeds_random_is_at_chance_and_a_20_step_window_is_at_chance_beyond_it():
    returns, _, actions = run_episodes(lambda n: ContextPolicy(n, 51, seed=0), 51, n=8)
    assert success_rate(returns) == 1.0 and (returns == 1.0).all()
    # the expert's corridor is random: its previous action says nothing about the answer
    assert 0 < (actions[:, -2] == actions[:, -1]).sum() < 8
    returns, _, _ = run_episodes(lambda n: ContextPolicy(n, 51, epsilon=1.0, seed=1), 51, n=200)
    assert abs(success_rate(returns) - CHANCE) < 0.1
    returns, _, _ = run_episodes(lambda n: LastK(n, 51), 51, n=200)  # d = 50 > K = 20
    assert abs(success_rate(returns) - CHANCE) < 0.1
    returns, _, _ = run_episodes(lambda n: LastK(n, 20), 20, n=20)  # d = 19 < K: the cue is in view
    assert success_rate(returns) == 1.0
    returns, _, _ = run_episodes(lambda n: LastK(n, 21), 21, n=200)  # d = 20 = K: just out of view
    assert abs(success_rate(returns) - CHANCE) < 0.1


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="memory_length must be a positive integer"):
        gym.make(ENV_ID, memory_length=0)
    with pytest.raises(ValueError, match="memory_length is required"):
        gym.make(ENV_ID)
    with pytest.raises(ValueError, match="epsilon"):
        ContextPolicy(2, 10, epsilon=1.5)
    with pytest.raises(ValueError, match="cue distance"):
        env_id(42)
    with pytest.raises(ValueError, match="at least one"):
        success_rate([])


def test_a_missing_bsuite_names_the_extra_and_training_does_without_it(monkeypatch, tmp_path):
    import sys

    from aaren_rl.data import load_dataset
    from aaren_rl.memory import collect_datasets

    rep = collect_datasets(tmp_path, 50, episodes=4, seed=0)
    monkeypatch.setitem(sys.modules, "bsuite.environments.memory_chain", None)
    env = gym.make(ENV_ID, memory_length=3)  # its spaces, for a dataset's loading and training
    assert env.action_space == gym.spaces.Discrete(2) and env.observation_space.shape == (3,)
    ds = load_dataset(rep["tiers"]["expert"]["hdf5"])
    assert ds.discrete and ds.action_dim == 2
    with pytest.raises(ImportError, match=r"pip install 'aaren-rl\[memory\]'"):
        env.reset(seed=0)  # running episodes needs bsuite


def test_datasets_tiers_and_a_discrete_agent_trains_on_them(tmp_path):
    from aaren_rl.data import load_dataset
    from aaren_rl.memory import collect_datasets
    from aaren_rl.train import TrainConfig, make_update_step, model_config_for

    rep = collect_datasets(tmp_path, 50, episodes=40, seed=0)
    tiers = rep["tiers"]
    assert rep["ref_max_score"] == 1.0 and -0.4 < rep["ref_min_score"] < 0.4 and rep["memory_length"] == 51
    assert tiers["expert"]["success_rate"] == 1.0
    assert 0.3 < tiers["random"]["success_rate"] < 0.7
    assert 0.6 < tiers["medium"]["success_rate"] < 0.9  # half its answers random: 0.75
    assert tiers["medium-expert"]["episodes"] == 80 and tiers["medium-expert"]["steps"] == 80 * 52
    ds = load_dataset(tiers["medium-expert"]["hdf5"])
    assert ds.discrete and ds.action_dim == 2 and ds.observation_dim == 3 and ds.ref_max_score == 1.0
    mc = model_config_for(ds, backbone="aaren", context="episode", n_layer=1, embed_dim=16, n_head=1, dropout=0.0)
    update = make_update_step(mc, TrainConfig(batch_size=2, warmup_steps=1, device="cpu", compile="none"), ds)
    for _ in range(2):
        update()
    assert np.isfinite(update.pop_mean_loss())


def test_evaluate_success_scores_a_policy():
    from aaren_rl.memory import evaluate_success

    class Scripted:  # StreamingPolicy's predict interface around the scripted expert
        def __init__(self, epsilon):
            self.p = ContextPolicy(1, memory_length_for(50), epsilon, seed=0)

        def predict(self, obs, state, episode_start=None, reward=None):
            return self.p(np.asarray(obs)[None], np.asarray(episode_start)), state

    res = evaluate_success(Scripted(0.0), env_id(50), episodes=5, seed=0)
    assert res["return_mean"] == 1.0 and res["success_rate"] == 1.0
    res = evaluate_success(Scripted(1.0), env_id(50), episodes=60, seed=0)
    assert 0.3 < res["success_rate"] < 0.7


def test_memory_runs_table_keeps_runs_with_other_settings_apart(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    base = {"agent": "decision_aaren_episode", "cue_distance": 100, "mode": "recurrent", "expert_success": 1.0,
            "chance_success": 0.5, "settings": ["model.embed_dim=64", "train.learning_rate=0.0003"]}
    runs = [dict(base, seed=0, success_rate=0.5), dict(base, seed=1, success_rate=0.5),
            dict(base, seed=0, success_rate=1.0, settings=base["settings"] + ["model.query_init=1.0"]),
            dict(base, seed=1, success_rate=0.0, settings=base["settings"] + ["model.query_init=1.0"]),
            dict(base, seed=0, success_rate=1.0, train_episodes=4000), dict(base, seed=1, success_rate=1.0, train_episodes=4000)]
    files = []
    for i, r in enumerate(runs):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(r))
    out = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "memory_runs.py"), "--table-from",
                          *map(str, files)], capture_output=True, text=True, check=True).stdout
    assert "| 100 | decision_aaren_episode | recurrent | - | 2 | 0.50 ± 0.00 |" in out
    assert "| 100 | decision_aaren_episode model.query_init=1.0 | recurrent | - | 2 | 0.50 ± 0.50 |" in out
    assert "| 100 | decision_aaren_episode | recurrent | 4000 | 2 | 1.00 ± 0.00 |" in out  # other data: its own row


def test_memory_runs_train_then_evaluate_equals_one_run(tmp_path):
    """--stage train on one machine and --stage evaluate on another give the JSON a whole run gives."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from aaren_rl.memory import collect_datasets

    collect_datasets(tmp_path / "data", 50, episodes=20, seed=0)
    script = str(Path(__file__).parents[1] / "scripts" / "memory_runs.py")
    common = ["--data", str(tmp_path / "data"), "--distance", "50", "--agents", "decision_aaren_episode", "--seeds", "0",
              "--updates", "3", "--eval-episodes", "10", "--set", "train.batch_size=2"]

    def run(out, results, *stage):
        subprocess.run([sys.executable, script, *common, "--out", str(tmp_path / out), "--results",
                        str(tmp_path / results), *stage], capture_output=True, text=True, check=True)
        saved = tmp_path / results / "d50_decision_aaren_episode_s0.json"
        return json.loads(saved.read_text()) if saved.exists() else None

    whole = run("a", "ra")
    assert run("b", "rb", "--stage", "train") is None  # training alone writes no result
    staged = run("b", "rb", "--stage", "evaluate")
    for row in (whole, staged):
        row.pop("eval_seconds"), row.pop("train_seconds")
    assert staged == whole and whole["train_episodes"] == 40 and whole["updates"] == 3
    bad = subprocess.run([sys.executable, script, *common, "--out", str(tmp_path / "none"), "--stage", "evaluate"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "run the train stage first" in bad.stderr


def test_memory_runs_group_trains_the_seeds_together_as_they_train_alone(tmp_path):
    """--group: each agent's seeds in one batched process; each run scores as it does alone (CPU)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from aaren_rl.memory import collect_datasets

    collect_datasets(tmp_path / "data", 50, episodes=20, seed=0)
    script = str(Path(__file__).parents[1] / "scripts" / "memory_runs.py")
    common = ["--data", str(tmp_path / "data"), "--distance", "50", "--agents", "decision_aaren_episode", "--seeds", "0", "1",
              "--updates", "3", "--eval-episodes", "10", "--set", "train.batch_size=2"]

    def run(out, *extra):
        subprocess.run([sys.executable, script, *common, "--out", str(tmp_path / out), "--results",
                        str(tmp_path / ("r" + out)), *extra], capture_output=True, text=True, check=True)
        return {s: json.loads((tmp_path / ("r" + out) / f"d50_decision_aaren_episode_s{s}.json").read_text()) for s in (0, 1)}

    solo, grouped = run("solo"), run("group", "--group")
    assert (tmp_path / "group" / "d50" / "decision_aaren_episode" / "s1" / "checkpoints").is_dir()
    for s in (0, 1):
        assert grouped[s]["group_runs"] == 2 and solo[s]["group_runs"] == 1
        assert grouped[s]["success_rate"] == solo[s]["success_rate"]
        assert grouped[s]["return_mean"] == solo[s]["return_mean"]
    # the evaluate stage finds a group's run folders
    staged = run("group", "--group", "--stage", "evaluate")
    for s in (0, 1):
        assert staged[s]["success_rate"] == grouped[s]["success_rate"]
