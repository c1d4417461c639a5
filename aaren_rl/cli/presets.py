"""Presets: small TOML files in ``agents/`` (agent configs) and ``envs/`` (environments, datasets).

A preset is named by its file stem (``--agent decision_aaren``) or given as a path to a ``.toml``
file. Only the command line reads presets; the library takes plain dataclasses and values.

Where they are looked for: ``agents/`` or ``envs/`` in the working directory if it has one, else
the source checkout's (the folders at the top of the repository), else the copies that the wheel
installs inside the package (``aaren_rl/presets/``, package data: see setup.py).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]


def preset_dir(kind: str) -> Path:
    """``agents`` or ``envs``: the working directory's, else the source checkout's, else the package's."""
    for folder in (Path.cwd() / kind, REPO_ROOT / kind):
        if folder.is_dir() and any(folder.glob("*.toml")):
            return folder
    return Path(str(resources.files("aaren_rl") / "presets" / kind))


def available(kind: str) -> list[str]:
    d = preset_dir(kind)
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def load_preset(kind: str, name: str) -> dict:
    """The preset ``name`` of ``kind`` as a dict; a clear error naming the choices if unknown."""
    path = Path(name)
    if path.suffix != ".toml":
        path = preset_dir(kind) / f"{name}.toml"
    if not path.is_file():
        raise SystemExit(
            f"error: unknown {kind[:-1]} preset {name!r} (no file {path}); "
            f"available: {', '.join(available(kind)) or 'none'}"
        )
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"error: preset {path} is not valid TOML: {e}") from None
    data.setdefault("name", path.stem)
    return data


def resolve_env(name: str) -> dict:
    """An env preset name (or .toml path) or a gymnasium id -> env_id, targets, references.

    A gymnasium id that a preset describes gets that preset's targets and references.
    """
    if not (name.endswith(".toml") or name in available("envs")):
        name = next((n for n in available("envs") if load_preset("envs", n).get("env_id") == name), name)
    if name.endswith(".toml") or name in available("envs"):
        p = load_preset("envs", name)
        ref = p.get("reference", {})
        return {"name": p["name"], "env_id": p["env_id"], "target_returns": p.get("target_returns", []),
                "ref_min": ref.get("ref_min"), "ref_max": ref.get("ref_max"), "datasets": p.get("datasets", {})}
    return {"name": name, "env_id": name, "target_returns": [], "ref_min": None, "ref_max": None, "datasets": {}}


def resolve_dataset(source: str) -> str:
    """``PRESET/TIER`` (e.g. ``pendulum/medium``) -> the preset's Minari id; anything else unchanged."""
    preset, _, tier = source.partition("/")
    if tier and "/" not in tier and preset in available("envs"):
        datasets = load_preset("envs", preset).get("datasets", {})
        if tier in datasets:
            return datasets[tier]
    return source


def parse_overrides(items: list[str]) -> dict:
    """``--set model.embed_dim=64 train.batch_size=8`` -> {"model": {...}, "train": {...}} (TOML values)."""
    out: dict = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not eq or not dot or section not in ("model", "train"):
            raise SystemExit(f"error: --set expects model.KEY=VALUE or train.KEY=VALUE, got {item!r}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        out.setdefault(section, {})[field] = parsed
    return out
