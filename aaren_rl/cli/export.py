"""``aaren-rl export``: write a checkpoint's policy step as ONNX, to act with no PyTorch.

    aaren-rl export runs/da --out exported/da
    aaren-rl export runs/dt --out exported/dt-sliding --mode sliding
    python -c "from aaren_rl.runtime import OnnxPolicy; p = OnnxPolicy('exported/da')"
    aaren-rl evaluate exported/da --episodes 20
"""

from __future__ import annotations

import argparse

from ..policy import MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run folder, its checkpoints folder, or one checkpoint folder")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write step.onnx and spec.json into (replaced if it holds an export)")
    p.add_argument("--mode", choices=list(MODES),
                   help="the policy mode whose step is exported: recurrent (Aaren's constant state; a Transformer's "
                        "key/value cache, which grows), window (DT's recompute of the last K steps), sliding (a "
                        "Transformer's cache of the last K steps) (default: the mode evaluate uses: recurrent for "
                        "Aaren and models trained on whole episodes, else window)")
    p.add_argument("--target-return", type=float,
                   help="default return to condition on, recorded in the spec (default: the env preset's first "
                        "target, else the one training used)")


def run(args: argparse.Namespace) -> int:
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
    except ImportError:
        raise SystemExit("aaren-rl export: error: exporting needs onnx: pip install 'aaren-rl[onnx]'") from None
    from aaren_rl.checkpoint import load_checkpoint
    from aaren_rl.export import export_policy
    from aaren_rl.runtime import read_spec

    from .presets import resolve_env

    model, info = load_checkpoint(args.checkpoint)
    target = args.target_return
    env_id = info.get("env_id")
    if target is None and env_id:
        try:
            targets = resolve_env(env_id)["target_returns"]
        except (FileNotFoundError, ValueError, KeyError):
            targets = []
        target = float(targets[0]) if targets else None
    if target is None:
        target = info.get("target_return")
    try:
        out = export_policy(model, args.out, target_return=target, env_id=env_id, mode=args.mode)
    except ValueError as e:
        raise SystemExit(f"aaren-rl export: error: {e}") from None
    mode = read_spec(out)["mode"]
    print(f"wrote {out}/step.onnx and {out}/spec.json ({model.config.backbone}, mode {mode}, target return "
          f"{'none' if target is None else f'{target:g}'})")
    return 0
