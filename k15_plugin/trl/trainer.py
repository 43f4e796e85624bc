"""TRL trainers: Kimi k1.5 mirror descent, and TRL's own GRPO/RLOO with the plugin's length penalty and samplers.

The math lives in :mod:`k15_plugin.core`; this module only moves tensors between TRL and those functions.

Private TRL 1.16 methods overridden here (pinned in pyproject.toml):

* ``_calculate_rewards`` (GRPOTrainer, RLOOTrainer): after TRL has gathered every process's rewards, fill the
  length-penalty column on whole groups and feed the sampler's success statistics.
* ``_set_signature_columns_if_needed`` (GRPOTrainer, RLOOTrainer): keep the sampler's row-index column when
  ``remove_unused_columns=True``.
* ``_generate_and_score_completions`` (GRPOTrainer): replace TRL's advantages by r - b from the mirror-descent baseline,
  computed on the gathered generation batch before TRL shuffles and splits it; reset the optimizer per rollout batch.
  (GRPOTrainer, RLOOTrainer): with an ``environment_factory``, carry the sampler's row index beside the rows, so
  the environment's ``reset(**row)`` sees only the dataset's own fields.
* ``_compute_loss`` (GRPOTrainer): the mirror-descent loss on sequence log-probs; for ``K15GRPOTrainer``, TRL's loss
  with the off-policy correction's per-token weights folded into (B, T) advantages (a shape TRL's loss accepts).
* ``_compute_loss`` and ``_get_per_token_logps_and_entropies`` (RLOOTrainer): the off-policy correction's per-token
  weights on the gradient of RLOO's sequence log-probs, and pi_i's per-token log-probs kept from RLOO's own
  generation-time forward.
* ``_get_train_sampler``, ``_save_checkpoint``, ``_load_optimizer_and_scheduler``: the plugin's samplers and their
  checkpointed state, see :mod:`k15_plugin.trl.samplers`.
* Partial rollouts and repeat detection: see :mod:`k15_plugin.trl.partial`.

Vision-language rows (a conversational prompt and an ``image`` or ``images`` column) take TRL's own path; a dataset
mixing rows with and without an image, which TRL 1.16 cannot batch, is refused at construction
(:func:`check_image_rows`).
"""

from __future__ import annotations

import logging
import math

import pyarrow.compute
import torch
from accelerate.utils import gather
from datasets import Dataset
from trl import GRPOTrainer, RLOOTrainer
from trl.trainer.utils import get_config_model_id

from k15_plugin.core import (
    gradient_weighted,
    length_penalty_weight,
    length_reward,
    mirror_descent_advantages,
    mirror_descent_terms,
    sequence_logps,
)
from k15_plugin.core.optimizer import clear_optimizer_state, zero_optimizer_state
from k15_plugin.trl.config import K15GRPOConfig, K15RLOOConfig, KimiMirrorDescentConfig
from k15_plugin.trl.partial import TOKEN_WEIGHTS, K15PartialRolloutMixin
from k15_plugin.trl.samplers import K15SamplerMixin, check_sampler_dataset
from k15_plugin.trl.vllm_cpu import keep_linear_weights_on_vllm_cpu

logger = logging.getLogger(__name__)

INDEX_COLUMN = "k15_index"
LENGTH_PENALTY_NAME = "length_penalty"
REPEAT_PENALTY_NAME = "repeat_penalty"


class LengthPenaltySlot:
    """Placeholder reward function that reserves TRL's reward column for the length penalty.

    TRL calls reward functions on each process's slice only, but the length reward needs whole groups; so this
    returns ``None`` (no opinion: a completion no task reward can score stays unscorable, and TRL still warns about
    it), and the trainer fills the column after TRL has gathered all processes' rewards. Reserving a real column
    keeps TRL's per-function logging (``rewards/length_penalty/mean``, the unweighted length reward) and weighting
    (``reward_weights[-1]`` is the penalty's weight at the current step, so TRL's ``normalize_then_sum`` honours it).
    """

    __name__ = LENGTH_PENALTY_NAME

    def __call__(self, completions, **kwargs) -> list[float | None]:
        return [None] * len(completions)


