"""aaren_rl.data.collect and ``aaren-rl collect``: a tiny end-to-end collection on Pendulum-v1."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from aaren_rl.cli import main
from aaren_rl.data import load_dataset
from aaren_rl.data import collect as collect_module
from aaren_rl.data import writers
from aaren_rl.data.collect import TIERS, CollectConfig, collect
from aaren_rl.data.recording import RawEpisode

TINY = dict(env_id="Pendulum-v1", name="tiny", steps=512, n_envs=2, checkpoints=4,
            checkpoint_eval_episodes=1, episodes=2, ref_episodes=2, rollout_envs=2,
            hyperparameters={"n_steps": 64, "batch_size": 64, "n_epochs": 1},
            check_references=False)  # a 512-step learner need not beat random


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # tiny MLPs: more threads only add overhead (and oversubscribe a busy 2-core machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    monkeypatch.chdir(tmp_path)  # MuJoCo/minari side files stay in tmp
    return root


def test_tiny_collection_writes_every_tier_as_minari_and_hdf5(tmp_path, minari_root):
    cfg = CollectConfig(out_dir=str(tmp_path / "out"), hdf5=True, results_dir=str(tmp_path / "results"),
                        d4rl_ref_min=-1500.0, d4rl_ref_max=-100.0, **TINY)
    report = collect(cfg)
    folder = tmp_path / "out" / "tiny"
    on_disk = json.loads((folder / "report.json").read_text())
    short = json.loads((tmp_path / "results" / "data_tiny.json").read_text())
    assert short["env_id"] == "Pendulum-v1" and short["d4rl_ref_max"] == -100.0
    assert short["ref_min_score"] == report["ref_min_score"] and short["steps"] == report["trained_steps"]
    assert set(short["tiers"]) == set(TIERS) and {"learner", "settings", "machine", "train_seconds"} <= set(short)
    for tier, t in short["tiers"].items():
        assert (t["episodes"], t["steps"]) == (report["tiers"][tier]["episodes"], report["tiers"][tier]["steps"])
        assert t["d4rl_normalized"] == pytest.approx(100 * (t["return_mean"] + 1500) / 1400)
    import h5py

    with h5py.File(folder / "medium.hdf5") as f:  # D4RL's dtypes, compressed
        assert f["observations"].dtype == np.float32 and f["observations"].compression == "gzip"
        assert f["rewards"].dtype == np.float32 and f["terminals"].dtype == bool
    assert on_disk["status"] == "complete" and set(on_disk["tiers"]) == set(TIERS)
    assert (folder / "policies" / "expert.zip").is_file() and (folder / "policies" / "medium.zip").is_file()
    for tier in TIERS:
        entry = report["tiers"][tier]
        for source in (entry["dataset_id"], folder / f"{tier}.hdf5"):
            ds = load_dataset(source)
            assert ds.env_id == "Pendulum-v1" and (ds.num_episodes, ds.num_steps) == (entry["episodes"], entry["steps"])
            assert ds.ref_min_score == pytest.approx(report["ref_min_score"])
            assert ds.ref_max_score == pytest.approx(report["ref_max_score"])
            assert ds.return_mean == pytest.approx(entry["return_mean"], rel=1e-4)
    assert report["tiers"]["random"]["episodes"] == 2 and report["tiers"]["medium-expert"]["episodes"] == 4
    # medium-replay is what the learner saw up to the medium checkpoint: exactly that many steps
    assert report["tiers"]["medium-replay"]["steps"] == report["medium"]["step"]
    assert report["train_seconds"] > 0
    # expert = "best": the best-evaluated of the checkpoints and the final policy; medium comes before it
    evals = report["checkpoints"] + [report["final_eval"]]
    assert report["expert"]["eval_return_mean"] == max(e["return_mean"] for e in evals)
    if any(e["step"] < report["expert"]["step"] for e in evals):
        assert report["medium"]["step"] < report["expert"]["step"]


def test_collection_is_reproducible(tmp_path):
    kwargs = dict(TINY, steps=256, tiers=("random", "medium-replay"))
    a = collect(CollectConfig(out_dir=str(tmp_path / "a"), dataset_ids={t: f"ra/{t}-v0" for t in TIERS}, **kwargs))
    b = collect(CollectConfig(out_dir=str(tmp_path / "b"), dataset_ids={t: f"rb/{t}-v0" for t in TIERS}, **kwargs))
    for tier in ("random", "medium-replay"):
        ea, eb = load_dataset(f"ra/{tier}-v0").episodes, load_dataset(f"rb/{tier}-v0").episodes
        assert len(ea) == len(eb)
        for x, y in zip(ea, eb):
            np.testing.assert_array_equal(x.observations, y.observations)
            np.testing.assert_array_equal(x.actions, y.actions)


def test_interrupted_collection_leaves_no_complete_looking_dataset_and_continues(tmp_path, minari_root,
                                                                              monkeypatch):
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if stopped half-way through writing the second tier
        return real_stage(*args, **kwargs)

    real_stage = writers.stage_minari
    monkeypatch.setattr(collect_module, "stage_minari", fail_on_second)
    cfg = CollectConfig(out_dir=str(tmp_path / "out"), hdf5=True, **TINY)
    with pytest.raises(KeyboardInterrupt):
        collect(cfg)
    folder = tmp_path / "out" / "tiny"
    assert json.loads((folder / "report.json").read_text())["status"] == "running"
    for tier in TIERS:  # tiers are published together at the end: none before the stop
        assert not (minari_root / cfg.dataset_id(tier)).exists()
        assert not (folder / f"{tier}.hdf5").exists()
    assert not list(minari_root.glob(".staging-*")) and not list(folder.glob("*.partial"))

    monkeypatch.setattr(collect_module, "stage_minari", real_stage)
    report = collect(cfg)  # no --force needed: it continues the unfinished run
    assert report["status"] == "complete" and len(report["sessions"]) == 1  # not trained again
    assert all(load_dataset(cfg.dataset_id(t)).num_episodes == report["tiers"][t]["episodes"] for t in TIERS)


def test_run_stopped_while_publishing_is_finished_without_force(tmp_path, minari_root, monkeypatch):
    cfg = CollectConfig(out_dir=str(tmp_path / "out"), **dict(TINY, tiers=("random", "expert")))
    real_publish = writers.publish_minari

    def publish_one_then_stop(dataset_id, staging):
        real_publish(dataset_id, staging)
        raise KeyboardInterrupt

    monkeypatch.setattr(collect_module, "publish_minari", publish_one_then_stop)
    with pytest.raises(KeyboardInterrupt):
        collect(cfg)
    assert (minari_root / cfg.dataset_id("random")).exists()
    assert json.loads((cfg.folder / "report.json").read_text())["status"] == "publishing"
    monkeypatch.setattr(collect_module, "publish_minari", real_publish)
    assert collect(cfg)["status"] == "complete"


def test_finished_collection_is_not_redone(tmp_path, capsys):
    args = ["collect", "--env", "Pendulum-v1", "--tiers", "random", "--steps", "128", "--episodes",
            "1", "--ref-episodes", "1", "--out", str(tmp_path / "out")]
    cfg = CollectConfig(out_dir=str(tmp_path / "out"), name="pendulum",
                        **{k: v for k, v in TINY.items() if k != "name"}, tiers=("random",))
    first = collect(cfg)
    assert collect(cfg)["skipped"] and collect(cfg)["total_seconds"] == first["total_seconds"]
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out


def test_references_no_better_than_random_are_refused(tmp_path, minari_root, monkeypatch, capsys):
    real_evaluate = collect_module._evaluate

    def worse_expert(cfg, policy, episodes, seed, desc=None):
        eps = real_evaluate(cfg, policy, episodes, seed, desc)
        if desc and desc.startswith("ref_max"):  # an expert far below the random policy
            eps = [RawEpisode(e.observations, e.actions, e.rewards - 100, e.terminated, e.truncated)
                   for e in eps]
        return eps

    monkeypatch.setattr(collect_module, "_evaluate", worse_expert)
    cfg = CollectConfig(out_dir=str(tmp_path / "out"), **dict(TINY, check_references=True))
    with pytest.raises(collect_module.CollectError, match="no better than the random policy"):
        collect(cfg)
    assert not any((minari_root / cfg.dataset_id(t)).exists() for t in TIERS)
    assert json.loads((cfg.folder / "report.json").read_text())["status"].startswith("failed")
    # the command line says so in one line, without a traceback
    with pytest.raises(SystemExit, match=r"^error: Pendulum-v1: the expert .* no better than the random"):
        main(["collect", "--env", "Pendulum-v1", "--tiers", "random", "--algorithm", "sac", "--steps",
              "128", "--episodes", "1", "--ref-episodes", "1", "--out", str(tmp_path / "cli")])


def test_stale_staging_folders_are_cleaned_on_the_next_start(tmp_path, minari_root):
    import os

    dead = 2**22 + 12345  # above Linux's largest pid (pid_max is at most 2**22): no such process
    stale = minari_root / f".staging-{dead}-abc" / "x"
    old_style = minari_root / ".staging-q1w2e3"
    live = minari_root / f".staging-{os.getpid()}-def"
    for d in (stale, old_style, live):
        d.mkdir(parents=True)
    cfg = CollectConfig(out_dir=str(tmp_path / "out"), **dict(TINY, tiers=("random",)))
    cfg.folder.mkdir(parents=True)
    (cfg.folder / "random.hdf5.partial").write_text("half")
    collect(cfg)
    assert not stale.parent.exists() and not old_style.exists()
    assert live.exists()  # a running writer's folder is left alone
    assert not (cfg.folder / "random.hdf5.partial").exists()


def test_killed_learner_resumes_from_its_saved_state(tmp_path, minari_root, monkeypatch):
    kwargs = dict(TINY, algorithm="sac", n_envs=1, steps=300, checkpoints=3, resume_every=100,
                  hyperparameters={"learning_starts": 50, "batch_size": 32, "buffer_size": 1000},
                  tiers=("medium-replay",))
    cfg = CollectConfig(out_dir=str(tmp_path / "out"), **kwargs)
    real_save = collect_module.LearnerState.save
    saves = []

    def save_then_die(self, *args):
        real_save(self, *args)
        saves.append(args[-1]["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # as if killed right after the second save

    monkeypatch.setattr(collect_module.LearnerState, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        collect(cfg)
    assert saves == [100, 200]
    monkeypatch.setattr(collect_module.LearnerState, "save", real_save)
    report = collect(cfg)
    assert report["resumed_from"] == 200 and report["trained_steps"] == 300
    assert [(s["from_step"], s["to_step"]) for s in report["sessions"]] == [(0, 200), (200, 300)]
    # the learner's experience is whole across the restart: medium-replay has every step up to medium
    assert report["tiers"]["medium-replay"]["steps"] == report["medium"]["step"]
    # other settings than the saved state's: it starts over, and says so
    other = CollectConfig(out_dir=str(tmp_path / "out"), **dict(kwargs, seed=1), force=True)
    assert collect(other)["resumed_from"] is None


def test_sbx_learner_through_the_same_interface(tmp_path):
    pytest.importorskip("sbx")
    cfg = CollectConfig(out_dir=str(tmp_path / "out"), **dict(
        TINY, library="sbx", algorithm="sac", n_envs=1, steps=200, checkpoints=2,
        hyperparameters={"learning_starts": 50, "batch_size": 32}, tiers=("random", "expert")))
    report = collect(cfg)
    assert report["status"] == "complete" and report["config"]["library"] == "sbx"
    assert report["tiers"]["expert"]["episodes"] == 2


def test_unknown_learner_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown algorithm 'dqn2'"):
        main(["collect", "--env", "Pendulum-v1", "--algorithm", "dqn2", "--out", str(tmp_path)])
    assert not (tmp_path / "pendulum").exists()


def test_writers_leave_nothing_when_interrupted_mid_write(tmp_path, minari_root, monkeypatch):
    ep = RawEpisode(np.zeros((4, 3)), np.zeros((3, 1), np.float32), np.ones(3), True, False)
    import minari

    def create_then_fail(dataset_id, *args, **kwargs):
        real_create(dataset_id, *args, **kwargs)  # a complete-looking dataset in the staging folder
        raise KeyboardInterrupt

    real_create = minari.create_dataset_from_buffers
    monkeypatch.setattr(minari, "create_dataset_from_buffers", create_then_fail)
    with pytest.raises(KeyboardInterrupt):
        writers.write_minari("t/pendulum/x-v0", [ep], "Pendulum-v1", ref_min_score=0, ref_max_score=1)
    assert not (minari_root / "t/pendulum/x-v0").exists() and not list(minari_root.glob(".staging-*"))

    monkeypatch.setattr(np, "concatenate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        writers.write_hdf5(tmp_path / "x.hdf5", [ep], "Pendulum-v1")
    assert not list(tmp_path.glob("x.hdf5*"))


def test_existing_datasets_are_kept_unless_forced(tmp_path):
    ep = RawEpisode(np.zeros((4, 3)), np.zeros((3, 1), np.float32), np.ones(3), True, False)
    writers.write_minari("t/pendulum/random-v0", [ep], "Pendulum-v1", ref_min_score=0, ref_max_score=1)
    cfg = CollectConfig(out_dir=str(tmp_path), dataset_ids={"random": "t/pendulum/random-v0"},
                        **dict(TINY, tiers=("random",)))
    with pytest.raises(collect_module.CollectError, match="t/pendulum/random-v0.*--force"):
        collect(cfg)  # refused before any training
    assert not (tmp_path / "tiny" / "policies").exists()
    writers.write_minari("t/pendulum/random-v0", [ep, ep], "Pendulum-v1", ref_min_score=0, ref_max_score=1, force=True)
    assert load_dataset("t/pendulum/random-v0").num_episodes == 2


def test_cli_collect_with_a_preset_file(tmp_path, capsys):
    preset = tmp_path / "tinypend.toml"
    preset.write_text(
        'env_id = "Pendulum-v1"\n[datasets]\nrandom = "cli/pendulum/random-v0"\nexpert = "cli/pendulum/expert-v0"\n'
        "[collect]\nn_envs = 2\ncheckpoints = 2\ncheckpoint_eval_episodes = 1\nrollout_envs = 2\n"
        "check_references = false\n"
        "[collect.hyperparameters]\nn_steps = 64\nbatch_size = 64\nn_epochs = 1\n"
    )
    assert main(["collect", "--env", str(preset), "--tiers", "random", "expert", "--steps", "256",
                 "--episodes", "2", "--ref-episodes", "2", "--out", str(tmp_path / "out"), "--hdf5"]) == 0
    assert "cli/pendulum/expert-v0" in capsys.readouterr().out
    assert load_dataset("cli/pendulum/expert-v0").num_episodes == 2
    assert load_dataset(tmp_path / "out" / "tinypend" / "random.hdf5").num_episodes == 2


def test_cli_rejects_unknown_env_and_tier(tmp_path):
    with pytest.raises(SystemExit, match="NoSuchEnv-v0"):
        main(["collect", "--env", "NoSuchEnv-v0", "--out", str(tmp_path)])
    with pytest.raises((SystemExit, ValueError), match="unknown tier"):
        main(["collect", "--env", "Pendulum-v1", "--tiers", "mediocre", "--out", str(tmp_path)])


def test_replay_buffer_rebuilt_from_the_recording_is_the_learners_own(tmp_path):
    from stable_baselines3 import SAC
    from stable_baselines3.common.env_util import make_vec_env

    from aaren_rl.data.recording import RecordingVecEnv

    env = RecordingVecEnv(make_vec_env("Pendulum-v1", n_envs=1, seed=0))
    model = SAC("MlpPolicy", env, learning_starts=50, batch_size=32, buffer_size=300, seed=0, device="cpu")
    model.learn(450)  # more than the buffer holds: it wrapped around
    collect_module.save_episodes(tmp_path / "rec.npz", env.snapshot())
    restored = collect_module.load_episodes(tmp_path / "rec.npz")
    assert restored["num_steps"] == 450 and sum(len(e) for e in restored["episodes"]) == 450
    fresh = SAC("MlpPolicy", env, buffer_size=300, seed=1, device="cpu")
    collect_module.refill_replay_buffer(fresh, restored["episodes"])
    a, b = model.replay_buffer, fresh.replay_buffer
    assert (a.pos, a.full) == (b.pos, b.full) == (150, True)
    for key in ("observations", "next_observations", "actions", "rewards"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-6, atol=1e-6)  # float32 copy
    last = (a.pos - 1) % 300  # the episode still running at the snapshot is cut there (a time-out)
    keep = np.arange(300) != last
    np.testing.assert_array_equal(a.dones[keep], b.dones[keep])
    np.testing.assert_array_equal(a.timeouts[keep], b.timeouts[keep])
    assert b.dones[last] and b.timeouts[last]


def test_locomotion_suite_presets_are_complete():
    import argparse

    from aaren_rl.cli.collect import SUITES, add_arguments, config_for

    assert SUITES["locomotion"] == ["hopper", "halfcheetah", "walker2d", "ant"]
    p = argparse.ArgumentParser()
    add_arguments(p)
    for name in SUITES["locomotion"]:
        cfg = config_for(name, p.parse_args(["--suite", "locomotion"]))
        assert cfg.env_id.endswith("-v5") and set(cfg.dataset_ids) == set(TIERS)
        assert cfg.d4rl_ref_min is not None and cfg.d4rl_ref_max > cfg.d4rl_ref_min
        assert cfg.algorithm in collect_module.LIBRARIES[cfg.library][1]
        assert cfg.resume_every > 0 and cfg.tier_steps >= 200_000 and not cfg.deterministic
    assert config_for("ant", p.parse_args(["--suite", "locomotion"])).d4rl_ref_max == 3879.7


def test_ant_without_contact_forces_is_ant_v5_observing_27_numbers():
    """The Ant preset's env id registers itself on import (gym.make and the CLI's checks accept it)
    and is Ant-v5 with the contact forces left out of the observation: the same reset state, the
    same rewards and terminations under the same actions, the first 27 numbers of Ant-v5's
    observation."""
    import gymnasium as gym

    from aaren_rl.data.dataset import env_spec

    ant_id = "aaren_rl.locomotion:AntNoContact-v5"
    assert env_spec(ant_id).max_episode_steps == 1000
    a, b = gym.make(ant_id), gym.make("Ant-v5")
    oa, _ = a.reset(seed=7)
    ob, _ = b.reset(seed=7)
    assert oa.shape == (27,) and ob.shape == (105,)
    np.testing.assert_array_equal(oa, ob[:27])
    rng = np.random.default_rng(0)
    for _ in range(50):
        act = rng.uniform(-1, 1, size=8)
        x, y = a.step(act), b.step(act)
        np.testing.assert_array_equal(x[0], y[0][:27])
        assert x[1:4] == y[1:4]  # reward, terminated, truncated
    a.close(), b.close()


def test_presets_references_match_the_committed_data_reports():
    """An env preset's ref_min / ref_max are what scores are normalized with (``aaren-rl sweep``
    passes them to every run): they must be the references of the data committed for it."""
    from pathlib import Path

    from aaren_rl.cli.presets import resolve_env

    reports = sorted((Path(__file__).parents[1] / "benchmarks" / "results").glob("data_*.json"))
    assert reports, "no committed data report"
    for path in reports:
        report = json.loads(path.read_text())
        env = resolve_env(path.stem.removeprefix("data_"))
        assert env["env_id"] == report["env_id"]
        assert env["ref_min"] == pytest.approx(report["ref_min_score"], abs=0.05), path.name
        assert env["ref_max"] == pytest.approx(report["ref_max_score"], abs=0.05), path.name


def _same_tiers(ids_a: dict, ids_b: dict) -> None:
    for tier in ids_a:
        ea, eb = load_dataset(ids_a[tier]).episodes, load_dataset(ids_b[tier]).episodes
        assert len(ea) == len(eb) > 0, tier
        for x, y in zip(ea, eb):
            np.testing.assert_array_equal(x.observations, y.observations)
            np.testing.assert_array_equal(x.actions, y.actions)
            np.testing.assert_array_equal(x.rewards, y.rewards)


def _pack_roundtrip(tmp_path, **kwargs):
    ids = lambda prefix: {t: f"{prefix}/{t}-v0" for t in TIERS}
    cfg = CollectConfig(out_dir=str(tmp_path / "out"), dataset_ids=ids("orig"), **kwargs)
    report = collect(cfg)
    pack = collect_module.write_pack(cfg.folder, tmp_path / "packs" / cfg.name)
    assert not (tmp_path / "packs" / f"{cfg.name}.partial").exists()
    rebuilt_cfg = CollectConfig(out_dir=str(tmp_path / "again"), dataset_ids=ids("again"),
                                from_pack=str(pack), **kwargs)
    rebuilt = collect(rebuilt_cfg)
    assert rebuilt["from_pack"] == str(pack) and not (rebuilt_cfg.folder / "policies").exists()
    for key in ("ref_min_score", "ref_max_score", "medium", "expert", "trained_steps", "sessions"):
        assert rebuilt[key] == report[key], key
    for tier in TIERS:
        assert {k: v for k, v in rebuilt["tiers"][tier].items() if k not in ("dataset_id", "rollout_seconds")} \
            == {k: v for k, v in report["tiers"][tier].items() if k not in ("dataset_id", "rollout_seconds")}
    _same_tiers(ids("orig"), ids("again"))
    return cfg, pack


def test_a_pack_rebuilds_the_same_tiers_without_training(tmp_path, monkeypatch):
    cfg, pack = _pack_roundtrip(tmp_path, **TINY)
    assert sorted(p.name for p in pack.iterdir()) == ["expert.zip", "medium.zip", "medium_replay.npz", "pack.json"]
    # no learner is trained from a pack
    monkeypatch.setattr(collect_module, "train_learner", lambda *a, **k: pytest.fail("trained"))
    again = CollectConfig(out_dir=str(tmp_path / "third"), dataset_ids={t: f"third/{t}-v0" for t in TIERS},
                          from_pack=str(pack), **TINY)
    assert collect(again)["status"] == "complete"
    # a pack of other learner settings is refused, naming what differs
    with pytest.raises(collect_module.CollectError, match="seed"):
        collect(CollectConfig(out_dir=str(tmp_path / "fourth"), from_pack=str(pack), **dict(TINY, seed=3)))


def test_sbx_pack_keeps_only_the_actors_and_rebuilds_the_same_tiers(tmp_path):
    pytest.importorskip("sbx")
    kwargs = dict(TINY, library="sbx", algorithm="tqc", n_envs=1, steps=300, checkpoints=3,
                  hyperparameters={"learning_starts": 50, "batch_size": 32})
    cfg, pack = _pack_roundtrip(tmp_path, **kwargs)
    names = sorted(p.name for p in pack.iterdir())
    assert names == ["expert_actor.msgpack", "expert_key.npy", "medium_actor.msgpack", "medium_key.npy",
                     "medium_replay.npz", "pack.json"]
    saved = (cfg.folder / "policies" / "medium.zip").stat().st_size
    assert (pack / "medium_actor.msgpack").stat().st_size < saved / 3
    # one training env: the medium-replay experience is kept as actions only, and made again by
    # replaying them (the round trip above built the same tiers from it)
    with np.load(pack / "medium_replay.npz") as z:
        assert "observations" not in z and "rewards" not in z and int(z["replay_seed"]) == cfg.seed
    with pytest.raises(collect_module.CollectError, match="env id"):
        collect_module.load_episodes(pack / "medium_replay.npz")


def test_replays_exactly_only_from_the_seed_that_recorded(tmp_path):
    env = gym.make("Pendulum-v1")
    rng, episodes = np.random.default_rng(0), []
    for i in range(3):
        obs, _ = env.reset(seed=7) if i == 0 else env.reset()
        xs, acts, rews = [obs], [], []
        for _ in range(20 + i):
            a = rng.uniform(-2, 2, size=1).astype(np.float32)
            obs, r, *_ = env.step(a)
            xs.append(obs), acts.append(a), rews.append(r)
        episodes.append(RawEpisode(np.asarray(xs), np.asarray(acts), np.asarray(rews), False, False, 0))
    assert collect_module.replays_exactly("Pendulum-v1", episodes, 7)
    assert not collect_module.replays_exactly("Pendulum-v1", episodes, 8)
    path = tmp_path / "eps.npz"
    collect_module.save_episodes(path, {"episodes": episodes, "num_steps": 63}, replay_seed=7)
    again = collect_module.load_episodes(path, "Pendulum-v1")
    assert again["num_steps"] == 63 and len(again["episodes"]) == 3
    for x, y in zip(again["episodes"], episodes):
        np.testing.assert_array_equal(x.observations, y.observations.astype(np.float32))
        np.testing.assert_array_equal(x.rewards, y.rewards.astype(np.float32).astype(np.float64))
        np.testing.assert_array_equal(x.actions, y.actions)


def test_cli_pack_and_from_pack(tmp_path, capsys):
    out, packs = tmp_path / "out", tmp_path / "packs"
    preset = tmp_path / "pendulum.toml"
    preset.write_text(
        'env_id = "Pendulum-v1"\n[datasets]\nrandom = "cli/pendulum/random-v0"\n'
        'medium-replay = "cli/pendulum/medium-replay-v0"\n'
        "[collect]\nn_envs = 2\ncheckpoints = 2\ncheckpoint_eval_episodes = 1\nrollout_envs = 2\n"
        "check_references = false\n"
        "[collect.hyperparameters]\nn_steps = 64\nbatch_size = 64\nn_epochs = 1\n")
    args = ["collect", "--env", str(preset), "--tiers", "random", "medium-replay", "--steps", "256",
            "--episodes", "1", "--ref-episodes", "1", "--out", str(out)]
    assert main(args + ["--pack", str(packs)]) == 0
    assert (packs / "pendulum" / "pack.json").is_file() and "learner packed in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no pack for 'pendulum'"):
        main(args + ["--from-pack", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="exclude each other"):
        main(args + ["--from-pack", str(packs), "--pack", str(packs)])
    assert main(args + ["--from-pack", str(packs), "--out", str(tmp_path / "b"), "--force"]) == 0
    report = json.loads((tmp_path / "b" / "pendulum" / "report.json").read_text())
    assert report["status"] == "complete" and report["from_pack"] == str(packs / "pendulum")
    # nothing to pack where no collection finished: a clear error, no pack written
    with pytest.raises(collect_module.CollectError, match="no finished collection"):
        collect_module.write_pack(tmp_path / "empty", tmp_path / "p2")
    assert not (tmp_path / "p2").exists()


def test_slim_hdf5_loads_to_the_same_episodes_and_concatenates_medium_expert(tmp_path):
    import subprocess
    import sys

    import h5py

    from aaren_rl.data.writers import slim_hdf5

    cfg = CollectConfig(out_dir=str(tmp_path / "out"), hdf5=True, **TINY)
    collect(cfg)
    src = lambda tier: cfg.folder / f"{tier}.hdf5"
    slim = slim_hdf5(src("medium"), tmp_path / "carry" / "medium.hdf5")
    with h5py.File(slim) as f:
        assert "next_observations" not in f and f["observations"].compression_opts == 9
        assert f.attrs["tier"] == "medium"
    both = slim_hdf5([src("medium"), src("expert")], tmp_path / "carry" / "medium-expert.hdf5")
    for a, b in ((src("medium"), slim), (src("medium-expert"), both)):
        da, db = load_dataset(a), load_dataset(b)
        assert (da.num_episodes, da.num_steps, da.ref_max_score) == (db.num_episodes, db.num_steps, db.ref_max_score)
        for x, y in zip(da.episodes, db.episodes):
            np.testing.assert_array_equal(x.observations, y.observations)
            np.testing.assert_array_equal(x.actions, y.actions)
            assert (x.terminated, x.truncated) == (y.terminated, y.truncated)
    # files of different collections are not mixed; the script says so and writes nothing
    other = tmp_path / "other.hdf5"
    with h5py.File(src("random")) as f, h5py.File(other, "w") as g:
        for k in ("observations", "actions", "rewards", "terminals", "timeouts"):
            g[k] = f[k][()]
        g.attrs["env_id"], g.attrs["ref_max_score"] = "Pendulum-v1", 123.0
    script = [sys.executable, "scripts/slim_hdf5.py"]
    import aaren_rl

    root = Path(aaren_rl.__file__).parents[1]
    r = subprocess.run(script + [str(src("medium")), str(other), str(tmp_path / "x.hdf5")], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "only files of one collection" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.hdf5").exists() and not (tmp_path / "x.hdf5.partial").exists()
