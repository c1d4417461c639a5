"""Many runs as one group: a run trained in a group equals the same run trained alone; group run
folders are ordinary run folders (load, evaluate, resume alone or in a group); the commands."""

import json

import numpy as np
import pytest
import torch

from aaren_rl.checkpoint import load_checkpoint, load_trainer_state, resolve_checkpoint
from aaren_rl.cli import main
from aaren_rl.data import Episode, TrajectoryDataset
from aaren_rl.data.recording import RawEpisode
from aaren_rl.data.writers import write_hdf5
from aaren_rl.group import Run, RunGroup, check_group, train_group
from aaren_rl.train import TrainConfig, model_config_for, train


def uneven_dataset(seed=0, n=12, obs_dim=4, act_dim=2):
    """Episodes of 15 to 40 steps: windows run past episode ends and whole episodes are padded."""
    rng = np.random.default_rng(seed)
    eps = [Episode(observations=rng.normal(size=(T, obs_dim)).astype(np.float32),
                   actions=rng.uniform(-1, 1, size=(T, act_dim)).astype(np.float32),
                   rewards=rng.normal(1.0, 1.0, size=T).astype(np.float32), truncated=True)
           for T in rng.integers(15, 41, size=n)]
    return TrajectoryDataset(eps, action_low=-np.ones(act_dim), action_high=np.ones(act_dim), name=f"uneven{seed}")


def losses(logdir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return np.array([e.step for e in acc.Scalars(tag)]), np.array([e.value for e in acc.Scalars(tag)])


def config(seed, updates=30, **kw):
    kw = {"batch_size": 6, "log_every": 3, "warmup_steps": 10, "eval_every": 0, "eval_episodes": 0,
          "checkpoint_every": 10, "device": "cpu", "compile": "none", **kw}
    return TrainConfig(updates=updates, seed=seed, **kw)


def model_config(ds, backbone, context, dropout=0.1, **kw):
    return model_config_for(ds, backbone=backbone, context=context, context_len=8, n_layer=2, embed_dim=16,
                            n_head=2, dropout=dropout, **kw)


def group_and_solo_runs(tmp_path, mc, tags, **kw):
    """Three runs (two datasets, three optimizer settings, an active clip) trained as a group, and
    runs 1 and 2 trained alone: their logged ``tags`` agree within 1e-4 relative at every step."""
    a, b = uneven_dataset(0), uneven_dataset(1)
    runs = [Run(mc, config(0, learning_rate=1e-3, **kw), a, tmp_path / "g0"),
            Run(mc, config(1, learning_rate=3e-4, weight_decay=0.1, grad_clip=0.05, **kw), b, tmp_path / "g1"),
            Run(mc, config(2, learning_rate=1e-2, warmup_steps=1, **kw), a, tmp_path / "g2")]
    train_group(runs, progress=False)
    for r in (1, 2):
        run = runs[r]
        train(mc, run.config, run.dataset, tmp_path / f"solo{r}", progress=False)
        for tag in tags:
            steps_g, group = losses(run.logdir, tag)
            steps_s, solo = losses(tmp_path / f"solo{r}", tag)
            assert list(steps_g) == list(steps_s) == [3 * i for i in range(1, 11)]
            np.testing.assert_allclose(group, solo, rtol=1e-4, err_msg=tag)
    return runs


@pytest.mark.parametrize("backbone,context", [("aaren", "window"), ("transformer", "window"),
                                              pytest.param("aaren", "episode", marks=pytest.mark.slow),
                                              pytest.param("transformer", "episode", marks=pytest.mark.slow)])
def test_run_in_a_group_equals_the_run_alone(tmp_path, backbone, context):
    """Loss and gradient norm at every logged step within 1e-4 relative, dropout on, float32 CPU;
    the group mixes seeds, two datasets and three learning rates, and the clip is active."""
    # whole episodes: a group pads every run to one length, and dropout masks have that shape; a
    # run alone draws the same masks when it pads to the same length (as graphed runs do)
    fixed = {"max_episode_len": 40} if context == "episode" else {}
    runs = group_and_solo_runs(tmp_path, model_config(uneven_dataset(0), backbone, context),
                               ("train/loss", "train/grad_norm", "train/learning_rate"), **fixed)
    _, norms = losses(runs[1].logdir, "train/grad_norm")
    assert (norms > runs[1].config.grad_clip).all()  # the clip acted on every logged update
    _, l0 = losses(runs[0].logdir)
    _, l2 = losses(runs[2].logdir)
    assert np.abs(l0 / l2 - 1).max() > 1e-3  # the runs really differ


def test_a_recency_run_in_a_group_equals_the_run_alone(tmp_path):
    """``model.recency`` (a score decay per token) in the vmapped group's plain scan and in a run
    alone: the same losses and gradient norms."""
    group_and_solo_runs(tmp_path, model_config(uneven_dataset(0), "aaren", "window", recency=0.3),
                        ("train/loss", "train/grad_norm"))


def test_group_checkpoints_are_ordinary_run_folders(tmp_path):
    """load_checkpoint reads a group's run; train(resume=True) alone continues it exactly as the
    group would have; a group resumes too."""
    ds = uneven_dataset(0)
    mc = model_config(ds, "aaren", "window")
    runs = [Run(mc, config(s, updates=20, log_every=5), ds, tmp_path / f"s{s}") for s in (0, 1)]
    models = train_group(runs, progress=False)
    model, info = load_checkpoint(tmp_path / "s1")
    assert info["step"] == 20 and info["train"]["seed"] == 1
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, models[1].state_dict()[k])
    state = load_trainer_state(tmp_path / "s1")
    assert {"optimizer", "scheduler", "step", "torch_rng", "sampler_rng"} <= set(state)

    # a 10-update group continued alone, and continued as a group, equal the 20-update group
    for name in ("alone", "group"):
        short = [Run(mc, config(s, updates=10, log_every=5), ds, tmp_path / name / f"s{s}") for s in (0, 1)]
        train_group(short, progress=False)
        longer = [Run(mc, config(s, updates=20, log_every=5), ds, tmp_path / name / f"s{s}") for s in (0, 1)]
        if name == "alone":
            train(mc, longer[1].config, ds, longer[1].logdir, resume=True, progress=False)
        else:
            train_group(longer, resume=True, progress=False)
        steps, resumed = losses(longer[1].logdir)
        _, full = losses(tmp_path / "s1")
        assert list(steps) == [5, 10, 15, 20]
        np.testing.assert_allclose(resumed, full, rtol=1e-4, err_msg=name)


