"""Configs for the TRL adapter: the plugin's options, and the trainers' config classes built on TRL's own.

``K15Options`` holds what every trainer of the plugin shares (length penalty, samplers); it is mixed into TRL's
``GRPOConfig`` (``K15GRPOConfig``: TRL's GRPO loss, unchanged) and into ``RLOOConfig`` (``K15RLOOConfig``), and
``KimiMirrorDescentConfig`` adds the mirror-descent options on top of ``K15GRPOConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from trl import GRPOConfig, RLOOConfig

from k15_plugin.core.settings import K15Settings, flat_field


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class K15Options:
    r"""
    Options the plugin adds to TRL's trainers: TRL-style flat fields over
    [`~k15_plugin.core.settings.K15Settings`], which declares each one's default, allowed values and help.

    Each field names its setting (`flat_field("sampler.floor")`): `length_penalty_*` are the length penalty of section
    2.3.3 (`length_penalty_correct_threshold` is `correct_threshold`: a response is correct when the weighted sum of
    the task rewards reaches it); `sampler_type` is `sampler.name`, and `prioritized_*` / `curriculum_*` the other
    `sampler.*` settings (section 2.3.4); `rollout_*` and `repeat_*` are `rollout.*` and `rollout.repeat.*` (section
    2.6.2). `HfArgumentParser` shows each one's help.

    Partial rollouts in TRL: a trajectory longer than `rollout_segment_tokens` is cut there, kept in a buffer and
    continued from prompt + tokens so far in the next rollout batch, under the newer policy; a group trains once all
    its `num_generations` members have finished. The segment must divide `max_completion_length` (the cap over all
    segments). `rollout_max_iterations`: a trajectory still running after that many rollout batches is cut and trained
    as length-capped. `rollout_prefill_batches` `-1`: `max_completion_length / rollout_segment_tokens - 1` (at most
    `rollout_max_iterations - 1`); `0`: nothing is carried over between rollout batches. `rollout_loss_mask`
    `"latest"` (GRPO-family trainers only): only a trajectory's last segment is in the loss. A repeat-stopped
    trajectory counts as finished and incorrect: its task rewards are 0 and the `repeat_penalty` column holds
    `-repeat_penalty`.
    """

    length_penalty_weight: float = flat_field("length_penalty.weight")
    length_penalty_warmup_steps: int = flat_field("length_penalty.warmup_steps")
    length_penalty_ramp_steps: int = flat_field("length_penalty.ramp_steps")
    length_penalty_correct_threshold: float = flat_field("correct_threshold")
    sampler_type: str = flat_field("sampler.name")
    prioritized_floor: float = flat_field("sampler.floor")
    prioritized_priority: str = flat_field("sampler.priority")
    prioritized_prior: float = flat_field("sampler.prior")
    curriculum_difficulty_column: str = flat_field("sampler.difficulty_column")
    curriculum_schedule: str = flat_field("sampler.schedule")
    curriculum_switch_step: int = flat_field("sampler.switch_step")
    curriculum_hard_fraction: float = flat_field("sampler.hard_fraction")
    curriculum_start_fraction: float = flat_field("sampler.start_fraction")
    curriculum_ramp_steps: int = flat_field("sampler.ramp_steps")
    rollout_segment_tokens: int = flat_field("rollout.segment_tokens")
    rollout_max_iterations: int = flat_field("rollout.max_iterations")
    rollout_prefill_batches: int = flat_field("rollout.prefill_batches")
    rollout_loss_mask: str = flat_field("rollout.loss_mask")
    repeat_detection: bool = flat_field("rollout.repeat.detection")
    repeat_min_period: int = flat_field("rollout.repeat.min_period")
    repeat_max_period: int = flat_field("rollout.repeat.max_period")
    repeat_min_count: int = flat_field("rollout.repeat.min_count")
    repeat_min_span: int = flat_field("rollout.repeat.min_span")
    repeat_penalty: float = flat_field("rollout.repeat.penalty")

    def __post_init__(self):
        K15Settings.from_flat(self)  # every value against its rule, errors naming the flat field
        b, cap = self.rollout_segment_tokens, self.max_completion_length
        _require(
            b == 0 or (isinstance(cap, int) and b <= cap and cap % b == 0),
            f"rollout_segment_tokens={b} must divide max_completion_length={cap} (every segment but the last is full)",
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

    tau: float = flat_field("tau")
    log_z_estimator: str = flat_field("log_z_estimator")
    length_normalize: bool = flat_field("length_normalize")
    reset_optimizer_each_iteration: bool = flat_field("reset_optimizer_each_iteration")

    def __post_init__(self):
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
