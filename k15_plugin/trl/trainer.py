"""TRL trainers: Kimi k1.5 mirror descent, and TRL's own GRPO/RLOO with the plugin's length penalty and samplers.

The math lives in :mod:`k15_plugin.core`; this module only moves tensors between TRL and those functions.

Private TRL 1.16 methods overridden here (pinned in pyproject.toml):

* ``_calculate_rewards`` (GRPOTrainer, RLOOTrainer): after TRL has gathered every process's rewards, fill the
  length-penalty column on whole groups and feed the sampler's success statistics.
* ``_generate_and_score_completions`` (GRPOTrainer): replace TRL's advantages by r - b from the mirror-descent baseline,
  computed on the gathered generation batch before TRL shuffles and splits it; reset the optimizer per rollout batch.
* ``_compute_loss`` (GRPOTrainer): the mirror-descent loss on sequence log-probs.
* ``_get_train_sampler``, ``get_train_dataloader``, ``_save_checkpoint``, ``_load_optimizer_and_scheduler``: the
  plugin's samplers and their checkpointed state, see :mod:`k15_plugin.trl.samplers`.
"""

from __future__ import annotations

import torch
from accelerate.utils import gather
from trl import GRPOTrainer, RLOOTrainer

from k15_plugin.core import (
    length_penalty_weight,
    length_reward,
    mirror_descent_advantages,
    mirror_descent_terms,
    sequence_logps,
)
from k15_plugin.trl.config import K15GRPOConfig, K15RLOOConfig, KimiMirrorDescentConfig
from k15_plugin.trl.samplers import K15SamplerMixin

INDEX_COLUMN = "k15_index"
LENGTH_PENALTY_NAME = "length_penalty"


class LengthPenaltySlot:
    """Placeholder reward function that reserves TRL's reward column for the length penalty.

    TRL calls reward functions on each process's slice only, but the length reward needs whole groups; so this
    returns zeros, and the trainer overwrites the column after TRL has gathered all processes' rewards. Reserving a
    real column keeps TRL's per-function logging (``rewards/length_penalty/mean``) and weighting as they are.
    """

    __name__ = LENGTH_PENALTY_NAME

    def __call__(self, completions, **kwargs) -> list[float]:
        return [0.0] * len(completions)


class K15TrainerMixin(K15SamplerMixin):
    """What every trainer of the plugin adds to its TRL base: the length penalty and the samplers' statistics.

    Place it before the TRL trainer in the bases. The config must be a :class:`K15Options` subclass.
    """

    def __init__(self, model, reward_funcs, args=None, train_dataset=None, *rest, **kwargs):
        if args is None or not hasattr(args, "length_penalty_weight"):
            raise ValueError(
                f"{type(self).__name__} needs a config with the plugin's options "
                "(K15GRPOConfig, K15RLOOConfig or KimiMirrorDescentConfig), got "
                f"{type(args).__name__ if args is not None else None}"
            )
        if args.sampler_type != "uniform" and train_dataset is not None:
            # The sampler's statistics are keyed by dataset row; the row index travels with the batch as a column
            # (reward functions receive it as a keyword they can ignore).
            if INDEX_COLUMN in train_dataset.column_names:
                train_dataset = train_dataset.remove_columns(INDEX_COLUMN)
            train_dataset = train_dataset.add_column(INDEX_COLUMN, list(range(len(train_dataset))))
        super().__init__(model, reward_funcs, args, train_dataset, *rest, **kwargs)
        self._k15_num_task_funcs = len(self.reward_funcs)
        self._k15_length_penalty = args.length_penalty_weight > 0
        if self._k15_length_penalty:
            # Same pattern TRL uses for environment rewards (GRPOTrainer.__init__): one more column, weight 1; the
            # penalty's own weight and warm-up are applied when the column is filled.
            self.reward_funcs.append(LengthPenaltySlot())
            self.reward_func_names.append(LENGTH_PENALTY_NAME)
            self.reward_processing_classes.append(None)
            self.reward_weights = torch.cat([self.reward_weights, torch.ones(1)])
        self._k15_gathered_rewards = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # (N, F)
        device = rewards_per_func.device
        training = self.model.training
        sampler = getattr(self, "_k15_sampler", None)
        update_sampler = training and sampler is not None
        if self._k15_length_penalty or update_sampler:
            n = self._k15_num_task_funcs
            task_weights = self.reward_weights[:n].to(device)  # (n,)
            task_reward = (rewards_per_func[:, :n] * task_weights).nansum(dim=1)  # (N,)
            correct = task_reward >= self.args.length_penalty_correct_threshold  # (N,)
        if self._k15_length_penalty:
            local_lengths = torch.tensor([len(ids) for ids in completion_ids_list], device=device)  # (B,) tokens
            lengths = gather(local_lengths)  # (N,) whole groups, in the same order as rewards_per_func
            k = self.num_generations if training else self.num_generations_eval
            a = self.args
            weight = length_penalty_weight(
                self.state.global_step,
                a.length_penalty_weight,
                a.length_penalty_warmup_steps,
                a.length_penalty_ramp_steps,
            )
            rewards_per_func[:, -1] = weight * length_reward(lengths, correct, k).to(rewards_per_func.dtype)
            metrics = self._metrics["train" if training else "eval"]
            metrics["length_penalty/weight"].append(weight)
            # Groups with no correct answer only see min(0, lambda), which favours the shortest wrong answer: the
            # collapse the paper's warm-up guards against. Logged so a run can see it coming.
            metrics["length_penalty/all_wrong_groups"].append((~correct.view(-1, k).any(dim=1)).float().mean().item())
        if update_sampler:
            local_index = torch.tensor([x[INDEX_COLUMN] for x in inputs], device=device)  # (B,)
            sampler.update(gather(local_index).cpu(), correct.cpu())
        self._k15_gathered_rewards = rewards_per_func
        return rewards_per_func


