"""Packed whole-episode batches (``train.pack_episodes``): rows of several episodes one after
another, each from its t = 0, kept apart inside the model; a packed row trains every episode as if
it were alone in its row."""

import numpy as np
import pytest
import torch

from aaren_rl.blocks import Backbone
from aaren_rl.data import Episode, TrajectoryDataset
from aaren_rl.data.sampling import pack_rows, packing_candidates
from aaren_rl.group import Run, check_group
from aaren_rl.model import DecisionModel
from aaren_rl.train import TrainConfig, model_config_for, train

from test_group import group_and_solo_runs, losses, model_config, uneven_dataset


def small_dataset(lengths, obs_dim=3, act_dim=2, seed=0):
    rng = np.random.default_rng(seed)
    eps = [Episode(observations=rng.normal(size=(T, obs_dim)).astype(np.float32),
                   actions=rng.uniform(-1, 1, size=(T, act_dim)).astype(np.float32),
                   rewards=rng.normal(1.0, 1.0, size=T).astype(np.float32), truncated=True)
           for T in lengths]
    return TrajectoryDataset(eps, action_low=-np.ones(act_dim), action_high=np.ones(act_dim), name="small")


def test_packed_rows_hold_whole_episodes_from_t0_one_after_another():
    ds = small_dataset([3, 7, 2, 10, 5])
    flat = ds.flat
    episodes = torch.tensor([[1, 0, 2, 4], [3, 3, 0, 0], [4, 4, 4, 4]])  # (B, M)
    batch = pack_rows(flat, episodes, 12)
    # row 0: episode 1 (7 steps), episode 0 (3), episode 2 (2): exactly 12, nothing cut
    assert batch.episode_ids[0].tolist() == [0] * 7 + [1] * 3 + [2] * 2
    assert batch.timesteps[0].tolist() == list(range(7)) + list(range(3)) + list(range(2))
    # row 1: episode 3 (10 steps), then episode 3 again, cut after 2 steps (a prefix from t = 0)
    assert batch.episode_ids[1].tolist() == [0] * 10 + [1] * 2
    assert batch.timesteps[1].tolist() == list(range(10)) + [0, 1]
    # row 2: four 5-step episodes are 20 steps: 12 of them, no padding anywhere
    assert batch.timesteps[2].tolist() == list(range(5)) * 2 + [0, 1]
    assert not batch.padding_mask.any()
    # every step is the dataset's: observations (normalized) and returns-to-go of that episode and t
    for b, row in enumerate(episodes.tolist()):
        for j in range(12):
            e = row[int(batch.episode_ids[b, j])]
            t = int(batch.timesteps[b, j])
            ep = ds.episodes[e]
            want = (torch.from_numpy(ep.observations[t]) - flat.obs_mean) / flat.obs_std
            torch.testing.assert_close(batch.observations[b, j], want)
            assert float(batch.returns_to_go[b, j]) == pytest.approx(float(ep.returns_to_go[t]), rel=1e-5)


def test_too_few_candidates_leave_padding_after_the_last_episode():
    ds = small_dataset([3, 4])
    batch = pack_rows(ds.flat, torch.tensor([[0, 1]]), 10)
    assert batch.padding_mask[0].tolist() == [False] * 7 + [True] * 3
    assert packing_candidates(10, 3) == 4  # enough 3-step episodes to fill 10 steps


def test_sampled_packed_rows_are_full_and_start_at_an_episodes_first_step():
    ds = small_dataset([2, 30, 5, 8, 13, 3])
    g = torch.Generator().manual_seed(0)
    batch = ds.sample_packed(64, 30, g)
    assert batch.observations.shape[:2] == (64, 30) and not batch.padding_mask.any()
    ids = batch.episode_ids
    assert (ids[:, 1:] >= ids[:, :-1]).all() and (ids[:, 0] == 0).all()
    # every row starts at an episode's t = 0 (rows are as long as the longest episode)
    starts = batch.timesteps == 0
    assert starts[:, 0].all()


