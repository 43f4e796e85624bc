"""Configs for the TRL adapter: the plugin's options, and the trainers' config classes built on TRL's own.

``K15Options`` holds what every trainer of the plugin shares (length penalty, samplers); it is mixed into TRL's
``GRPOConfig`` (``K15GRPOConfig``: TRL's GRPO loss, unchanged) and into ``RLOOConfig`` (``K15RLOOConfig``), and
``KimiMirrorDescentConfig`` adds the mirror-descent options on top of ``K15GRPOConfig``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from trl import GRPOConfig, RLOOConfig

from k15_plugin.core.mirror_descent import ESTIMATORS

SAMPLERS = ("uniform", "curriculum", "prioritized")
ROLLOUT_LOSS_MASKS = ("all", "latest")
CURRICULUM_SCHEDULES = ("staged", "gradual")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class K15Options:
    r"""
    Options the plugin adds to TRL's trainers.

    > Length penalty (Kimi k1.5, section 2.3.3)

    length_penalty_weight (`float`, defaults to `0.0`):
        Weight of the length reward added to the task reward; `0` switches the penalty off.
    length_penalty_warmup_steps (`int`, defaults to `0`):
        Optimizer steps during which the penalty is off.
    length_penalty_ramp_steps (`int`, defaults to `0`):
        After the warm-up, steps over which the weight rises linearly to `length_penalty_weight` (`0`: at once).
    length_penalty_correct_threshold (`float`, defaults to `1.0`):
        A response counts as correct when the weighted sum of the task rewards reaches this value (for the length
        penalty and for the samplers' success rates).

    > Prompt sampling (section 2.3.4)

    sampler_type (`str`, defaults to `"uniform"`):
        `"uniform"` (TRL's own `RepeatSampler`), `"curriculum"` (by a difficulty column) or `"prioritized"`
        (probability proportional to 1 - success rate).
    prioritized_floor (`float`, defaults to `0.05`):
        Smallest weight a problem keeps, so solved problems are not starved.
    prioritized_prior (`float`, defaults to `0.5`):
        Success rate assumed for a problem not yet attempted.
    curriculum_difficulty_column (`str`, defaults to `"difficulty"`):
        Dataset column holding each problem's difficulty (higher is harder).
    curriculum_schedule (`str`, defaults to `"staged"`):
        `"staged"`: the whole set until `curriculum_switch_step`, then only the hardest `curriculum_hard_fraction`
        (the paper's ablation); `"gradual"`: start with the easiest `curriculum_start_fraction` and widen the pool
        linearly to the whole set over `curriculum_ramp_steps`.
    curriculum_switch_step (`int`, defaults to `0`):
        Staged schedule: optimizer step from which only hard problems are drawn.
    curriculum_hard_fraction (`float`, defaults to `0.5`):
        Staged schedule: fraction of the set, hardest first, that counts as hard.
    curriculum_start_fraction (`float`, defaults to `0.3`):
        Gradual schedule: fraction of the set, easiest first, drawn from at step 0.
    curriculum_ramp_steps (`int`, defaults to `100`):
        Gradual schedule: optimizer steps until the pool is the whole set.

    > Partial rollouts and repeat detection (section 2.6.2)

    rollout_segment_tokens (`int`, defaults to `0`):
        New tokens a trajectory may get per rollout batch; a longer one is cut there, kept in a buffer and continued
        from prompt + tokens so far in the next rollout batch, under the newer policy. A group trains once all its
        `num_generations` members have finished. Must divide `max_completion_length` (the cap over all segments).
        `0`: full rollouts (TRL's own generation).
    rollout_max_iterations (`int`, defaults to `0`):
        Rollout batches one trajectory may span; one still running after that many is cut and trained as
        length-capped. `0`: only `max_completion_length` caps it.
    rollout_prefill_batches (`int`, defaults to `-1`):
        Extra rollout batches of prompts the first rollout batch admits, so that trajectories can be in flight
        while others train (each rollout batch then admits and trains the same number of groups). `-1`:
        `max_completion_length / rollout_segment_tokens - 1` (at most `rollout_max_iterations - 1`). `0`: nothing
        is carried over between rollout batches (each generates until its own groups have finished: no stale
        tokens, and rows that finished early leave the later rounds).
    rollout_loss_mask (`str`, defaults to `"all"`):
        `"all"`: the loss covers every token of a trajectory, with pi_i's log-probs recomputed by the current policy;
        `"latest"`: only its last segment (earlier ones still condition it). GRPO-family trainers only.
    repeat_detection (`bool`, defaults to `False`):
        Stop a trajectory whose tokens end in `repeat_min_count` back-to-back copies of one block of
        `repeat_min_period`..`repeat_max_period` tokens spanning at least `repeat_min_span` tokens, checked after
        every segment (and inside vLLM's generation). A stopped trajectory counts as finished and incorrect: its task
        rewards are 0 and the `repeat_penalty` column holds `-repeat_penalty`.
    repeat_min_period, repeat_max_period, repeat_min_count, repeat_min_span (`int`, defaults to `16`, `1024`, `4`,
        `64`): the loop rule, see `repeat_detection`.
    repeat_penalty (`float`, defaults to `0.5`):
        Reward given to a repeat-stopped trajectory, negated (its own reward column, weight 1).
    """

    length_penalty_weight: float = field(
        default=0.0, metadata={"help": "Weight of the k1.5 length reward added to the task reward; 0 switches it off."}
    )
    length_penalty_warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps during which the length penalty is off (paper: a warm-up)."}
    )
    length_penalty_ramp_steps: int = field(
        default=0, metadata={"help": "Steps after the warm-up over which the weight rises linearly (0: at once)."}
    )
    length_penalty_correct_threshold: float = field(
        default=1.0,
        metadata={
            "help": "A response is correct (length penalty, sampler success rates) when the weighted sum of the task "
            "rewards is >= this value."
        },
    )
    sampler_type: str = field(default="uniform", metadata={"help": f"Prompt sampler, one of {list(SAMPLERS)}."})
    prioritized_floor: float = field(
        default=0.05,
        metadata={"help": "Prioritized sampler: smallest weight a problem keeps (so solved ones still appear)."},
    )
    prioritized_prior: float = field(
        default=0.5, metadata={"help": "Prioritized sampler: success rate assumed for problems not yet attempted."}
    )
    curriculum_difficulty_column: str = field(
        default="difficulty",
        metadata={"help": "Curriculum sampler: dataset column with the difficulty (higher is harder)."},
    )
    curriculum_schedule: str = field(
        default="staged", metadata={"help": f"Curriculum schedule, one of {list(CURRICULUM_SCHEDULES)}."}
    )
    curriculum_switch_step: int = field(
        default=0, metadata={"help": "Staged curriculum: optimizer step from which only hard problems are drawn."}
    )
    curriculum_hard_fraction: float = field(
        default=0.5, metadata={"help": "Staged curriculum: fraction of the set, hardest first, that counts as hard."}
    )
    curriculum_start_fraction: float = field(
        default=0.3, metadata={"help": "Gradual curriculum: fraction of the set, easiest first, drawn from at step 0."}
    )
    curriculum_ramp_steps: int = field(
        default=100, metadata={"help": "Gradual curriculum: optimizer steps until the pool is the whole set."}
    )

    rollout_segment_tokens: int = field(
        default=0,
        metadata={"help": "Partial rollouts: new tokens per trajectory per rollout batch (0: full rollouts)."},
    )
    rollout_max_iterations: int = field(
        default=0, metadata={"help": "Partial rollouts: rollout batches one trajectory may span (0: no limit)."}
    )
    rollout_prefill_batches: int = field(
        default=-1,
        metadata={"help": "Partial rollouts: extra batches of prompts admitted at the start (-1: L/segment - 1)."},
    )
    rollout_loss_mask: str = field(
        default="all",
        metadata={"help": f"Partial rollouts: tokens in the loss, one of {list(ROLLOUT_LOSS_MASKS)}."},
    )
    repeat_detection: bool = field(default=False, metadata={"help": "Stop and penalize looping generations."})
    repeat_min_period: int = field(default=16, metadata={"help": "Repeat detection: shortest block length."})
    repeat_max_period: int = field(default=1024, metadata={"help": "Repeat detection: longest block length."})
    repeat_min_count: int = field(default=4, metadata={"help": "Repeat detection: back-to-back copies needed."})
    repeat_min_span: int = field(default=64, metadata={"help": "Repeat detection: fewest tokens a loop spans."})
    repeat_penalty: float = field(default=0.5, metadata={"help": "Repeat detection: penalty (reward -penalty)."})

    def __post_init__(self):
        for name in ("rollout_segment_tokens", "rollout_max_iterations"):
            v = getattr(self, name)
            _require(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an integer >= 0, got {v!r}"
            )
        _require(
            isinstance(self.rollout_prefill_batches, int) and self.rollout_prefill_batches >= -1,
            f"rollout_prefill_batches must be an integer >= -1 (-1: automatic), got {self.rollout_prefill_batches!r}",
        )
        b, cap = self.rollout_segment_tokens, self.max_completion_length
        _require(
            b == 0 or (isinstance(cap, int) and b <= cap and cap % b == 0),
            f"rollout_segment_tokens={b} must divide max_completion_length={cap} (every segment but the last is full)",
        )
        _require(
            self.rollout_loss_mask in ROLLOUT_LOSS_MASKS,
            f"rollout_loss_mask must be one of {list(ROLLOUT_LOSS_MASKS)}, got {self.rollout_loss_mask!r}",
        )
        for name, low in (("repeat_min_period", 1), ("repeat_min_count", 2), ("repeat_min_span", 1)):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= low, f"{name} must be an integer >= {low}, got {v!r}")
        _require(
            isinstance(self.repeat_max_period, int) and self.repeat_max_period >= self.repeat_min_period,
            f"repeat_max_period must be an integer >= repeat_min_period={self.repeat_min_period}, got "
            f"{self.repeat_max_period!r}",
        )
        p = self.repeat_penalty
        _require(
            isinstance(p, (int, float)) and math.isfinite(p) and p >= 0,
            f"repeat_penalty must be a number >= 0, got {p!r}",
        )
        if b or self.repeat_detection:
            what = "rollout_segment_tokens" if b else "repeat_detection"
            _require(
                not (self.use_vllm and self.vllm_mode != "colocate"),
                f"{what} does not support vllm_mode={self.vllm_mode!r} yet (use colocate)",
            )
            _require(
                not getattr(self, "use_transformers_continuous_batching", False),
                f"{what} does not support use_transformers_continuous_batching",
            )
            # Per-call sampling rules would sample a trajectory continued over several calls differently; vLLM's
            # frequency/presence penalties count output tokens only, so a continued prefix would reset them.
            per_call = {
                "min_new_tokens",
                "min_length",
                "max_length",
                "exponential_decay_length_penalty",
                "frequency_penalty",
                "presence_penalty",
            } & set(self.generation_kwargs or {})
            _require(
                not per_call,
                f"{what}: generation_kwargs {sorted(per_call)} act per generate call, so a "
                "trajectory continued over several calls would be sampled differently; remove them",
            )
        w = self.length_penalty_weight
        _require(
            isinstance(w, (int, float)) and math.isfinite(w) and w >= 0,
            f"length_penalty_weight must be a number >= 0, got {w!r}",
        )
        for name in ("length_penalty_warmup_steps", "length_penalty_ramp_steps", "curriculum_switch_step"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
        _require(
            self.curriculum_ramp_steps >= 1, f"curriculum_ramp_steps must be >= 1, got {self.curriculum_ramp_steps!r}"
        )
        _require(
            math.isfinite(self.length_penalty_correct_threshold),
            f"length_penalty_correct_threshold must be finite, got {self.length_penalty_correct_threshold!r}",
        )
        _require(
            self.sampler_type in SAMPLERS, f"sampler_type must be one of {list(SAMPLERS)}, got {self.sampler_type!r}"
        )
        _require(
            self.curriculum_schedule in CURRICULUM_SCHEDULES,
            f"curriculum_schedule must be one of {list(CURRICULUM_SCHEDULES)}, got {self.curriculum_schedule!r}",
        )
        _require(
            0 < self.prioritized_floor <= 1, f"prioritized_floor must be in (0, 1], got {self.prioritized_floor!r}"
        )
        _require(
            0 <= self.prioritized_prior <= 1, f"prioritized_prior must be in [0, 1], got {self.prioritized_prior!r}"
        )
        for name in ("curriculum_hard_fraction", "curriculum_start_fraction"):
            v = getattr(self, name)
            _require(0 < v <= 1, f"{name} must be in (0, 1], got {v!r}")
        super().__post_init__()


@dataclass
class K15GRPOConfig(K15Options, GRPOConfig):
    """TRL's ``GRPOConfig`` plus the plugin's length penalty and samplers; the GRPO loss itself is TRL's."""


@dataclass
class K15RLOOConfig(K15Options, RLOOConfig):
    """TRL's ``RLOOConfig`` plus the plugin's length penalty and samplers; the RLOO loss itself is TRL's."""

    def __post_init__(self):
        _require(
            self.rollout_loss_mask == "all",
            f"rollout_loss_mask={self.rollout_loss_mask!r} is not supported by RLOO (its loss has no per-token "
            "mask): use 'all'",
        )
        super().__post_init__()


# GRPOConfig options the mirror-descent loss has no use for (it has its own loss, no clipping, no reference model, no
# entropy terms, its own baseline): a non-default value is refused rather than silently ignored.
_UNUSED_BY_MIRROR_DESCENT = {
    "beta": "mirror descent regularises towards pi_i through tau, not towards a fixed reference model",
    "loss_type": "the mirror-descent loss replaces TRL's loss types",
    "epsilon": "the mirror-descent loss has no ratio clipping (the squared term keeps updates near pi_i)",
    "epsilon_high": "the mirror-descent loss has no ratio clipping",
    "delta": "the mirror-descent loss has no ratio clipping",
    "scale_rewards": "the baseline is tau*log Z (log_z_estimator); rewards are not scaled",
    "importance_sampling_level": "the mirror-descent loss is on sequence log-probs, it has no PPO ratio",
    "multi_objective_aggregation": "rewards enter as their weighted sum r_j (reward_weights)",
    "top_entropy_quantile": "the mirror-descent loss trains on every completion token",
    "entropy_coef": "the mirror-descent objective has no entropy bonus",
    "use_adaptive_entropy": "the mirror-descent objective has no entropy bonus",
    "sync_ref_model": "there is no reference model (beta = 0)",
    "off_policy_mask_threshold": "the squared term, not a mask, handles off-policy updates",
    "use_bias_correction_kl": "there is no KL term to a reference model (beta = 0)",
}
_GRPO_DEFAULTS = {f.name: f.default for f in fields(GRPOConfig) if f.name in _UNUSED_BY_MIRROR_DESCENT}
_SEQUENCE_IS_MODES = ("sequence_mask", "sequence_truncate")


@dataclass
class KimiMirrorDescentConfig(K15GRPOConfig):
    r"""
    Configuration for [`KimiMirrorDescentTrainer`]: online policy mirror descent (Kimi k1.5, section 2.3).

    Updates per rollout batch use TRL's own fields: a rollout batch of `generation_batch_size` completions is split
    into `steps_per_generation` micro-batches of `per_device_train_batch_size` (per process),
    `gradient_accumulation_steps` micro-batches make one optimizer step, and the whole batch is passed over
    `num_iterations` times. The paper takes several optimizer steps per rollout batch against pi_i
    (`num_iterations * steps_per_generation > gradient_accumulation_steps`); with exactly one, and the optimizer reset
    on, every update is Adam's first step (`lr * sign(g)`) and tau has no effect, which the trainer warns about.

    GRPOConfig options the loss has no use for (`beta`, `loss_type`, `epsilon*`, `delta`, `scale_rewards`,
    `importance_sampling_level`, `multi_objective_aggregation`, entropy options, `sync_ref_model`,
    `off_policy_mask_threshold`, `use_bias_correction_kl`) must keep their defaults. With vLLM generation, TRL's
    importance-sampling correction (on by default) weights each sample's loss by pi_i / pi_vllm; only its sequence-level
    modes apply to a sequence-level loss.

    tau (`float`, defaults to `1.0`):
        Weight of the KL term towards the reference policy pi_i. The paper gives no value; on the demo task 1.0 was
        stable with 4 updates per batch and 0.1 was not.
    log_z_estimator (`str`, defaults to `"mean"`):
        Estimate of tau * log Z: `"mean"` (the group's mean reward, the paper's practical choice) or
        `"log_mean_exp"` (tau * log mean_j exp(r_j / tau)).
    length_normalize (`bool`, defaults to `False`):
        Divide each sequence log-prob (and log-ratio) by the completion's length. Off: the paper's sum.
    reset_optimizer_each_iteration (`bool`, defaults to `True`):
        Clear the optimizer state at the first update of every new rollout batch, as the paper does; the
        learning-rate schedule is untouched.
    """

    tau: float = field(default=1.0, metadata={"help": "KL weight tau of the mirror-descent objective (> 0)."})
    log_z_estimator: str = field(
        default="mean", metadata={"help": f"Estimator of tau*log Z, one of {list(ESTIMATORS)}."}
    )
    length_normalize: bool = field(
        default=False,
        metadata={"help": "Divide sequence log-probs by the completion length (default: the paper's sum)."},
    )
    reset_optimizer_each_iteration: bool = field(
        default=True, metadata={"help": "Clear the optimizer state at each new rollout batch (paper: yes)."}
    )

    def __post_init__(self):
        _require(
            isinstance(self.tau, (int, float)) and math.isfinite(self.tau) and self.tau > 0,
            f"tau must be a number > 0, got {self.tau!r}",
        )
        _require(
            self.log_z_estimator in ESTIMATORS,
            f"log_z_estimator must be one of {list(ESTIMATORS)}, got {self.log_z_estimator!r}",
        )
        for name, why in _UNUSED_BY_MIRROR_DESCENT.items():
            value, default = getattr(self, name), _GRPO_DEFAULTS[name]
            if name == "scale_rewards" and isinstance(value, bool):  # GRPOConfig's aliases: True "group", False "none"
                value = "group" if value else "none"
            _require(
                value == default, f"{name}={value!r} is not used by KimiMirrorDescent ({why}); leave it at {default!r}"
            )
        _require(
            not self.vllm_importance_sampling_correction or self.vllm_importance_sampling_mode in _SEQUENCE_IS_MODES,
            f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} is per token; the mirror-descent "
            f"loss is per sequence: use one of {list(_SEQUENCE_IS_MODES)} or vllm_importance_sampling_correction=False",
        )
        super().__post_init__()