class RepeatPenaltySlot(LengthPenaltySlot):
    """Reserves the reward column of the repeat penalty (-``repeat_penalty`` for a trajectory stopped in a loop, else
    0), filled by the trainer, which knows how each trajectory ended; logged as ``rewards/repeat_penalty/mean``."""

    __name__ = REPEAT_PENALTY_NAME


def check_image_rows(dataset, name: str = "train_dataset") -> None:
    """Refuse a dataset that mixes rows with and without an image, which TRL 1.16 cannot batch.

    For a row without an image GRPOTrainer (and RLOOTrainer) put ``None`` in the batch's image list and hand that list
    to the processor (``processing_class(images=..., text=...)`` for the forward pass), which raises ``TypeError: only
    a single or a list of entries is supported``, mid-training. A row without an image is a null ``image``, or a
    null ``images`` or, beside rows with images, an empty ``images`` (an ``images`` column of empty lists only is a
    text-only dataset, which TRL handles). Only a ``datasets.Dataset`` (or a dict of them) is checked, from its Arrow
    columns, without decoding an image.
    """
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_image_rows(part, f"{name}[{key!r}]")
        return
    if not isinstance(dataset, Dataset):
        return
    for column in ("image", "images"):
        if column not in dataset.column_names:
            continue
        data = dataset.data.column(column)
        missing = data.null_count
        if column == "images":
            lengths = pyarrow.compute.list_value_length(data).fill_null(0)
            empty = len(dataset) - pyarrow.compute.sum(pyarrow.compute.greater(lengths, 0)).as_py()
            missing = empty if empty < len(dataset) or missing else 0  # all empty lists: a text-only dataset
        if missing:
            raise ValueError(
                f"{name} has {missing} of {len(dataset)} rows without an image (column {column!r}): TRL 1.16's "
                "GRPOTrainer/RLOOTrainer cannot mix text-only and image rows (it passes None image entries to the "
                "processor, which raises); give every row an image, or train the text-only rows separately"
            )


def _has_image_column(dataset) -> bool:
    """Whether ``dataset`` (or one part of a dict of datasets) has an ``image`` or ``images`` column."""
    parts = dataset.values() if isinstance(dataset, dict) else [dataset]
    return any(getattr(d, "column_names", None) and {"image", "images"} & set(d.column_names) for d in parts)


