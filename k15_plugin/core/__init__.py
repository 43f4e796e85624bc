"""The paper's math: torch and the standard library only, no host imports."""

from k15_plugin.core.length_penalty import length_penalty_weight, length_reward
from k15_plugin.core.mirror_descent import (
    ESTIMATORS,
    log_partition_estimate,
    mirror_descent_advantages,
    mirror_descent_loss,
    mirror_descent_terms,
    sequence_logps,
)
from k15_plugin.core.off_policy import (
    CORRECTIONS,
    effective_sample_size,
    gradient_weighted,
    importance_log_ratios,
    off_policy_weights,
    outside_share,
)
from k15_plugin.core.optimizer import clear_optimizer_state, zero_optimizer_state
from k15_plugin.core.partial_rollouts import PartialRolloutBuffer
from k15_plugin.core.prompt_sampler import (
    CurriculumPromptSampler,
    PrioritizedPromptSampler,
    PromptSampler,
    build_prompt_sampler,
)
from k15_plugin.core.repeats import RepeatDetector, RepeatRule, first_repeat
from k15_plugin.core.sampling import (
    CURRICULUM_SCHEDULES,
    CurriculumPool,
    SuccessRateTracker,
    curriculum_fraction,
    curriculum_pool,
    prioritized_weights,
)
from k15_plugin.core.settings import K15Settings

__all__ = [
    "CORRECTIONS",
    "CURRICULUM_SCHEDULES",
    "ESTIMATORS",
    "CurriculumPool",
    "CurriculumPromptSampler",
    "K15Settings",
    "PartialRolloutBuffer",
    "PrioritizedPromptSampler",
    "PromptSampler",
    "RepeatDetector",
    "RepeatRule",
    "SuccessRateTracker",
    "build_prompt_sampler",
    "clear_optimizer_state",
    "curriculum_fraction",
    "curriculum_pool",
    "effective_sample_size",
    "first_repeat",
    "gradient_weighted",
    "importance_log_ratios",
    "length_penalty_weight",
    "length_reward",
    "log_partition_estimate",
    "mirror_descent_advantages",
    "mirror_descent_loss",
    "mirror_descent_terms",
    "off_policy_weights",
    "outside_share",
    "prioritized_weights",
    "sequence_logps",
    "zero_optimizer_state",
]
