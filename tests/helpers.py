"""Shared test helpers (the tests folder is on sys.path when pytest runs)."""

import torch

from aaren_rl.model import DecisionModel, ModelConfig


def make_model(backbone="aaren", context="episode", discrete=False, n_layer=2, embed_dim=32, n_head=2, obs_dim=5,
               act_dim=3, K=20, max_timestep=1000, seed=0, recency=0.0):
    """A small agent model whose weights are far from GPT-2's tiny init, so that every input matters."""
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=backbone, context=context, context_len=K, n_layer=n_layer, embed_dim=embed_dim,
                      n_head=n_head, dropout=0.1, max_timestep=max_timestep, return_scale=10.0, recency=recency,
                      observation_dim=obs_dim, action_dim=act_dim, discrete=discrete,
                      action_low=[] if discrete else [-2.0] * act_dim, action_high=[] if discrete else [1.0] * act_dim)
    model = DecisionModel(cfg, obs_mean=torch.randn(obs_dim), obs_std=torch.rand(obs_dim) + 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()