def test_a_solo_run_resumes_inside_a_group(tmp_path):
    ds = uneven_dataset(0)
    mc = model_config(ds, "transformer", "window")
    train(mc, config(3, updates=10, log_every=5), ds, tmp_path / "a", progress=False)
    # runs of one group resume from one step: a fresh run beside a resumed one is refused
    with pytest.raises(ValueError, match="same step"):
        train_group([Run(mc, config(3, updates=20, log_every=5), ds, tmp_path / "a"),
                     Run(mc, config(4, updates=20, log_every=5), ds, tmp_path / "b")], resume=True, progress=False)
    train_group([Run(mc, config(3, updates=20, log_every=5), ds, tmp_path / "a")], resume=True, progress=False)
    train(mc, config(3, updates=20, log_every=5), ds, tmp_path / "solo", progress=False)
    np.testing.assert_allclose(losses(tmp_path / "a")[1], losses(tmp_path / "solo")[1], rtol=1e-4)


def test_incompatible_runs_are_refused_with_the_differing_field(tmp_path):
    ds = uneven_dataset(0)
    mc = model_config(ds, "aaren", "window")
    wide = model_config_for(ds, backbone="aaren", context="window", context_len=8, n_layer=2, embed_dim=32, n_head=2)
    with pytest.raises(ValueError, match="model.embed_dim"):
        check_group([Run(mc, config(0), ds, tmp_path / "a"), Run(wide, config(1), ds, tmp_path / "b")])
    with pytest.raises(ValueError, match="train.batch_size"):
        check_group([Run(mc, config(0), ds, tmp_path / "a"), Run(mc, config(1, batch_size=3), ds, tmp_path / "b")])
    with pytest.raises(ValueError, match="share a run folder"):
        check_group([Run(mc, config(0), ds, tmp_path / "a"), Run(mc, config(1), ds, tmp_path / "a")])


