"""Writing recorded episodes as a Minari dataset or a D4RL-format HDF5 file, all or nothing.

Both writers build the data under a temporary name and rename it into place at the end, so an
interrupted collection never leaves a dataset that looks complete: a Minari dataset is created in
a hidden staging folder of the Minari root (Minari skips hidden folders) and moved; an HDF5 file is
written as ``NAME.partial`` and renamed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .recording import RawEpisode


def minari_root() -> Path:
    """Where Minari keeps local datasets: ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``."""
    from minari.storage import get_dataset_path

    return Path(get_dataset_path())


def minari_dataset_exists(dataset_id: str) -> bool:
    return (minari_root() / dataset_id / "data").exists()


@contextmanager
def _minari_root_at(path: Path):
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _episode_buffer(i: int, ep: RawEpisode):
    from minari.data_collector import EpisodeBuffer

    T = len(ep)
    terminations = np.zeros(T, dtype=bool)
    truncations = np.zeros(T, dtype=bool)
    terminations[-1], truncations[-1] = ep.terminated, ep.truncated
    return EpisodeBuffer(id=i, observations=ep.observations, actions=ep.actions,
                         rewards=ep.rewards, terminations=terminations, truncations=truncations)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def clean_stale_staging(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove staging folders (``.staging-PID-*``) that a killed writer left in the Minari root:
    those whose process is gone (and any without a process id, from older versions). Returns them."""
    root = Path(root) if root is not None else minari_root()
    removed = []
    for d in root.glob(".staging-*") if root.is_dir() else ():
        pid = d.name.split("-")[1] if d.name.count("-") >= 2 else ""
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def stage_minari(dataset_id: str, episodes: list[RawEpisode], env_id: str, *,
                 ref_min_score: float, ref_max_score: float, algorithm_name: str | None = None,
                 description: str | None = None) -> Path:
    """Build the Minari dataset ``dataset_id`` in a hidden staging folder of the Minari root (which
    Minari does not list); returns the staging folder, for :func:`publish_minari`."""
    import minari

    root = minari_root()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=root))
    try:
        with _minari_root_at(staging), warnings.catch_warnings():
            # minari warns about every optional metadata field left empty (permalink, email...)
            warnings.filterwarnings("ignore", category=UserWarning, module="minari")
            minari.create_dataset_from_buffers(
                dataset_id, [_episode_buffer(i, ep) for i, ep in enumerate(episodes)], env=env_id,
                algorithm_name=algorithm_name, ref_min_score=float(ref_min_score),
                ref_max_score=float(ref_max_score), description=description,
                author="aaren-rl", data_format="hdf5",
            )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def publish_minari(dataset_id: str, staging: Path) -> Path:
    """Move a dataset built by :func:`stage_minari` into place (replacing one with the same id)."""
    from minari.namespace import NAMESPACE_METADATA_FILENAME

    root = minari_root()
    final = root / dataset_id
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # Namespace folders need their metadata file for minari to list what is inside them.
        for parent in Path(dataset_id).parents:
            if str(parent) != "." and not (root / parent / NAMESPACE_METADATA_FILENAME).exists():
                (root / parent / NAMESPACE_METADATA_FILENAME).write_text("{}")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / dataset_id, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def write_minari(dataset_id: str, episodes: list[RawEpisode], env_id: str, *,
                 ref_min_score: float, ref_max_score: float, algorithm_name: str | None = None,
                 description: str | None = None, force: bool = False) -> Path:
    """Create the Minari dataset ``dataset_id`` from ``episodes``; returns its folder.

    An existing dataset with that id is an error unless ``force``, in which case it is replaced
    only once the new one is complete.
    """
    final = minari_root() / dataset_id
    if final.exists() and not force:
        raise FileExistsError(f"Minari dataset {dataset_id!r} already exists at {final}; "
                              "pass force=True (--force) to replace it")
    staging = stage_minari(dataset_id, episodes, env_id, ref_min_score=ref_min_score,
                           ref_max_score=ref_max_score, algorithm_name=algorithm_name,
                           description=description)
    return publish_minari(dataset_id, staging)