class K15TrainerMixin(K15PartialRolloutMixin, K15SamplerMixin):
    """What every trainer of the plugin adds to its TRL base: the length penalty, the samplers' statistics, partial
    rollouts and repeat detection.

    Place it before the TRL trainer in the bases; subclasses name their config class in ``_k15_config_class``.
    """

    _k15_config_class: type = K15GRPOConfig
    _k15_config_suffix = "GRPO"

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, *rest, **kwargs):
        if args is None:  # what TRL's trainers do: a default config named after the model
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = self._k15_config_class(f"{name.split('/')[-1]}-{self._k15_config_suffix}")
        if not isinstance(args, self._k15_config_class):
            raise ValueError(
                f"{type(self).__name__} needs a {self._k15_config_class.__name__} (it carries the plugin's options), "
                f"got {type(args).__name__}"
            )
        check_image_rows(train_dataset)
        check_image_rows(kwargs.get("eval_dataset", rest[0] if rest else None), "eval_dataset")
        if args.rollout_segment_tokens and _has_image_column(train_dataset):
            raise ValueError(
                f"rollout_segment_tokens={args.rollout_segment_tokens} (partial rollouts) with image rows: segments "
                "are generated from each trajectory's token ids alone, without the image; train image prompts with "
                "full rollouts (rollout_segment_tokens=0)"
            )
        if train_dataset is None and args.sampler_type != "uniform":
            # TRL 1.16 trains without a dataset only when an environment_factory owns the data: its rows are then
            # identical empty placeholders and reset() picks each problem, so there is nothing to prioritize or order.
            raise ValueError(
                f"sampler_type={args.sampler_type!r} needs a train_dataset: without one (environment_factory owning "
                "the data) TRL feeds identical placeholder rows and the environment's reset() picks each problem; "
                "pass the problems as a train_dataset (reset(**row) receives each row) or use sampler_type='uniform'"
            )
        if train_dataset is not None and args.sampler_type != "uniform":
            check_sampler_dataset(args.sampler_type, train_dataset)
            # The sampler's statistics are keyed by dataset row; the row index travels with the batch as a column
            # (reward functions receive it as a keyword they can ignore).
            if INDEX_COLUMN in train_dataset.column_names:
                train_dataset = train_dataset.remove_columns(INDEX_COLUMN)
            train_dataset = train_dataset.add_column(INDEX_COLUMN, list(range(len(train_dataset))))
        if args.use_vllm and args.vllm_mode == "colocate":
            keep_linear_weights_on_vllm_cpu()  # before TRL builds the engine; no-op unless vLLM runs on its CPU build
        super().__init__(model, reward_funcs, args, train_dataset, *rest, **kwargs)
        n = self._k15_num_task_funcs = len(self.reward_funcs)  # TRL's environment columns included
        best = float(self.reward_weights[:n].clamp(min=0).sum())
        if args.length_penalty_correct_threshold > best and (
            args.length_penalty_weight > 0 or args.sampler_type == "prioritized"
        ):
            logger.warning(
                "length_penalty_correct_threshold=%s is above the sum of the positive task reward weights (%s): with "
                "rewards in [0, 1] no completion ever counts as correct (length penalty, sampler success rates)",
                args.length_penalty_correct_threshold,
                best,
            )
        self._k15_setup_partial()
        self._k15_repeat_column = None
        if args.repeat_detection:  # a column of its own, before the length penalty's (which stays last)
            self._k15_repeat_column = len(self.reward_funcs)
            self.reward_funcs.append(RepeatPenaltySlot())
            self.reward_func_names.append(REPEAT_PENALTY_NAME)
            self.reward_processing_classes.append(None)
            self.reward_weights = torch.cat([self.reward_weights, torch.ones(1)])
        self._k15_skip_sampler_update = False
        self._k15_length_penalty = args.length_penalty_weight > 0
        if self._k15_length_penalty and self._k15_group_std_scaling():
            logger.warning(
                "length_penalty_weight=%s with scale_rewards='group': GRPO divides each group's rewards by their "
                "std, so in a group whose answers are all right or all wrong the length reward alone sets the scale "
                "and the weight cancels out. For a weight that means the same as in k1.5 use scale_rewards='none' "
                "(Dr. GRPO) or 'batch'.",
                args.length_penalty_weight,
            )
        if self._k15_length_penalty:
            # Same pattern TRL uses for environment rewards (GRPOTrainer.__init__): one more column; its weight is
            # set to the penalty's scheduled weight each time the column is filled.
            self.reward_funcs.append(LengthPenaltySlot())
            self.reward_func_names.append(LENGTH_PENALTY_NAME)
            self.reward_processing_classes.append(None)
            self.reward_weights = torch.cat([self.reward_weights, torch.zeros(1)])
        self._k15_gathered_rewards = None
        self._k15_scorable = None
        self._k15_row_index = None

    # Overrides GRPOTrainer/RLOOTrainer._set_signature_columns_if_needed: keep the row index the sampler reads.
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._k15_sampler_type() != "uniform" and INDEX_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, INDEX_COLUMN]

    # Overrides GRPOTrainer/RLOOTrainer._generate_and_score_completions (outermost of the plugin's wrappers but the
    # mirror-descent one): TRL passes every field of a row to the environment's reset(**row), and the sampler's row
    # index is the plugin's bookkeeping, not a field of the user's data. With an environment_factory it travels
    # beside the rows instead (reward functions then do not receive it either).
    def _generate_and_score_completions(self, inputs):
        if getattr(self, "environment_factories", None) is None or INDEX_COLUMN not in inputs[0]:
            return super()._generate_and_score_completions(inputs)
        self._k15_row_index = [x[INDEX_COLUMN] for x in inputs]
        rows = [{k: v for k, v in x.items() if k != INDEX_COLUMN} for x in inputs]
        try:
            return super()._generate_and_score_completions(rows)
        finally:
            self._k15_row_index = None

    def _k15_group_std_scaling(self) -> bool:
        return getattr(self.args, "scale_rewards", "none") == "group"

    def _k15_sampler_type(self) -> str:
        return getattr(self.args, "sampler_type", "uniform")

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # (N, F)
        device = rewards_per_func.device
        training = self.model.training
        n = self._k15_num_task_funcs
        local_lengths = torch.tensor([len(ids) for ids in completion_ids_list], device=device)  # (B,) tokens
        repeats = None
        if self._k15_repeat_column is not None:
            # A trajectory stopped in a loop is finished and incorrect: task rewards 0, the penalty in its own column,
            # and, for the length penalty, the full length it was heading for (so it never sets a group's minimum).
            replay = self._k15_replay or ()
            local = torch.tensor([r.status == "repeat" for r in replay] or [False] * len(inputs), device=device)
            repeats = gather(local.long()).bool()  # (N,)
            rewards_per_func[:, :n] = rewards_per_func[:, :n].masked_fill(repeats[:, None], 0.0)
            penalty = -self.args.repeat_penalty * repeats.to(rewards_per_func.dtype)
            rewards_per_func[:, self._k15_repeat_column] = penalty
            local_lengths = local_lengths.masked_fill(local, self.max_completion_length)
            if training:
                self._metrics["train"]["k15/repeat/rate"].append(repeats.float().mean().item())
        task = rewards_per_func[:, :n]  # (N, n)
        scorable = ~torch.isnan(task).all(dim=1)  # (N,) some task reward function scored it
        task_reward = (task * self.reward_weights[:n].to(device)).nansum(dim=1)  # (N,)
        correct = (task_reward >= self.args.length_penalty_correct_threshold) & scorable  # (N,)
        if self._k15_length_penalty:
            lengths = gather(local_lengths)  # (N,) whole groups, in the same order as rewards_per_func
            k = self.num_generations if training else self.num_generations_eval
            a = self.args
            weight = length_penalty_weight(
                self.state.global_step,
                a.length_penalty_weight,
                a.length_penalty_warmup_steps,
                a.length_penalty_ramp_steps,
            )
            lam = length_reward(lengths, correct, k, scorable).to(rewards_per_func.dtype)  # (N,)
            rewards_per_func[:, -1] = lam.masked_fill(~scorable, math.nan)
            self.reward_weights[-1] = weight  # TRL weights (and, for normalize_then_sum, normalises) the column
            metrics = self._metrics["train" if training else "eval"]
            metrics["length_penalty/weight"].append(weight)
            # Groups with no correct answer only see min(0, lambda), which favours the shortest wrong answer: the
            # collapse the paper's warm-up guards against. Logged so a run can see it coming.
            metrics["length_penalty/all_wrong_groups"].append((~correct.view(-1, k).any(dim=1)).float().mean().item())
            metrics["length_penalty/all_correct_groups"].append(correct.view(-1, k).all(dim=1).float().mean().item())
        sampler = getattr(self, "_k15_sampler", None)
        if self._k15_skip_sampler_update:
            self._k15_skip_sampler_update = False  # a re-emitted rollout batch after a resume: already counted
        elif training and sampler is not None:
            row_index = self._k15_row_index or [x[INDEX_COLUMN] for x in inputs]
            local_index = torch.tensor(row_index, device=device)  # (B,)
            sampler.update(gather(local_index).cpu(), correct.cpu(), scored=scorable.cpu())
        self._k15_gathered_rewards = rewards_per_func
        self._k15_scorable = scorable
        return rewards_per_func


