"""The agent model: Decision Transformer's token scheme over an Aaren or Transformer backbone.

A trajectory is the token sequence (R_1, s_1, a_1, R_2, s_2, a_2, ...), R_t the return still to
go; every token gets the embedding of its episode timestep, and a_t is predicted from the
backbone's output at s_t (Chen et al., 2021). With ``backbone="aaren"`` this is Decision Aaren;
with ``backbone="transformer"`` the Decision Transformer baseline, the same code otherwise.

The model works in normalized units: observations standardized with the dataset's statistics,
returns divided by ``return_scale``, continuous actions mapped to [-1, 1] (the policy head ends in
tanh). ``forward`` is the parallel form (training); ``step`` feeds new tokens into the backbone's
recurrent state (acting); both share ``embed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import Backbone
from .layer import as_array

R, S, A = 0, 1, 2  # token kinds within a timestep, in DT's order


@dataclass
class ModelConfig:
    """Architecture. Defaults: Decision Transformer's reference setting for MuJoCo."""

    backbone: str = "aaren"  # "aaren" (Decision Aaren) or "transformer" (Decision Transformer)
    n_layer: int = 3
    embed_dim: int = 128
    n_head: int = 1
    dropout: float = 0.1
    # training context: "window": K-step windows (DT); "episode": whole episodes from t = 0;
    # "segment" (Aaren): K-step segments that start from the exact state of their episode's
    # earlier steps (computed without gradient), so training sees the contexts the stream acts in
    context: str = "window"
    context_len: int = 20  # K, timesteps per training window or segment
    max_timestep: int = 1000  # size of the timestep embedding; later timesteps share the last row
    return_scale: float = 1000.0  # returns-to-go are divided by this (DT: 1000 for MuJoCo)
    # Aaren only: std of the learned query's initial draw (GPT-2's 0.02, as every other weight);
    # the score of a token is q . k, so a small q keeps attention near-uniform for longer
    query_init: float = 0.02
    # Aaren only: recency decay of the scores, lam per token (0: none, the paper's Aaren): the weight
    # of a token k tokens back is e^(-lam k) times what its score gives (layer.py); a window-trained
    # model then streams over a whole episode with old tokens fading as they did past its windows
    recency: float = 0.0
    # filled in from the dataset
    observation_dim: int = 0
    action_dim: int = 0  # continuous: number of action dims; discrete: number of actions
    discrete: bool = False
    action_low: list[float] = field(default_factory=list)
    action_high: list[float] = field(default_factory=list)

    def validate(self) -> "ModelConfig":
        checks = {
            "backbone": self.backbone in ("aaren", "transformer"),
            "context": self.context in ("window", "episode") or (self.context == "segment" and self.backbone == "aaren"),
            "n_layer": self.n_layer > 0,
            "embed_dim": self.embed_dim > 0 and self.n_head > 0 and self.embed_dim % self.n_head == 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "context_len": self.context_len > 0,
            "max_timestep": self.max_timestep > 0,
            "return_scale": self.return_scale > 0,
            "query_init": self.query_init >= 0,
            "recency": (isinstance(self.recency, (int, float)) and 0 <= self.recency < float("inf")
                        and (self.recency == 0 or self.backbone == "aaren")),
            "observation_dim": self.observation_dim > 0,
            "action_dim": self.action_dim > 0,
            "action_low": self.discrete or len(self.action_low) == len(self.action_high) == self.action_dim,
        }
        expected = {
            "backbone": "'aaren' or 'transformer'",
            "context": "'window' or 'episode', or 'segment' with backbone 'aaren'",
            "embed_dim": "a positive multiple of n_head", "dropout": "in [0, 1)", "query_init": "a non-negative std",
            "recency": "a finite decay >= 0 per token, and 0 unless backbone is 'aaren'",
            "action_low": "action_low and action_high with action_dim entries each",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"model config: bad {name} = {getattr(self, name)!r}; expected "
                                 f"{expected.get(name, 'a positive value')}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_window(config, mode: str) -> int | None:
    """The Transformer's attention span in tokens when it streams with a sliding key/value cache
    (None: a cache that grows, or no cache). ``"sliding"`` keeps the last K timesteps, and so does
    ``"recurrent"`` for a Transformer trained on K-step windows. 3K - 1 tokens: the s_t token
    sees R_{t-K+1}, s_{t-K+1}, a_{t-K+1}, ..., R_t, s_t, the tokens DT's window recompute gives it."""
    if config.backbone != "transformer" or mode == "window":
        return None
    if mode == "sliding" or config.context == "window":
        return 3 * config.context_len - 1
    return None


class DecisionModel(nn.Module):
    def __init__(self, config: ModelConfig, obs_mean=None, obs_std=None):
        super().__init__()
        self.config = c = config.validate()
        E = c.embed_dim
        self.embed_timestep = nn.Embedding(c.max_timestep, E)
        self.embed_return = nn.Linear(1, E)
        self.embed_state = nn.Linear(c.observation_dim, E)
        self.embed_action = nn.Embedding(c.action_dim, E) if c.discrete else nn.Linear(c.action_dim, E)
        self.embed_ln = nn.LayerNorm(E)
        self.backbone = Backbone(c.backbone, c.n_layer, E, c.n_head, c.dropout, c.query_init, c.recency)
        self.predict_action = nn.Linear(E, c.action_dim)
        # everything needed to act from a checkpoint travels with the weights
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean if obs_mean is not None else torch.zeros(c.observation_dim), dtype=torch.float32))
        self.register_buffer("obs_std", torch.as_tensor(obs_std if obs_std is not None else torch.ones(c.observation_dim), dtype=torch.float32))
        if not c.discrete:
            self.register_buffer("action_low", torch.tensor(c.action_low, dtype=torch.float32))
            self.register_buffer("action_high", torch.tensor(c.action_high, dtype=torch.float32))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):  # GPT-2's, as Decision Transformer uses
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- units ------------------------------------------------------------------------------
    def normalize_obs(self, obs: Tensor) -> Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def normalize_action(self, action: Tensor) -> Tensor:
        """Environment actions -> the model's [-1, 1] (continuous) or indices (discrete)."""
        if self.config.discrete:
            return action.long()
        return (2 * (action - self.action_low) / (self.action_high - self.action_low) - 1).clamp(-1, 1)

    def unnormalize_action(self, action: Tensor) -> Tensor:
        return self.action_low + (action + 1) * 0.5 * (self.action_high - self.action_low)

    # -- tokens -----------------------------------------------------------------------------
    def embed(self, kind: int, value: Tensor, timestep: Tensor) -> Tensor:
        """Embed tokens of one kind: value (..., dim) or (...) -> (..., E), with the timestep's embedding."""
        t = self.embed_timestep(timestep.clamp(0, self.config.max_timestep - 1))
        if kind == R:
            return self.embed_return(value.unsqueeze(-1) / self.config.return_scale) + t
        if kind == S:
            return self.embed_state(value) + t
        return self.embed_action(value) + t

    def action_output(self, h: Tensor) -> Tensor:
        """Backbone output at s_t -> action in [-1, 1] (continuous) or logits (discrete)."""
        out = self.predict_action(h)
        return out if self.config.discrete else torch.tanh(out)

    # -- parallel form (training) -----------------------------------------------------------
    def tokens(self, returns_to_go: Tensor, observations: Tensor, actions: Tensor, timesteps: Tensor) -> Tensor:
        """(B, T[, dim]) model-unit inputs -> the embedded token sequence (B, 3T, E): R_1, s_1, a_1, R_2, ..."""
        B, T = timesteps.shape
        return torch.stack([
            self.embed(R, returns_to_go, timesteps),
            self.embed(S, observations, timesteps),
            self.embed(A, actions, timesteps),
        ], dim=2).reshape(B, 3 * T, -1)

    def forward(self, returns_to_go: Tensor, observations: Tensor, actions: Tensor, timesteps: Tensor,
                padding_mask: Tensor | None = None, state: list | None = None,
                episode_ids: Tensor | None = None) -> Tensor:
        """All inputs in model units, (B, T[, dim]); returns predicted a_t for every t: (B, T, action_dim).

        ``state`` (per-layer backbone states, e.g. from ``prefix_state``): the tokens continue that
        state (the recurrent form over a chunk: every output is the same function of everything
        folded so far) instead of starting empty. ``episode_ids`` (B, T) integers (packed rows,
        ``data.sample_packed``): each step sees only the steps of its own episode in the row."""
        mask = None if padding_mask is None else padding_mask.repeat_interleave(3, dim=1)  # (B, 3T)
        x = self.embed_ln(self.tokens(returns_to_go, observations, actions, timesteps))
        if episode_ids is not None and state is not None:
            raise ValueError("episode_ids (packed rows) start from empty states; pass no state with them")
        if state is None:
            seg = None if episode_ids is None else episode_ids.repeat_interleave(3, dim=1)
            h = self.backbone(x, padding_mask=mask, episode_ids=seg)
        else:
            h, _ = self.backbone.step(x, state, padding_mask=mask)
        return self.action_output(h[:, S::3])  # outputs at the s_t tokens

    def prefix_state(self, returns_to_go: Tensor, observations: Tensor, actions: Tensor, timesteps: Tensor,
                     padding_mask: Tensor | None = None) -> list:
        """The backbone state after folding in every (R, s, a) of the given steps (padding changes
        nothing): what a streaming policy holds when the next step begins."""
        B = timesteps.shape[0]
        mask = None if padding_mask is None else padding_mask.repeat_interleave(3, dim=1)
        x = self.embed_ln(self.tokens(returns_to_go, observations, actions, timesteps))
        _, state = self.backbone.step(x, self.backbone.init_state(B, device=x.device), padding_mask=mask)
        return state

    def loss(self, pred: Tensor, actions: Tensor, padding_mask: Tensor | None) -> Tensor:
        """MSE (continuous, in [-1, 1] units) or cross-entropy (discrete) over real timesteps."""
        if self.config.discrete:
            per_step = F.cross_entropy(pred.transpose(1, 2), actions, reduction="none")  # (B, T)
        else:
            per_step = (pred - actions).pow(2).mean(-1)  # (B, T)
        if padding_mask is None:
            return per_step.mean()
        real = (~padding_mask).to(per_step.dtype)
        return (per_step * real).sum() / real.sum().clamp(min=1)

    # -- recurrent form (acting) ------------------------------------------------------------
    def init_state(self, batch_size: int, window: int | None = None):
        """The backbone's empty state; ``window`` (Transformer): sliding caches of that many tokens."""
        return self.backbone.init_state(batch_size, window=window)

    def step(self, tokens: Tensor, state, padding_mask: Tensor | None = None):
        """Feed embedded tokens (B, t, E) into the backbone state; returns outputs (B, t, E) and state."""
        return self.backbone.step(self.embed_ln(tokens), state, padding_mask=padding_mask)

    # -- one environment step (what a policy's backend computes, and what is exported) -------
    # obs (n, obs_dim) in env units; prev_action a_{t-1} in model units ((n,) indices if discrete;
    # anything where ``start``); returns_to_go (n,); timestep (n,) of this observation; start (n,)
    # bool: rows that begin an episode. Each returns the action head's output at s_t (n, act) and
    # the new state.
    def act(self, obs: Tensor, prev_action: Tensor, returns_to_go: Tensor, timestep: Tensor, start: Tensor, state):
        """From the backbone's recurrent state: rows that start are emptied, then (a_{t-1}, R_t, s_t)
        go in as one 3-token chunk (a_{t-1} is padding where ``start``)."""
        state = self.backbone.reset_state(state, start)
        t = timestep
        tokens = torch.stack([
            self.embed(A, prev_action, (t - 1).clamp(min=0)),
            self.embed(R, returns_to_go, t),
            self.embed(S, self.normalize_obs(obs), t),
        ], dim=1)  # (n, 3, E): a_{t-1}, R_t, s_t
        pad = torch.stack([start, torch.zeros_like(start), torch.zeros_like(start)], dim=1)
        h, state = self.step(tokens, state, padding_mask=pad)
        return self.action_output(h[:, 2]), state

    def init_window(self, batch_size: int) -> dict[str, Tensor]:
        """Decision Transformer's evaluation state: the last K timesteps' values, all padding yet."""
        c, p = self.config, self.embed_ln.weight
        n, K, dev = batch_size, c.context_len, p.device
        actions = (torch.zeros(n, K, dtype=torch.long, device=dev) if c.discrete
                   else torch.zeros(n, K, c.action_dim, device=dev, dtype=p.dtype))
        return {"returns_to_go": torch.zeros(n, K, device=dev, dtype=p.dtype),
                "observations": torch.zeros(n, K, c.observation_dim, device=dev, dtype=p.dtype),
                "actions": actions, "timesteps": torch.zeros(n, K, dtype=torch.long, device=dev),
                "padding_mask": torch.ones(n, K, dtype=torch.bool, device=dev)}

    def act_window(self, obs: Tensor, prev_action: Tensor, returns_to_go: Tensor, timestep: Tensor, start: Tensor,
                   window: dict[str, Tensor]):
        """Decision Transformer's evaluation: the last K timesteps, recomputed by ``forward``."""
        # a_{t-1} into the slot of the last timestep (a placeholder until now); a row that
        # begins an episode drops its whole window; then drop the oldest timestep and append
        # R_t, s_t (a_t is unknown yet; causality hides its placeholder)
        w = window
        actions = torch.cat([w["actions"][:, :-1], prev_action[:, None]], 1)
        w = {
            "returns_to_go": torch.cat([w["returns_to_go"][:, 1:], returns_to_go[:, None]], 1),
            "observations": torch.cat([w["observations"][:, 1:], self.normalize_obs(obs)[:, None]], 1),
            "actions": torch.cat([actions[:, 1:], torch.zeros_like(actions[:, :1])], 1),
            "timesteps": torch.cat([w["timesteps"][:, 1:], timestep[:, None]], 1),
            "padding_mask": torch.cat([(w["padding_mask"] | start[:, None])[:, 1:],
                                       torch.zeros_like(w["padding_mask"][:, :1])], 1),
        }
        pred = self(w["returns_to_go"], w["observations"], w["actions"], w["timesteps"], w["padding_mask"])
        return pred[:, -1], w

    @torch.no_grad()
    def export_step_weights(self) -> tuple[dict, dict, list[dict]]:
        """Everything one acting step reads, by name, for a backend outside PyTorch (the compiled
        CPU step): (dims, tensors, layers). Matrices are (in, out) float32 arrays (y = x @ W + b);
        an Embedding is its table (rows). ``dims``: E, H, L, OBS, ACT, DISCRETE, TMAX. Aaren only."""
        c = self.config
        layers, final = self.backbone.export_step_weights()
        act = self.embed_action
        tensors = {
            "temb": as_array(self.embed_timestep.weight),
            "ret_w": as_array(self.embed_return.weight[:, 0]), "ret_b": as_array(self.embed_return.bias),
            "state_w": as_array(self.embed_state.weight.T), "state_b": as_array(self.embed_state.bias),
            "act_w": as_array(act.weight if c.discrete else act.weight.T),
            "act_b": as_array(act.weight.new_zeros(c.embed_dim) if c.discrete else act.bias),
            "eln_w": as_array(self.embed_ln.weight), "eln_b": as_array(self.embed_ln.bias),
            **final,
            "head_w": as_array(self.predict_action.weight.T), "head_b": as_array(self.predict_action.bias),
            "obs_mean": as_array(self.obs_mean), "obs_std": as_array(self.obs_std),
            "ret_scale": as_array(torch.tensor([c.return_scale])),
        }
        dims = {"E": c.embed_dim, "H": c.n_head, "L": c.n_layer, "OBS": c.observation_dim, "ACT": c.action_dim,
                "DISCRETE": int(c.discrete), "TMAX": c.max_timestep}
        return dims, tensors, layers
