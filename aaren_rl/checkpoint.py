"""Checkpoints: a folder per save, written atomically.

    step_0010000/
        model.safetensors   weights and buffers (normalization stats, action bounds): no code runs on load
        config.json         model config, training config, normalization stats, dataset summary
        trainer.pt          optimizer, schedule, RNG states (for --resume); loaded with weights_only=True
    latest                  the name of the newest complete checkpoint folder

A checkpoint is first written to a temporary folder and renamed into place, and ``latest`` is
replaced atomically, so a run killed mid-save leaves the previous checkpoint as the latest (and a
hidden ``.step_*`` folder, which ``remove_stale_temporaries`` clears when the next run starts).
Files and folders get the permissions the user's umask gives, as any other file they write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import DecisionModel, ModelConfig

LATEST = "latest"
TRAINER_KEYS = ("optimizer", "scheduler", "step", "torch_rng", "sampler_rng")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove what a save killed midway leaves (``.step_*`` folders, ``.latest.*`` files); returns them."""
    directory = Path(directory)
    stale = sorted(directory.glob(".step_*")) + sorted(directory.glob(f".{LATEST}.*")) if directory.is_dir() else []
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def save_checkpoint(directory: str | os.PathLike, step: int, model: DecisionModel, info: dict,
                    trainer_state: dict | None = None, keep: int = 3) -> Path:
    """Write checkpoint ``step`` under ``directory`` and point ``latest`` at it; keep the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=directory))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide a shared run from its readers
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        config = {
            "model": model.config.to_dict(),
            "obs_mean": model.obs_mean.tolist(),
            "obs_std": model.obs_std.tolist(),
            "step": step,
            **info,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
        for f in tmp.iterdir():  # safetensors writes 0600 files too
            os.chmod(f, 0o666 & ~_umask())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(directory / LATEST, final.name)
    old = sorted(p for p in directory.glob("step_*") if p.is_dir())[:-keep] if keep else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600, as above
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_checkpoint_info(folder: str | os.PathLike, updates: dict) -> None:
    """Add ``updates`` to a saved checkpoint's config.json (atomically), e.g. the evaluation that followed it."""
    path = Path(folder) / "config.json"
    _write_atomic(path, json.dumps({**json.loads(path.read_text()), **updates}, indent=2))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a folder holding ``latest`` (a checkpoints folder or a run folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for folder in (path, path / "checkpoints"):
        if (folder / LATEST).is_file():
            return folder / (folder / LATEST).read_text().strip()
    if (path / "model.safetensors").is_file():
        return path
    raise FileNotFoundError(f"{path} is not a checkpoint: expected model.safetensors and config.json, "
                            f"or a '{LATEST}' file naming one")


def load_checkpoint(path: str | os.PathLike, device="cpu") -> tuple[DecisionModel, dict]:
    """The model (in eval mode) and the checkpoint's config.json as a dict."""
    folder = resolve_checkpoint(path)
    for name in ("model.safetensors", "config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint {folder} is missing {name}")
    try:
        info = json.loads((folder / "config.json").read_text())
        config = ModelConfig(**info["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {folder}/config.json is corrupt or not an aaren-rl config: {e}") from None
    model = DecisionModel(config)
    load_weights(model, folder)
    return model.to(device).eval(), info


def read_weights(folder: str | os.PathLike) -> dict:
    """A checkpoint folder's model.safetensors as a state dict; ValueError if it is damaged."""
    folder = Path(folder)
    try:
        return load_file(folder / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint {folder}/model.safetensors is corrupt: {e}") from None


def load_weights(model: DecisionModel, folder: str | os.PathLike) -> None:
    """Load a checkpoint folder's model.safetensors into ``model``; ValueError if it is damaged."""
    folder = Path(folder)
    state = read_weights(folder)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"checkpoint {folder}/model.safetensors does not match the model: {first}") from None


def load_trainer_state(path: str | os.PathLike) -> dict:
    """trainer.pt of a checkpoint (tensors and plain values only); ValueError if it is damaged."""
    folder = resolve_checkpoint(path)
    f = folder / "trainer.pt"
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no trainer.pt: it cannot be resumed")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a pickle of arbitrary objects, ...: all refused alike
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"checkpoint {f} is corrupt or not a trainer state ({type(e).__name__}: {first})") from None
    missing = [k for k in TRAINER_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {f} is not a trainer state: missing {missing}")
    return state
