"""Kimi k1.5 on OpenRLHF 0.11, through ``k15-train host=openrlhf``.

OpenRLHF has no plugin registry, so the pieces enter by subclassing: the mirror-descent loss
(:mod:`~k15_plugin.openrlhf.loss`), the advantage step with the length penalty and the tau log Z baseline
(:mod:`~k15_plugin.openrlhf.advantages`), the controller and training actors with the samplers and the optimizer
reset (:mod:`~k15_plugin.openrlhf.trainer`), started by :mod:`~k15_plugin.openrlhf.launch` with the command line of
:mod:`~k15_plugin.openrlhf.flags`. :mod:`~k15_plugin.openrlhf.rewards` is a reward file for
``--reward.remote_url``. Importing this package imports nothing from OpenRLHF.
"""

from pathlib import Path

REWARD_FUNC_FILE = str(Path(__file__).resolve().parent / "rewards.py")

__all__ = ["REWARD_FUNC_FILE"]