class K15GRPOTrainer(K15TrainerMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` (its loss unchanged) with the plugin's length penalty and samplers, for comparisons."""

    _tag_names = ["trl", "grpo", "k15-plugin"]

    def __init__(self, model, reward_funcs, args: K15GRPOConfig | None = None, *rest, **kwargs):
        super().__init__(model, reward_funcs, args, *rest, **kwargs)


class K15RLOOTrainer(K15TrainerMixin, RLOOTrainer):
    """TRL's ``RLOOTrainer`` (its loss unchanged) with the plugin's length penalty and samplers, for comparisons."""

    _tag_names = ["trl", "rloo", "k15-plugin"]

    def __init__(self, model, reward_funcs, args: K15RLOOConfig | None = None, *rest, **kwargs):
        super().__init__(model, reward_funcs, args, *rest, **kwargs)


class KimiMirrorDescentTrainer(K15GRPOTrainer):
    """Online policy mirror descent of Kimi k1.5 (arXiv 2501.12599, section 2.3) on TRL's GRPO machinery.

    TRL generates k = ``num_generations`` completions per prompt and gathers the rewards; per sample the loss is

        -(r_j - b) * log pi_theta(y_j|x) + tau/2 * (log pi_theta(y_j|x) - log pi_i(y_j|x))^2

    on sequence log-probs (:func:`k15_plugin.core.mirror_descent_loss`), with b = tau*log Z estimated per group
    (``log_z_estimator``) and log pi_i the log-probs of the policy that generated the batch. There is no value network
    and no fixed reference model (``beta`` must stay 0). ``num_iterations > 1`` reuses each rollout batch for several
    updates; the squared term is what keeps those off-policy updates close to pi_i.
    """

    _tag_names = ["trl", "k15-plugin", "kimi-mirror-descent"]
    _name = "KimiMirrorDescent"

    def __init__(self, model, reward_funcs, args: KimiMirrorDescentConfig | None = None, *rest, **kwargs):
        if args is not None and not isinstance(args, KimiMirrorDescentConfig):
            raise ValueError(f"args must be a KimiMirrorDescentConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        # Updates per rollout batch; above 1, pi_i's log-probs must come from the generation pass. TRL computes them
        # exactly when gradient_accumulation_steps is not a multiple of steps_per_generation * num_iterations, which
        # covers that case and skips the extra forward pass otherwise; _compute_loss double-checks.
        self._k15_generate_every = self.args.steps_per_generation * self.num_iterations
        self._k15_needs_old_logps = self.args.gradient_accumulation_steps % self._k15_generate_every != 0

    def _generate_and_score_completions(self, inputs):
        training = self.model.training
        if training and self.args.reset_optimizer_each_iteration:
            self._reset_optimizer_state()
        output = super()._generate_and_score_completions(inputs)

        # Gathered rewards (all processes, whole groups, before TRL shuffles/splits): r_j as TRL weights them.
        rewards_per_func = self._k15_gathered_rewards  # (N, F)
        weights = self.reward_weights.to(rewards_per_func.device)  # (F,)
        rewards = (rewards_per_func * weights).nansum(dim=1)  # (N,)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,) every reward function returned None
        k = self.num_generations if training else self.num_generations_eval
        if unscorable.any():
            # Fill with the group's mean of the scored samples so they do not move the baseline, then give them no
            # advantage (TRL does the same for its own advantages).
            grouped = rewards.masked_fill(unscorable, float("nan")).view(-1, k)  # (G, k)
            fill = torch.nan_to_num(torch.nanmean(grouped, dim=1, keepdim=True), nan=0.0).expand_as(grouped)
            rewards = torch.where(unscorable.view(-1, k), fill, grouped).reshape(-1)
        advantages = mirror_descent_advantages(rewards, k, self.args.tau, self.args.log_z_estimator)  # (N,)
        advantages = advantages.masked_fill(unscorable, 0.0)
        baseline = rewards - advantages  # (N,) b_g per sample

        local = len(output["prompt_ids"])
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start : start + local]  # (B,) this process's slice, r_j - b_g
        mode = "train" if training else "eval"
        self._metrics[mode]["k15/baseline"].append(baseline.view(-1, k)[:, 0].mean().item())
        return output

    def _reset_optimizer_state(self) -> None:
        """Clear the optimizer's moments and step counts (paper: reset at every iteration); lr schedule untouched."""
        optimizer = self.optimizer
        # Accelerate (and DeepSpeed) wrap the torch optimizer; its state lives on the innermost one.
        while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is not None and optimizer.state:
            optimizer.state.clear()
            self._metrics["train"]["k15/optimizer_resets"].append(1.0)

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+C)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P+C)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]  # (B, C)
        multimodal = {
            key: inputs.get(key)
            for key in (
                "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
            )
        }  # fmt: skip
        per_token_logps, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), **multimodal
        )  # (B, C)

        mode = "train" if self.model.training else "eval"
        old_per_token_logps = inputs.get("old_per_token_logps")  # (B, C) pi_i, from the generation pass
        if old_per_token_logps is None:
            if mode == "train" and self._k15_needs_old_logps:
                raise RuntimeError("old_per_token_logps missing although a rollout batch feeds several updates")
            old_per_token_logps = per_token_logps.detach()  # first update of the iteration: pi_theta == pi_i

        normalize = self.args.length_normalize
        seq_logps = sequence_logps(per_token_logps, mask, normalize)  # (B,)
        old_seq_logps = sequence_logps(old_per_token_logps, mask, normalize)  # (B,)
        policy_term, l2_term = mirror_descent_terms(seq_logps, old_seq_logps, inputs["advantages"], self.args.tau)
        # Micro-batches have equal sizes, so the mean over each, divided by the accumulation steps, sums to the mean
        # over the whole accumulated batch (DDP then averages over processes).
        loss = (policy_term + l2_term).mean()
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps

        stats = torch.stack(
            [policy_term.mean(), l2_term.mean(), (seq_logps - old_seq_logps).abs().mean()]
        ).detach()  # (3,)
        stats = self.accelerator.gather(stats.unsqueeze(0)).mean(dim=0)  # (3,)
        policy_mean, l2_mean, abs_log_ratio = stats.tolist()
        self._metrics[mode]["k15/policy_loss"].append(policy_mean)
        self._metrics[mode]["k15/l2_loss"].append(l2_mean)
        self._metrics[mode]["k15/abs_log_ratio"].append(abs_log_ratio)
        return loss
