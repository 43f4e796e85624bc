"""verl's policy-loss config with the two settings the k1.5 loss needs.

verl builds ``actor_rollout_ref.actor.policy_loss`` into a frozen dataclass and rejects keys it does not declare,
so ``tau`` travels in this subclass, selected with
``actor_rollout_ref.actor.policy_loss._target_=k15_plugin.verl.config.K15PolicyLossConfig`` (the shipped configs
do it, with ``tau: ${algorithm.k15.tau}`` so the loss and the baseline share one value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from verl.workers.config import PolicyLossConfig


@dataclass
class K15PolicyLossConfig(PolicyLossConfig):
    """``PolicyLossConfig`` plus ``tau`` (KL weight, > 0) and ``length_normalize`` (divide each sequence
    log-probability by its token count; the paper sums, the default)."""

    tau: float = 1.0
    length_normalize: bool = False

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"actor_rollout_ref.actor.policy_loss.tau must be a number > 0, got {tau!r}")
        if not isinstance(self.length_normalize, bool):
            raise ValueError(
                "actor_rollout_ref.actor.policy_loss.length_normalize must be true or false, "
                f"got {self.length_normalize!r}"
            )
