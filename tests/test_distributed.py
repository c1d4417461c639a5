"""Data-parallel training: two gloo processes on the CPU, started by torchrun as a user would.

The run finishes, writes one run folder (rank 0's), and its first update is the update a single
process makes on the same global batch (the two ranks' batches together); resuming with as many
ranks restores every rank's streams, so a resumed run ends where the straight one does.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aaren_rl import distributed
from aaren_rl.data import load_dataset
from aaren_rl.data.recording import RawEpisode
from aaren_rl.data.sampling import Batch
from aaren_rl.data.writers import write_hdf5
from aaren_rl.train import TrainConfig, make_update_step, model_config_for

MODEL = dict(backbone="aaren", context="window", context_len=8, embed_dim=16, n_layer=1, n_head=1, dropout=0.0)
TRAIN = dict(batch_size=6, learning_rate=1e-3, warmup_steps=2, seed=3)


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    # episodes of uneven length: windows near an episode's end are padded, so the ranks' batches
    # hold different numbers of real steps (what the loss weighting is for)
    episodes = [RawEpisode(observations=rng.normal(size=(n + 1, 3)).astype(np.float32),
                           actions=rng.uniform(-2, 2, size=(n, 1)).astype(np.float32),
                           rewards=-rng.uniform(0, 16, size=n).astype(np.float32),
                           terminated=False, truncated=True) for n in (9, 20, 5, 14)]
    path = tmp_path_factory.mktemp("data") / "pendulum-tiny.hdf5"
    return write_hdf5(path, episodes, "Pendulum-v1", ref_min_score=-1200.0, ref_max_score=-150.0,
                      action_low=[-2.0], action_high=[2.0])


def torchrun_train(dataset, logdir, updates, *extra):
    sets = [f"model.{k}={v}" for k, v in MODEL.items() if k != "backbone"]
    sets += [f"train.{k}={v}" for k, v in TRAIN.items() if k != "seed"] + ["train.log_every=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "aaren_rl",
           "train", "--agent", "decision_aaren", "--dataset", str(dataset), "--device", "cpu",
           "--updates", str(updates), "--seed", str(TRAIN["seed"]), "--eval-every", "0", "--eval-episodes", "1",
           "--checkpoint-every", "1", "--threads", "1", "--logdir", str(logdir), "--no-progress", "--set", *sets,
           *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def single_process_first_update(dataset_file):
    """One update of one process on the batch the two ranks draw together."""
    ds = load_dataset(dataset_file)
    mc = model_config_for(ds, **MODEL)
    update = make_update_step(mc, TrainConfig(**TRAIN, amp=False), ds, "cpu")  # global batch 6, one rank
    per_rank = TRAIN["batch_size"] // 2
    batches = [ds.sample_windows(per_rank, MODEL["context_len"], torch.Generator().manual_seed(
        distributed.rank_seed(TRAIN["seed"], r, 2))) for r in range(2)]
    assert not torch.equal(batches[0].observations, batches[1].observations)  # streams of their own
    real = [int((~b.padding_mask).sum()) for b in batches]
    assert real[0] != real[1]  # uneven padding: a plain mean over ranks would weight steps unequally
    cat = lambda k: None if getattr(batches[0], k) is None else torch.cat([getattr(b, k) for b in batches])
    joined = Batch(**{k: cat(k) for k in vars(batches[0])})  # episode_ids: None (not packed)
    update.sample_batch = lambda: joined
    update()
    return update.model.state_dict(), update.pop_mean_loss()


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, dataset_file):
    runs = tmp_path_factory.mktemp("runs")
    return runs, torchrun_train(dataset_file, runs / "dp", 3)


def test_two_gloo_ranks_train_one_run_whose_first_update_is_the_global_batch_update(dp_run, dataset_file):
    runs, out = dp_run
    assert "data parallel: 2 ranks, global batch 6 (3 per rank)" in out
    assert out.count("final evaluation (1 episodes)") == 1  # rank 0 alone evaluates and reports
    assert [p.name for p in runs.iterdir()] == ["dp"]
    run = runs / "dp"
    writers = {p.name.split(".")[-2] for p in run.glob("events.out.tfevents.*")}  # the writing process ids
    assert len(writers) == 1  # rank 0's alone (its add_hparams opens a second file)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000001", "step_0000002", "step_0000003"]

    weights, loss = single_process_first_update(dataset_file)
    ddp = load_file(ckpts / "step_0000001" / "model.safetensors")
    assert ddp.keys() == weights.keys()
    # float32 sums in another order (gloo's all-reduce); one AdamW step moves a weight by ~lr/warmup = 5e-4
    for k in weights:
        torch.testing.assert_close(ddp[k], weights[k], rtol=1e-5, atol=1e-6, msg=k)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    first = acc.Scalars("train/loss")[0]
    assert first.step == 1 and first.value == pytest.approx(loss, rel=1e-5)  # the global batch's loss


@pytest.mark.slow
def test_resuming_with_as_many_ranks_ends_where_the_straight_run_does(dp_run, dataset_file, tmp_path):
    """Every rank's streams are restored from the checkpoint (``rank_rngs``)."""
    run = dp_run[0] / "dp"
    ckpts = run / "checkpoints"
    again = tmp_path / "again"
    shutil.copytree(run, again)
    for name in ("step_0000002", "step_0000003"):
        shutil.rmtree(again / "checkpoints" / name)
    (again / "checkpoints" / "latest").write_text("step_0000001")
    torchrun_train(dataset_file, again, 3, "--resume", "--eval-episodes", "0")
    straight = load_file(ckpts / "step_0000003" / "model.safetensors")
    resumed = load_file(again / "checkpoints" / "step_0000003" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_data_parallel_settings_fail_clearly(monkeypatch):
    with pytest.raises(ValueError, match="needs one GPU per rank"):
        distributed.device_for("cuda", 1, 2) if torch.cuda.device_count() < 2 else (_ for _ in ()).throw(
            ValueError("needs one GPU per rank"))
    with pytest.raises(ValueError, match="each rank takes the GPU of its local rank"):
        distributed.device_for("cuda:1", 0, 2)
    assert distributed.device_for("cpu", 1, 2) == torch.device("cpu")
    from aaren_rl.train import resolve_compile_data_parallel

    assert resolve_compile_data_parallel("auto") == "none"
    with pytest.raises(ValueError, match="not supported in data-parallel training"):
        resolve_compile_data_parallel("torch.compile+cudagraph")
    # the global batch must split evenly
    ranks = distributed.Ranks(rank=0, world_size=4)
    ds = None
    with pytest.raises(ValueError, match="must be divisible by the 4 ranks"):
        make_update_step(None, TrainConfig(batch_size=6), ds, "cpu", ranks=ranks)
    assert distributed.rank_seed(5, 0, 1) == 5  # one process: the seed itself, as before
    seeds = {distributed.rank_seed(5, r, 2) for r in range(2)} | {distributed.rank_seed(5, r, 2, step=4) for r in range(2)}
    assert len(seeds) == 4
    monkeypatch.setenv("WORLD_SIZE", "two")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        distributed.launched_by_torchrun()


@pytest.mark.slow
def test_the_ddp_benchmark_times_one_and_two_gloo_processes(tmp_path):
    import json

    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "aaren_rl", "bench", "ddp", "--device", "cpu", "--nprocs", "1", "2",
           "--embed-dim", "16", "--n-layer", "1", "--n-head", "1", "--episodes", "6", "--episode-len", "20",
           "--batch", "4", "--warmup", "1", "--updates", "2", "--rounds", "1", "--threads", "1", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["nprocs"], r["batch_per_rank"], r["status"]) for r in rows] == [(1, 4, "ok"), (2, 2, "ok")]
    assert all(r["updates_per_s"] > 0 for r in rows) and "| processes |" in done.stdout


def test_a_sweep_under_torchrun_spreads_its_groups_over_the_processes(dataset_file, tmp_path):
    """Two processes (gloo on the CPU, as one process per GPU would run): the two agents' groups
    train one in each process, and rank 0 writes the summary of all runs."""
    out = tmp_path / "sweep"
    sets = ["model.embed_dim=16", "model.n_layer=1", "train.batch_size=4", "train.log_every=2", "train.warmup_steps=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "aaren_rl",
           "sweep", "--agents", "decision_aaren", "decision_transformer", "--datasets", str(dataset_file),
           "--seeds", "0", "1", "--updates", "3", "--eval-episodes", "1", "--eval-workers", "1", "--device", "cpu",
           "--threads", "1", "--out", str(out), "--no-progress", "--set", *sets]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "[rank 0] group 1/2" in res.stdout and "[rank 1] group 2/2" in res.stdout
    rows = __import__("json").loads((out / "sweep.json").read_text())["runs"]
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
