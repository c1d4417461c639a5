"""Package data that lives outside the package: the presets in ``agents/`` and ``envs/``.

They stay at the top of the repository (where users edit them) and are copied into the wheel as
``aaren_rl/presets/{agents,envs}/*.toml``, which ``aaren_rl.cli.presets`` reads when the package is
installed. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PRESETS = ("agents", "envs")


class BuildPyWithPresets(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's folders directly
        root = Path(__file__).resolve().parent
        for kind in PRESETS:
            target = Path(self.build_lib) / "aaren_rl" / "presets" / kind
            target.mkdir(parents=True, exist_ok=True)
            for toml in sorted((root / kind).glob("*.toml")):
                shutil.copyfile(toml, target / toml.name)


setup(cmdclass={"build_py": BuildPyWithPresets})
