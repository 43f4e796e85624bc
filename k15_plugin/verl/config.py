"""The plugin's settings inside verl's config: ``algorithm.k15`` and the policy loss's ``tau``/``length_normalize``.

``algorithm.k15`` is read by :func:`k15_settings` into :class:`~k15_plugin.core.settings.K15Settings` (every key has a
default, so an empty node means the paper's defaults with the length penalty off and verl's own uniform sampling;
unknown keys and out-of-range values raise ``ValueError`` naming the full key).

verl builds ``actor_rollout_ref.actor.policy_loss`` into a frozen dataclass and rejects keys it does not declare,
so ``tau`` travels in :class:`K15PolicyLossConfig`, selected with
``actor_rollout_ref.actor.policy_loss._target_=k15_plugin.verl.config.K15PolicyLossConfig`` (the shipped configs
do it, with ``tau: ${algorithm.k15.tau}`` and ``length_normalize: ${algorithm.k15.length_normalize}`` so the loss and
the baseline share one value).
"""

from __future__ import annotations

from dataclasses import dataclass

from verl.workers.config import PolicyLossConfig

from k15_plugin.core.settings import K15Settings, check_value, default

PREFIX = "algorithm.k15"


def k15_settings(algorithm) -> K15Settings:
    """Read and check ``algorithm.k15`` from verl's ``algorithm`` config node (a DictConfig, dict or None).

    ``rollout`` (partial rollouts, repeat detection) is refused: verl generates with its own rollout workers.
    """
    node = None if algorithm is None else algorithm.get("k15", None)
    if node is not None and "rollout" in node:
        raise ValueError(
            f"{PREFIX}.rollout: partial rollouts and repeat detection are not implemented on verl (k15-train host=trl "
            "has them); remove the key"
        )
    return K15Settings.from_mapping(node, PREFIX)


@dataclass
class K15PolicyLossConfig(PolicyLossConfig):
    """``PolicyLossConfig`` plus ``tau`` (KL weight, > 0) and ``length_normalize`` (divide each sequence
    log-probability by its token count; the paper sums, the default)."""

    tau: float = default("tau")
    length_normalize: bool = default("length_normalize")

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        key = "actor_rollout_ref.actor.policy_loss"
        check_value("tau", self.tau, f"{key}.tau")
        check_value("length_normalize", self.length_normalize, f"{key}.length_normalize")