@pytest.mark.parametrize("kind,recency", [("aaren", 0.0), ("aaren", 0.2), ("transformer", 0.0)])
def test_a_packed_row_gives_each_episode_the_outputs_it_has_alone(kind, recency):
    """Float64: the packed row's outputs equal each episode's outputs computed on its own (Aaren's
    per-episode score gap, the Transformer's per-episode mask), padding and dropout aside."""
    torch.manual_seed(0)
    extra = {"query_init": 1.0, "recency": recency} if kind == "aaren" else {}
    bb = Backbone(kind, 2, 16, 2, 0.0, **extra).double()
    lens = [5, 70, 3, 40, 130]
    xs = [torch.randn(1, n, 16, dtype=torch.float64) for n in lens]
    ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lens)], 1)
    packed = bb(torch.cat(xs, 1), episode_ids=ids)
    alone = torch.cat([bb(x) for x in xs], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # and they do differ from one unbroken sequence (the ids are what keeps the episodes apart)
    assert (bb(torch.cat(xs, 1)) - alone).abs().max() > 1e-2


def test_packed_model_loss_equals_the_episodes_trained_alone():
    """A DecisionModel on a packed batch: its predictions at every step equal those of the same
    episodes padded one per row (the ordinary whole-episode batch)."""
    ds = small_dataset([4, 9, 6])
    torch.manual_seed(0)
    mc = model_config_for(ds, backbone="aaren", context="episode", n_layer=2, embed_dim=16, n_head=1, dropout=0.0)
    model = DecisionModel(mc, ds.obs_mean, ds.obs_std).double().eval()
    packed = pack_rows(ds.flat, torch.tensor([[0, 1, 2]]), 19)
    one_per_row = ds.flat.gather(ds.flat.episode_start, torch.arange(9) < ds.flat.episode_length[:, None])
    f = lambda b, ids: model(b.returns_to_go.double(), b.observations.double(),
                             model.normalize_action(b.actions.double()), b.timesteps, b.padding_mask, episode_ids=ids)
    p, a = f(packed, packed.episode_ids), f(one_per_row, None)
    real = a[~one_per_row.padding_mask]  # the three episodes' steps, in order
    torch.testing.assert_close(p[0], real, rtol=1e-6, atol=1e-6)


def packed_config(seed, **kw):
    kw = {"batch_size": 3, "log_every": 3, "warmup_steps": 10, "eval_every": 0, "eval_episodes": 0,
          "checkpoint_every": 10, "device": "cpu", "compile": "none", "pack_episodes": True, **kw}
    return TrainConfig(updates=kw.pop("updates", 30), seed=seed, **kw)


@pytest.mark.parametrize("backbone", ["aaren", "transformer"])
def test_a_packed_run_in_a_group_equals_the_run_alone(tmp_path, backbone):
    """Packing in the group's own sampler (one gather for all runs) and in a run alone: the same
    losses and gradient norms at every logged step, dropout on."""
    group_and_solo_runs(tmp_path, model_config(uneven_dataset(0), backbone, "episode"),
                        ("train/loss", "train/grad_norm"), pack_episodes=True, max_episode_len=60, batch_size=3)


def test_packed_training_learns_and_a_resume_with_other_packing_is_refused(tmp_path):
    ds = uneven_dataset(0)
    mc = model_config(ds, "aaren", "episode")
    train(mc, packed_config(0, updates=60, learning_rate=3e-3), ds, tmp_path / "run", progress=False)
    steps, loss = losses(tmp_path / "run")
    assert np.isfinite(loss).all() and loss[-1] < loss[0]
    # resuming with another packing setting is refused, naming it
    with pytest.raises(ValueError, match="pack_episodes"):
        train(mc, packed_config(0, updates=90, pack_episodes=False), ds, tmp_path / "run", resume=True, progress=False)


def test_packing_needs_the_episode_context():
    ds = uneven_dataset(0)
    with pytest.raises(ValueError, match="pack_episodes packs whole episodes: it needs model.context = 'episode'"):
        train(model_config(ds, "aaren", "window"), packed_config(0), ds, "unused", progress=False)
    with pytest.raises(ValueError, match="pack_episodes packs whole episodes"):  # a group checks it too
        check_group([Run(model_config(ds, "aaren", "window"), packed_config(0), ds, "unused")])
    with pytest.raises(ValueError, match="pack_episodes must be true or false"):
        TrainConfig(pack_episodes="yes").validate()


def test_episode_ids_are_checked():
    bb = Backbone("aaren", 1, 8, 1)
    x = torch.zeros(2, 5, 8)
    with pytest.raises(ValueError, match=r"episode_ids must have shape \(batch, seq\) = \(2, 5\)"):
        bb(x, episode_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="episode_ids must be an integer tensor"):
        bb(x, episode_ids=torch.zeros(2, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the layer uses the fused kernel on CUDA only")
def test_packed_rows_on_cuda_fused_kernel_equals_plain_scan_and_a_group_equals_the_run_alone(tmp_path):
    from aaren_rl import kernels
    from aaren_rl.layer import Aaren

    torch.manual_seed(0)
    layer = Aaren(16, 2, query_init=1.0, recency=0.1).cuda()
    x = torch.randn(2, 90, 16, device="cuda")
    ids = torch.cat([torch.zeros(2, 30), torch.ones(2, 45), torch.full((2, 15), 2.0)], 1).long().cuda()
    with kernels.use_triton(False):
        plain = layer(x, episode_ids=ids)
    torch.testing.assert_close(layer(x, episode_ids=ids), plain, rtol=1e-4, atol=1e-4)
    # a solo run scans with the fused kernel, the group with the plain scan under vmap
    group_and_solo_runs(tmp_path, model_config(uneven_dataset(0), "aaren", "episode", dropout=0.0, recency=0.3),
                        ("train/loss", "train/grad_norm"), pack_episodes=True, max_episode_len=60, batch_size=3,
                        device="cuda", amp=False, compile="none")
