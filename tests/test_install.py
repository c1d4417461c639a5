"""The package as a user installs it: build the wheel, install it (not editable) in a fresh venv,
and run a tiny train and evaluate from a folder that is not the repository.

The venv reuses the installed dependencies through a .pth file (nothing is downloaded) but not this
checkout: ``aaren_rl`` must come from the wheel, presets included.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from aaren_rl.data.recording import RawEpisode
from aaren_rl.data.writers import write_hdf5

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "aaren_rl", "agents", "envs"]


def run(cmd, cwd, env=None, timeout=300):
    if env is None:  # a PYTHONPATH reaching a checkout (its .egg-info) would make pip skip the wheel
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with the wheel built from this checkout installed in it; returns its bin folder."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"  # a copy of the sources, so the build leaves nothing in the checkout
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(
            REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (REPO / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-w", root / "dist"], cwd=src)
    wheel = next((root / "dist").glob("aaren_rl-*.whl"))
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=root)
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip()
    (Path(site) / "_shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin", wheel


def test_the_wheel_carries_the_presets(installed):
    import zipfile

    names = zipfile.ZipFile(installed[1]).namelist()
    for kind in ("agents", "envs"):
        assert {f"aaren_rl/presets/{kind}/{p.name}" for p in (REPO / kind).glob("*.toml")} <= set(names)
    assert "aaren_rl/kernels/cpu_step.c" in names


def test_installed_package_trains_and_evaluates_outside_the_repo(installed, tmp_path):
    bin_dir, _ = installed
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = run([bin_dir / "python", "-c", "import aaren_rl; print(aaren_rl.__file__)"], cwd=work, env=env)
    assert where.startswith(str(bin_dir.parent)), where  # the wheel's copy, not this checkout
    assert "decision_transformer" in run([bin_dir / "aaren-rl", "train", "--help"], cwd=work, env=env)
    assert "pendulum" in run([bin_dir / "aaren-rl", "collect", "--help"], cwd=work, env=env)

    rng = np.random.default_rng(0)
    episodes = [RawEpisode(observations=rng.normal(size=(21, 3)).astype(np.float32),
                           actions=rng.uniform(-2, 2, size=(20, 1)).astype(np.float32),
                           rewards=-rng.uniform(0, 16, size=20).astype(np.float32),
                           terminated=False, truncated=True) for _ in range(4)]
    data = write_hdf5(work / "tiny.hdf5", episodes, "Pendulum-v1", ref_min_score=-1200.0, ref_max_score=-150.0,
                      action_low=[-2.0], action_high=[2.0])
    out = run([bin_dir / "aaren-rl", "train", "--agent", "decision_aaren", "--dataset", data.name, "--env", "pendulum",
               "--updates", "3", "--eval-episodes", "1", "--logdir", "run", "--no-progress",
               "--set", "model.embed_dim=16", "model.n_layer=1", "train.batch_size=4", "train.warmup_steps=1"],
              cwd=work, env=env)
    assert "target return -150 (env preset 'pendulum')" in out and "final evaluation (1 episodes)" in out
    out = run([bin_dir / "aaren-rl", "evaluate", "run", "--episodes", "1", "--json", "eval.json"], cwd=work, env=env)
    assert "Pendulum-v1: return" in out and (work / "eval.json").is_file()