def test_per_run_clipping_never_mixes_runs():
    """A clipped run next to one with larger, unclipped gradients updates exactly as it does alone
    (a clip over the whole group would scale both by one factor)."""
    ds = uneven_dataset(0)
    mc = model_config(ds, "aaren", "window", dropout=0.0)
    alone = RunGroup([Run(mc, config(0), ds, "x")], torch.device("cpu"))
    pair = RunGroup([Run(mc, config(0), ds, "x"), Run(mc, config(1, grad_clip=1e3), ds, "y")], torch.device("cpu"))
    with torch.no_grad():
        for k, p in pair.params.items():
            if k.startswith("predict_action"):
                p[1].mul_(20.0)  # run 1: larger gradients
    for _ in range(3):
        alone()
        pair()
        assert pair.grad_norm[0] > 0.25 and pair.grad_norm[1] > 3 * pair.grad_norm[0]  # run 0 clipped
    for k in alone.params:
        torch.testing.assert_close(pair.params[k][0], alone.params[k][0], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_a_compiled_group_equals_the_eager_group():
    """vmap under torch.compile (the CUDA default's first half), on the CPU: minutes to compile."""
    ds = uneven_dataset(0)
    mc = model_config(ds, "aaren", "window")
    groups = [RunGroup([Run(mc, config(s), ds, f"{mode}{s}") for s in (0, 1)], torch.device("cpu"), mode=mode)
              for mode in ("none", "torch.compile")]
    for _ in range(4):
        losses = [g() or g.pop_mean_loss() for g in groups]
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backbone,mode", [("aaren", "none"), ("transformer", "none"), ("aaren", "cudagraph")])
def test_run_in_a_group_equals_the_run_alone_on_cuda(tmp_path, backbone, mode):
    """The CPU test's claim on the GPU, float32 (no autocast). Dropout is off: on CUDA a solo run
    draws its masks from the device's global generator, a group run from its own (module docstring)."""
    group_and_solo_runs(tmp_path, model_config(uneven_dataset(0), backbone, "window", dropout=0.0),
                        ("train/loss", "train/grad_norm"), device="cuda", amp=False, compile=mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_recency_run_in_a_group_equals_the_run_alone_on_cuda(tmp_path):
    """On CUDA a run alone scans with the fused kernel (its float32 recency ramp), a group with
    the plain scan under vmap: the same losses."""
    group_and_solo_runs(tmp_path, model_config(uneven_dataset(0), "aaren", "window", dropout=0.0, recency=0.3),
                        ("train/loss", "train/grad_norm"), device="cuda", amp=False, compile="none")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_graphed_group_equals_the_eager_group_on_cuda():
    ds = uneven_dataset(0)
    mc = model_config(ds, "aaren", "window", dropout=0.0)
    dev = torch.device("cuda")
    eager = RunGroup([Run(mc, config(s, device="cuda"), ds, f"e{s}") for s in (0, 1)], dev, mode="none")
    graphed = RunGroup([Run(mc, config(s, device="cuda"), ds, f"g{s}") for s in (0, 1)], dev, mode="cudagraph")
    for _ in range(8):
        eager()
        graphed()
    np.testing.assert_allclose(graphed.pop_mean_loss(), eager.pop_mean_loss(), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# commands


@pytest.fixture(scope="module")
def pendulum_files(tmp_path_factory):
    """Two tiny Pendulum-shaped datasets of one environment."""
    out = []
    for i in range(2):
        rng = np.random.default_rng(i)
        episodes = [RawEpisode(observations=rng.normal(size=(31, 3)).astype(np.float32),
                               actions=rng.uniform(-2, 2, size=(30, 1)).astype(np.float32),
                               rewards=-rng.uniform(0, 16, size=30).astype(np.float32),
                               terminated=False, truncated=True) for _ in range(6)]
        path = tmp_path_factory.mktemp("data") / f"tier{i}.hdf5"
        out.append(write_hdf5(path, episodes, "Pendulum-v1", ref_min_score=-1200.0, ref_max_score=-150.0,
                              action_low=[-2.0], action_high=[2.0]))
    return out


TINY = ["model.embed_dim=16", "model.n_layer=1", "train.batch_size=4", "train.log_every=2", "train.warmup_steps=2"]


def test_train_seeds_writes_one_ordinary_folder_per_seed(tmp_path, pendulum_files, capsys):
    out = tmp_path / "da"
    assert main(["train", "--dataset", str(pendulum_files[0]), "--seeds", "0", "1", "--updates", "4",
                 "--eval-episodes", "1", "--logdir", str(out), "--no-progress", "--set", *TINY]) == 0
    text = capsys.readouterr().out
    assert text.count("final evaluation (1 episodes)") == 2
    for s in (0, 1):
        model, info = load_checkpoint(out / f"s{s}")
        assert info["train"]["seed"] == s and info["last_eval"]["episodes"] == 1
    assert main(["evaluate", str(out / "s1"), "--episodes", "1", "--json", str(tmp_path / "e.json")]) == 0
    with pytest.raises(SystemExit, match="not empty"):
        main(["train", "--dataset", str(pendulum_files[0]), "--seeds", "0", "1", "--logdir", str(out), "--no-progress"])

    many = tmp_path / "many"
    assert main(["train", "--dataset", *map(str, pendulum_files), "--updates", "2", "--eval-episodes", "0",
                 "--logdir", str(many), "--no-progress", "--set", *TINY]) == 0
    labels = sorted(f"{p.parent.name}-{p.stem}" for p in pendulum_files)  # DIR/DATASET/sSEED
    assert sorted(p.parent.name for p in many.glob("*/s0")) == labels
    assert load_checkpoint(many / labels[1] / "s0")[1]["group"]["runs"] == 2


def test_sweep_groups_runs_resumes_and_summarizes(tmp_path, pendulum_files, capsys):
    spec = tmp_path / "sweep.toml"
    spec.write_text(f"""
agents = ["decision_aaren", "decision_transformer"]
datasets = {json.dumps([str(p) for p in pendulum_files])}
seeds = [0, 1]
updates = 4
eval_episodes = 1
eval_workers = 1
window_recompute = true
out = "{tmp_path / 'sweep'}"
set = {json.dumps(TINY)}
""")
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    assert "8 runs; done 0, partial 0; 2 group(s)" in capsys.readouterr().out
    assert main(["sweep", str(spec), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(summary["runs"]) == 8 and all(r["status"] == "done" for r in summary["runs"])
    assert all(r["episodes"] == 1 and np.isfinite(r["normalized_score_mean"]) for r in summary["runs"])
    # window_recompute: Aaren runs are also evaluated by window recompute, transformer runs act so anyway
    aaren = [r for r in summary["runs"] if r["agent"] == "decision_aaren"]
    assert all(r["mode"] == "recurrent" and r["window_mode"] == "window" for r in aaren)
    assert all(np.isfinite(r["window_normalized_score_mean"]) for r in aaren)
    assert all("window_mode" not in r and r["mode"] == "window" for r in summary["runs"] if r not in aaren)
    import subprocess, sys
    table = subprocess.run([sys.executable, "scripts/suite_table.py", str(tmp_path / "sweep" / "sweep.json"),
                            "--json", str(tmp_path / "cells.json")], capture_output=True, text=True, check=True).stdout
    assert "DA window-trained, window recompute" in table and "± " in table
    cells = json.loads((tmp_path / "cells.json").read_text())["cells"]
    assert {c["column"] for c in cells} == {"DT, window", "DA window-trained, stream", "DA window-trained, window recompute"}
    assert all(c["seeds"] == [0, 1] and len(c["normalized"]) == 2 for c in cells)
    # the per-run JSONs (with loss curves from the run folders), the plots and the markdown block
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nprose kept\n")
    out = subprocess.run([sys.executable, "scripts/suite_table.py", str(tmp_path / "sweep" / "sweep.json"),
                          "--runs-dir", str(tmp_path / "suite"), "--plots", str(tmp_path / "plots"),
                          "--markdown", str(doc)], capture_output=True, text=True, check=True).stdout
    per_run = [json.loads(p.read_text()) for p in sorted((tmp_path / "suite").glob("*.json"))]
    assert len(per_run) == 12  # 4 DT runs, 4 Aaren runs acting two ways
    assert {(r["agent"], r["mode"]) for r in per_run} == {("decision_transformer", "window"),
                                                          ("decision_aaren", "recurrent"), ("decision_aaren", "window")}
    assert all(r["updates"] == 4 and r["episodes"] == 1 and r["loss_curve"] for r in per_run)
    assert "mean over 2 datasets" in out and "policy ms per step" in out
    assert len(list((tmp_path / "plots").glob("suite_*.png"))) == 2
    text = doc.read_text()
    assert text.startswith("# Results\n\nprose kept\n") and text.count("<!-- suite-table:begin -->") == 1
    again = subprocess.run([sys.executable, "scripts/suite_table.py", "--runs-dir", str(tmp_path / "suite"),
                            "--markdown", str(doc)], capture_output=True, text=True, check=True).stdout
    assert again.split("\n")[:20] == out.split("\n")[:20] and doc.read_text() == text  # rebuilt from the JSONs alone
    # a variant's runs (another preset name) become their own columns; --agents, --datasets and
    # --block pick the columns, the rows and a second block of the same file
    for f in list((tmp_path / "suite").glob("*decision_aaren_recurrent*.json")):
        r = json.loads(f.read_text())
        r["agent"] = "decision_aaren_recency-0.1"
        (tmp_path / "suite" / f.name.replace("decision_aaren_", "decision_aaren_recency-0.1_")).write_text(json.dumps(r))
    datasets = sorted({r["dataset"] for r in per_run})
    variant = subprocess.run([sys.executable, "scripts/suite_table.py", "--runs-dir", str(tmp_path / "suite"),
                              "--agents", "decision_transformer", "decision_aaren_recency-0.1", "--datasets",
                              datasets[0], "--block", "variant", "--markdown", str(doc)],
                             capture_output=True, text=True, check=True).stdout
    header = next(line for line in variant.split("\n") if line.startswith("| dataset"))
    assert header.startswith("| dataset | DT, window | decision_aaren_recency-0.1, stream |")
    assert "DA window-trained" not in variant and datasets[0] in variant and datasets[1] not in variant
    text2 = doc.read_text()
    assert text2.startswith(text) and text2.count("<!-- suite-table:variant:begin -->") == 1
    typo = subprocess.run([sys.executable, "scripts/suite_table.py", "--runs-dir", str(tmp_path / "suite"),
                           "--agents", "decision_aaren_recency-1.0"], capture_output=True, text=True)
    assert typo.returncode != 0 and "Traceback" not in typo.stderr
    assert "no run of agent decision_aaren_recency-1.0; the runs have decision_aaren, " in typo.stderr
    folder = next((tmp_path / "sweep" / "decision_transformer").glob("*tier1/s1"))
    model, info = load_checkpoint(folder)
    assert model.config.backbone == "transformer" and info["group"]["runs"] == 4
    capsys.readouterr()
    assert main(["sweep", str(spec), "--no-progress"]) == 0  # all done: nothing to train
    assert "done 8, partial 0; 0 group(s)" in capsys.readouterr().out

    spec.write_text(spec.read_text().replace("updates = 4", "updates = 6"))  # more updates: every run resumes
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    assert "from update 4" in capsys.readouterr().out


def test_one_sweep_mixes_environments_named_by_their_data_folders(tmp_path, capsys):
    """collect's DATA/PRESET/TIER.hdf5 files name their env preset: HalfCheetah and Walker2d (both
    17 observations, 6 actions) train as one group, each run with its own env, references and target."""
    from aaren_rl.cli.presets import resolve_env
    from argparse import Namespace

    from aaren_rl.cli.sweep import _train_args, env_preset_of, load_runs, plan_groups

    rng = np.random.default_rng(0)
    files = []
    for preset, env_id in (("halfcheetah", "HalfCheetah-v5"), ("walker2d", "Walker2d-v5")):
        episodes = [RawEpisode(observations=rng.normal(size=(21, 17)).astype(np.float32),
                               actions=rng.uniform(-1, 1, size=(20, 6)).astype(np.float32),
                               rewards=rng.normal(size=20).astype(np.float32), terminated=False, truncated=True)
                    for _ in range(3)]
        files.append(write_hdf5(tmp_path / "data" / preset / "medium.hdf5", episodes, env_id,
                                action_low=[-1.0] * 6, action_high=[1.0] * 6))
    assert [env_preset_of(str(f)) for f in files] == ["halfcheetah", "walker2d"]
    assert env_preset_of("walker2d/medium") == "walker2d" and env_preset_of(str(tmp_path / "x" / "m.hdf5")) is None
    train_args = _train_args(Namespace(), set=TINY, updates=4, device="cpu", eval_episodes=1, eval_every=0)
    runs = load_runs([("decision_aaren", str(f)) for f in files], [0, 1], train_args, None,
                     lambda a, s, seed: tmp_path / "out" / s.replace("/", "_") / f"s{seed}", progress=False)
    for run, preset in zip(runs, ["halfcheetah"] * 2 + ["walker2d"] * 2):
        env = resolve_env(preset)
        assert run.config.env_id == env["env_id"] and run.config.target_return == env["target_returns"][0]
        assert run.dataset.ref_max_score == pytest.approx(env["ref_max"])
    assert [len(members) for _, members in plan_groups(runs, 64)] == [4]


def test_sweep_trains_segment_runs_one_at_a_time(tmp_path, pendulum_files, capsys):
    out = tmp_path / "seg"
    assert main(["sweep", "--agents", "decision_aaren_segment", "--datasets", str(pendulum_files[0]), "--seeds", "0", "1",
                 "--updates", "3", "--eval-episodes", "1", "--eval-workers", "1", "--out", str(out), "--no-progress",
                 "--set", *TINY]) == 0
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in rows] == ["done", "done"] and all(r["mode"] == "recurrent" for r in rows)
    with pytest.raises(ValueError, match="does not train in groups"):
        check_group([Run(model_config_for(uneven_dataset(0), context="segment"), config(0), uneven_dataset(0), "a")])


def test_sweep_spec_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("agents = ['decision_aaren']\nwhatever = 1\n")
    with pytest.raises(SystemExit, match="unknown key"):
        main(["sweep", str(bad)])
    with pytest.raises(SystemExit, match="needs datasets"):
        main(["sweep", "--agents", "decision_aaren"])
    with pytest.raises(SystemExit, match="not found"):
        main(["sweep", str(tmp_path / "missing.toml")])


def test_bench_sweep_writes_its_table_and_json(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert main(["bench", "sweep", "--device", "cpu", "--agents", "decision_aaren/window", "--runs", "1", "2",
                 "--updates", "1", "--rounds", "1", "--embed-dim", "16", "--n-layer", "1", "--batch", "4",
                 "--formulation-runs", "2", "--formulation-tokens", "64", "--json", str(out)]) == 0
    assert "aggregate run-updates/s" in capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = [r for r in res["groups"] if r["status"] == "ok"]
    assert [r["runs_per_group"] for r in rows] == [1, 1, 2]  # the solo row, then the groups
    assert all(r["aggregate_updates_per_s"] > 0 for r in rows)
    assert all(r["peak_mem_mb"] is not None and r["vs_solo"] > 0 for r in rows[1:])
    assert rows[2]["state_mb"] == pytest.approx(2 * rows[1]["state_mb"])
    assert {r["formulation"] for r in res["formulation"]} >= {"vmap(functional_call)"}
    assert all(r["max_abs_diff_vmap_vs_bmm"] < 1e-4 for r in res["formulation"])


def test_a_dead_evaluation_worker_is_a_clear_error_that_says_how_to_go_on():
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    from aaren_rl.group import evaluation_result

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        ok = pool.submit(abs, -3)
        assert evaluation_result(ok, "runs/x/s0") == 3
        dead = pool.submit(os._exit, 1)  # the worker dies mid-job, as one killed or unable to import does
        with pytest.raises(SystemExit, match=r"evaluation worker process died while evaluating runs/x/s1 .*"
                                             r"checkpoints are saved: run the sweep again"):
            evaluation_result(dead, "runs/x/s1", "run the sweep again")
