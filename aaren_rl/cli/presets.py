"""Presets: small TOML files in ``agents/`` (agent configs) and ``envs/`` (environments, datasets).

A preset is named by its file stem (``--agent decision_aaren``) or given as a path to a ``.toml``
file. Only the command line reads presets; the library takes plain dataclasses and values.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def preset_dir(kind: str) -> Path:
    """``agents`` or ``envs``: the folder in the working directory if it has one, else the repo's."""
    local = Path.cwd() / kind
    return local if local.is_dir() else REPO_ROOT / kind


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