class K15GRPOTrainer(K15TrainerMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` (its loss unchanged) with the plugin's length penalty and samplers, for comparisons."""

    _tag_names = ["trl", "grpo", "k15-plugin"]

    def __init__(self, model, reward_funcs=None, args: K15GRPOConfig | None = None, *rest, **kwargs):
        super().__init__(model, reward_funcs, args, *rest, **kwargs)

    def _compute_loss(self, model, inputs):
        """TRL's loss; with partial rollouts' off-policy correction, each token's advantage multiplied by its weight
        (a (B, T) advantage, which TRL's loss supports): for w >= 0, -min(c1 A w, c2 A w) = -w min(c1 A, c2 A), so
        this is TRL's per-token policy loss times w, as its own vLLM importance weights are; a KL term to a reference
        model (``beta``) stays unweighted."""
        weights = inputs.get(TOKEN_WEIGHTS)  # (B, T) or None
        if weights is not None:
            advantages = inputs["advantages"]  # (B,)
            inputs = {**inputs, "advantages": advantages.view(-1, 1) * weights}  # (B, T)
        return super()._compute_loss(model, inputs)


class K15RLOOTrainer(K15TrainerMixin, RLOOTrainer):
    """TRL's ``RLOOTrainer`` (its loss unchanged) with the plugin's length penalty and samplers, for comparisons."""

    _tag_names = ["trl", "rloo", "k15-plugin"]
    _k15_returns_logprobs = False  # RLOOTrainer._generate_single_turn returns the completion ids only
    _k15_config_class = K15RLOOConfig
    _k15_config_suffix = "RLOO"

    def __init__(self, model, reward_funcs=None, args: K15RLOOConfig | None = None, *rest, **kwargs):
        self._k15_loss_weights = None  # (B, T) during a _compute_loss call with an off-policy correction
        self._k15_pi_i = None  # a list while _generate_and_score_completions runs: pi_i's per-token log-probs
        super().__init__(model, reward_funcs, args, *rest, **kwargs)

    def _generate_and_score_completions(self, inputs):
        """RLOO's rollout, keeping the per-token log-probs of its first forward (pi_i, of which RLOO keeps only the
        sequence sum) for the off-policy correction."""
        self._k15_pi_i = []
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._k15_pi_i = None

    def _k15_pi_i_logps(self, output: dict) -> torch.Tensor | None:
        """pi_i's per-token log-probs from RLOO's own generation-time forward (always made)."""
        return self._k15_pi_i[0] if self._k15_pi_i else None

    def _compute_loss(self, model, inputs):
        """RLOO's loss; with partial rollouts' off-policy correction, the per-token log-probs it sums carry each
        token's weight on their gradient (:func:`k15_plugin.core.gradient_weighted`): the sequence log-prob, the
        ratio to pi_i and its clipping keep their values, and the gradient of -A c1 logp becomes -A c1 sum_t w_t
        grad log pi(y_t)."""
        self._k15_loss_weights = inputs.get(TOKEN_WEIGHTS)  # (B, T) or None
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._k15_loss_weights = None

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        """RLOO's per-token log-probs; the first of a rollout is kept as pi_i, and during a corrected loss they carry
        the correction's weights on their gradient."""
        logps, *rest = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._k15_pi_i is not None and not self._k15_pi_i:
            self._k15_pi_i.append(logps.detach())  # (B, T) RLOO's first forward of a rollout: the current policy
        if self._k15_loss_weights is not None:
            logps = gradient_weighted(logps, self._k15_loss_weights)  # (B, T)
        return (logps, *rest)


class KimiMirrorDescentTrainer(K15GRPOTrainer):
    """Online policy mirror descent of Kimi k1.5 (arXiv 2501.12599, section 2.3) on TRL's GRPO machinery.

    TRL generates k = ``num_generations`` completions per prompt and gathers the rewards; per sample the loss is

        -(r_j - b) * log pi_theta(y_j|x) + tau/2 * (log pi_theta(y_j|x) - log pi_i(y_j|x))^2

    on sequence log-probs (:func:`k15_plugin.core.mirror_descent_terms`), with b = tau*log Z estimated per group
    (``log_z_estimator``) and log pi_i the log-probs of the policy that generated the batch. There is no value network
    and no fixed reference model (``beta`` must stay 0). Each rollout batch feeds
    ``num_iterations * steps_per_generation / gradient_accumulation_steps`` optimizer steps; the squared term keeps
    the later ones close to pi_i, and the optimizer state is reset before the first
    (``reset_optimizer_each_iteration``).
    With vLLM generation, TRL's importance-sampling ratio pi_i / pi_vllm weights each sample's loss. With partial
    rollouts, ``rollout_correction`` weights the policy-gradient term of tokens from older policies per token
    (:mod:`k15_plugin.core.off_policy`); the squared term keeps pi_i as its anchor.
    """

    _tag_names = ["trl", "k15-plugin", "kimi-mirror-descent"]
    _name = "KimiMirrorDescent"
    _k15_config_class = KimiMirrorDescentConfig
    _k15_config_suffix = "KimiMD"

    def __init__(self, model, reward_funcs=None, args: KimiMirrorDescentConfig | None = None, *rest, **kwargs):
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        a = self.args
        # Micro-batches per rollout batch; above gradient_accumulation_steps a rollout batch feeds several optimizer
        # steps and pi_i's log-probs must come from the generation pass. TRL computes them exactly when
        # gradient_accumulation_steps is not a multiple of it (or for vLLM importance sampling); _compute_loss checks.
        self._k15_generate_every = a.steps_per_generation * self.num_iterations
        self._k15_needs_old_logps = a.gradient_accumulation_steps % self._k15_generate_every != 0
        if a.reset_optimizer_each_iteration and self._k15_generate_every <= a.gradient_accumulation_steps:
            logger.warning(
                "reset_optimizer_each_iteration=True with one optimizer step per rollout batch (num_iterations=%d x "
                "steps_per_generation=%d <= gradient_accumulation_steps=%d): every update is Adam's first, "
                "lr * sign(gradient), so gradient clipping, the loss scale and tau have no effect. Take several steps "
                "per rollout batch (steps_per_generation or num_iterations > 1) or turn the reset off.",
                self.num_iterations,
                a.steps_per_generation,
                a.gradient_accumulation_steps,
            )
        self._k15_resets = 0
        self._k15_generated_at_step = -1  # optimizer step (global_step) at which the current rollout batch was made

    def _generate_and_score_completions(self, inputs):
        training = self.model.training
        if training:
            # A new rollout batch starts every generate_every micro-steps. TRL also regenerates when a resumed run
            # has no buffered batch; that batch replaces one whose optimizer state was just restored, so no reset.
            if self.args.reset_optimizer_each_iteration and self._step % self._k15_generate_every == 0:
                self._reset_optimizer_state()
            self._k15_generated_at_step = self.state.global_step
        output = super()._generate_and_score_completions(inputs)

        # Gathered rewards (all processes, whole groups, before TRL shuffles/splits): r_j as TRL weights them.
        rewards_per_func = self._k15_gathered_rewards  # (N, F)
        scorable = self._k15_scorable  # (N,) completions some task reward function scored
        weights = self.reward_weights.to(rewards_per_func.device)  # (F,)
        rewards = (rewards_per_func * weights).nansum(dim=1)  # (N,)
        k = self.num_generations if training else self.num_generations_eval
        advantages = mirror_descent_advantages(rewards, k, self.args.tau, self.args.log_z_estimator, scorable)  # (N,)

        local = len(output["prompt_ids"])
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start : start + local]  # (B,) this process's slice, r_j - b_g
        logged = self._logs["advantages"]  # TRL logged its own (r - mean) / std for the completions table
        for _ in range(min(len(advantages), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())
        mode = "train" if training else "eval"
        baseline = (rewards - advantages).view(-1, k)[:, 0]  # (G,) b_g (0 in a group nothing scored)
        self._metrics[mode]["k15/baseline"].append(baseline.mean().item())
        return output

    def _k15_group_std_scaling(self) -> bool:
        return False  # the mirror-descent baseline does not scale rewards

    def _reset_optimizer_state(self) -> None:
        """Reset the optimizer's moments and step counts (paper: reset at every iteration); lr schedule untouched.

        A plain optimizer loses its per-parameter state (accelerate's ``AcceleratedOptimizer`` exposes the inner
        one's), so the next ``step()`` is a freshly built optimizer's first. Under DeepSpeed the state is zeroed in
        place instead, on the ZeRO optimizer accelerate wraps: ZeRO-1/2 (and DeepSpeed's bf16 optimizer) read the
        moments through views of the state tensors taken at the first step (``safe_get_full_optimizer_state``,
        universal checkpoints), which replaced tensors would leave on the moments from before the reset.
        """
        if self.optimizer is None:
            return
        if self.is_deepspeed_enabled:
            reset = zero_optimizer_state(self.optimizer.optimizer)  # DeepSpeedOptimizerWrapper -> ZeRO optimizer
        else:
            reset = clear_optimizer_state(self.optimizer)
        if reset:
            self._k15_resets += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's ``log``, plus ``k15/optimizer_resets`` (the cumulative number of optimizer resets) in training mode
        when ``reset_optimizer_each_iteration`` is on, put into ``logs`` before GRPOTrainer adds its averaged
        metrics."""
        if self.model.training and self.args.reset_optimizer_each_iteration:
            logs["k15/optimizer_resets"] = float(self._k15_resets)  # cumulative count
        super().log(logs, start_time)

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+C)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P+C)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]  # (B, C)
        multimodal = {
            key: inputs.get(key)
            for key in (
                "pixel_values",
                "image_grid_thw",
                "num_images",
                "pixel_attention_mask",
                "spatial_shapes",
                "num_tiles",
                "image_sizes",
                "token_type_ids",
                "mm_token_type_ids",
                "image_position_ids",
            )
        }
        per_token_logps, _, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_aux_loss=self.aux_loss_enabled,
            **multimodal,
        )  # (B, C)

        mode = "train" if self.model.training else "eval"
        old_per_token_logps = inputs.get("old_per_token_logps")  # (B, C) pi_i, from the generation pass
        if old_per_token_logps is None and mode == "train" and self._k15_needs_old_logps:
            raise RuntimeError("old_per_token_logps missing although a rollout batch feeds several optimizer steps")
        if old_per_token_logps is None or mode == "eval" or self.state.global_step == self._k15_generated_at_step:
            # No optimizer step since the batch was generated: pi_theta is pi_i exactly. (TRL's generation-time
            # forward, present for vLLM importance sampling, may differ by numerics the squared term should not see.)
            old_per_token_logps = per_token_logps.detach()

        normalize = self.args.length_normalize
        seq_logps = sequence_logps(per_token_logps, mask, normalize)  # (B,)
        old_seq_logps = sequence_logps(old_per_token_logps, mask, normalize)  # (B,)
        is_ratio = inputs.get("importance_sampling_ratio")  # (B, 1) pi_i / pi_vllm (sequence modes only, see config)
        weights = is_ratio.view(-1) if is_ratio is not None else None  # (B,)
        token_weights = inputs.get(TOKEN_WEIGHTS)  # (B, C) partial rollouts' off-policy correction, or None
        policy_seq_logps = None  # the policy-gradient term's log-probs: each stale token's gradient weighted
        if token_weights is not None:
            policy_seq_logps = sequence_logps(gradient_weighted(per_token_logps, token_weights), mask, normalize)
        policy_term, l2_term = mirror_descent_terms(
            seq_logps, old_seq_logps, inputs["advantages"], self.args.tau, weights, policy_seq_logps
        )  # (B,), (B,)
        # Micro-batches have equal sizes, so the mean over each, divided by the accumulation steps, sums to the mean
        # over the whole accumulated batch (DDP then averages over processes).
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = (policy_term + l2_term).mean() / normalizer
        if self.aux_loss_enabled:  # mixture-of-experts router load balancing, as TRL adds it
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        stats = torch.stack(
            [policy_term.mean(), l2_term.mean(), (seq_logps - old_seq_logps).abs().mean()]
        ).detach()  # (3,)
        stats = self.accelerator.gather(stats.unsqueeze(0)).mean(dim=0)  # (3,)
        policy_mean, l2_mean, abs_log_ratio = stats.tolist()
        self._metrics[mode]["k15/policy_loss"].append(policy_mean)
        self._metrics[mode]["k15/l2_loss"].append(l2_mean)
        self._metrics[mode]["k15/abs_log_ratio"].append(abs_log_ratio)
        return loss
