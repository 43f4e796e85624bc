"""What the OpenRLHF adapter's classes read: ``args.k15`` on every Ray actor (no OpenRLHF import here).

``k15-train host=openrlhf`` builds it from the composed Hydra config and attaches it to OpenRLHF's parsed arguments
(:mod:`k15_plugin.openrlhf.launch`); OpenRLHF hands ``args`` to every actor inside its strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from k15_plugin.host_options import LengthPenaltyOptions, SamplerOptions

ALGORITHMS = ("kimi_md", "grpo", "dr_grpo", "rloo", "ppo")


@dataclass(frozen=True)
class OpenRLHFSettings:
    algorithm: str = "kimi_md"  # kimi_md: the k1.5 loss and baseline; the others are OpenRLHF's own
    tau: float = 1.0  # KL weight of the mirror-descent objective, b = tau log Z
    log_z_estimator: str = "mean"  # mean or log_mean_exp
    length_normalize: bool = False  # divide sequence log-probs by their length (the paper sums)
    correct_threshold: float = 1.0  # a score >= this counts as correct (length penalty, sampler statistics)
    reset_optimizer_each_iteration: bool = True  # zero the optimizer's moments before each rollout batch's update
    difficulty_column: str = "difficulty"  # curriculum: column of the prompt dataset
    length_penalty: LengthPenaltyOptions = field(default_factory=LengthPenaltyOptions)
    sampler: SamplerOptions = field(default_factory=SamplerOptions)

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
