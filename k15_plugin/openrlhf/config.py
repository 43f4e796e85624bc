"""What the OpenRLHF adapter's classes read: ``args.k15`` on every Ray actor (no OpenRLHF import here).

``k15-train host=openrlhf`` builds it from the composed Hydra config and attaches it to OpenRLHF's parsed arguments
(:mod:`k15_plugin.openrlhf.launch`); OpenRLHF hands ``args`` to every actor inside its strategy. It is the plugin's
:class:`~k15_plugin.core.settings.K15Settings` plus the algorithm's name, since OpenRLHF's own flags cannot tell
``kimi_md`` from the estimator it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from k15_plugin.core.settings import K15Settings

ALGORITHMS = ("kimi_md", "grpo", "dr_grpo", "rloo", "ppo")


@dataclass(frozen=True)
class OpenRLHFSettings(K15Settings):
    """:class:`K15Settings` plus ``algorithm``: ``kimi_md`` (the k1.5 loss and baseline) or one of OpenRLHF's own."""

    algorithm: str = "kimi_md"

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