def write_hdf5(path: str | os.PathLike, episodes: list[RawEpisode], env_id: str, *,
               ref_min_score: float | None = None, ref_max_score: float | None = None,
               action_low=None, action_high=None, publish: bool = True, **attrs) -> Path:
    """Write ``episodes`` in D4RL's layout: flat ``observations``, ``actions``, ``rewards``,
    ``terminals``, ``timeouts``, ``next_observations``, with the env id and references as attrs.
    Observations, actions and rewards are float32 (as D4RL's), every array gzip-compressed. With
    ``publish=False`` the file stays at ``NAME.partial`` (returned) for the caller to rename."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ends = lambda flag: np.concatenate([
        np.eye(1, len(ep), len(ep) - 1, dtype=bool)[0] & getattr(ep, flag) for ep in episodes])
    partial = path.with_name(path.name + ".partial")
    try:
        with h5py.File(partial, "w") as f:
            # D4RL's dtypes (float32 observations, actions and rewards), compressed
            put = lambda name, x: f.create_dataset(name, data=x, compression="gzip",
                                                   compression_opts=4, shuffle=True)
            f32 = lambda arrays: np.concatenate(arrays).astype(np.float32)
            put("observations", f32([ep.observations[:-1] for ep in episodes]))
            put("next_observations", f32([ep.observations[1:] for ep in episodes]))
            actions = np.concatenate([ep.actions for ep in episodes])
            put("actions", actions.astype(np.float32) if actions.dtype.kind == "f" else actions)
            put("rewards", f32([ep.rewards for ep in episodes]))
            put("terminals", ends("terminated"))
            put("timeouts", ends("truncated"))
            f.attrs["env_id"] = env_id
            for key, value in dict(ref_min_score=ref_min_score, ref_max_score=ref_max_score,
                                   action_low=action_low, action_high=action_high, **attrs).items():
                if value is not None:
                    f.attrs[key] = value
        if not publish:
            return partial
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path



def slim_hdf5(sources, dest: str | os.PathLike, level: int = 9) -> Path:
    """Copy one or more D4RL-format HDF5 files into ``dest`` with only the keys training reads
    (``HDF5_REQUIRED_KEYS``: no ``next_observations``), gzip ``level`` with shuffle: a smaller file
    to carry to another machine, which loads to the same episodes. Several sources are
    concatenated in order (medium then expert is the medium-expert tier); their attributes (env
    id, references) must agree, and ``tier`` is dropped when they name different tiers. All or
    nothing, like :func:`write_hdf5`."""
    import h5py

    from .dataset import HDF5_REQUIRED_KEYS, read_hdf5_arrays

    sources = [Path(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]
    if not sources:
        raise ValueError("slim_hdf5 needs at least one source file")
    arrays, attrs = {k: [] for k in HDF5_REQUIRED_KEYS}, None
    for src in sources:
        data, these = read_hdf5_arrays(src)
        for k in HDF5_REQUIRED_KEYS:
            arrays[k].append(data[k])
        if attrs is None:
            attrs = these
            continue
        for key in ("env_id", "ref_min_score", "ref_max_score"):
            if not np.array_equal(np.asarray(attrs.get(key)), np.asarray(these.get(key))):
                show = lambda v: v.item() if isinstance(v, np.generic) else v
                raise ValueError(f"{src}: attribute {key!r} is {show(these.get(key))!r}, but {sources[0]} has "
                                 f"{show(attrs.get(key))!r}; only files of one collection can be concatenated")
        if attrs.get("tier") != these.get("tier"):
            attrs.pop("tier", None)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    try:
        with h5py.File(partial, "w") as f:
            for k in HDF5_REQUIRED_KEYS:
                f.create_dataset(k, data=np.concatenate(arrays[k]), compression="gzip",
                                 compression_opts=level, shuffle=True)
            for key, value in attrs.items():
                f.attrs[key] = value
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return dest
