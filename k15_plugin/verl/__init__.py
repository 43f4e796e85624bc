"""Kimi k1.5 on verl 0.9: a policy loss, advantage estimators, a trainer mode and Hydra configs.

Installed with the package, the ``verl.plugins`` entry point (:mod:`k15_plugin.verl.register`) registers everything
on ``import verl``; a run then only needs verl's own launcher and the plugin's config directory::

    python -m verl.trainer.main_ppo --config-dir="$(python -m k15_plugin.verl --config-dir)" --config-name=k15_md \\
        data.train_files=... actor_rollout_ref.model.path=...

This package imports nothing from verl itself, so ``CONFIG_DIR`` is cheap to read.
"""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent / "config")
CONFIG_NAMES = ("k15_md", "k15_grpo", "k15_dr_grpo", "k15_rloo")

__all__ = ["CONFIG_DIR", "CONFIG_NAMES"]
