"""Advantage estimators registered with verl (``algorithm.adv_estimator=...``), all reading ``algorithm.k15``:

* ``k15_md``: r_j - b with b = tau log Z of the prompt's group (``mean`` or ``log_mean_exp``), the k1.5 baseline;
* ``k15_grpo``: verl's GRPO estimator (``algorithm.norm_adv_by_std_in_grpo=false`` gives Dr. GRPO);
* ``k15_rloo``: verl's RLOO estimator.

Each adds the k1.5 length penalty first (when ``algorithm.k15.length_penalty.weight > 0``), on whole groups: verl
calls the estimator with every row of the step and its ``uid``, so a group's min and max length are those of all k
samples of the prompt, in any row order. The ``k15_grpo`` / ``k15_rloo`` estimators are the baselines for side-by-side
runs that differ from ``k15_md`` only in the algorithm.

The penalty's warm-up is in trainer steps, which verl does not pass to an estimator: the plugin's trainer
(``trainer.v1.trainer_mode=k15_sync``) sets it before each advantage computation (:func:`set_trainer_step`). A
warm-up or ramp without that trainer is refused rather than ignored, and so is a non-uniform sampler (only that
trainer draws prompts through it); the optimizer reset, on by default, is warned about once there.

Groups are the rows of one ``uid``: one per prompt in single-turn runs. An agent loop that emits several outputs per
conversation puts all of them into the uid's group (verl selects the final outputs for its own ``grpo`` estimator
only), so the k1.5 baseline and the length penalty would see more than ``rollout.n`` rows per group: run these
estimators single-turn.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from verl.trainer.ppo.core_algos import (
    compute_grpo_outcome_advantage,
    compute_rloo_outcome_advantage,
    register_adv_est,
)

from k15_plugin.core import length_penalty_weight, length_reward, mirror_descent_advantages
from k15_plugin.verl.config import k15_settings

_trainer_step: int | None = None
_warned_reset = False


def set_trainer_step(step: int | None) -> None:
    """The trainer step (rollout batches before this one, from 0) the length penalty's warm-up is counted in."""
    global _trainer_step
    _trainer_step = step


def groups_by_size(index) -> list[tuple[torch.Tensor, int]]:
    """Rows bucketed by their ``uid`` group's size: [(rows, k)], rows (M * k,) with each group's k rows consecutive.

    Groups are usually all of size ``rollout.n``; verl's padding rows (one shared ``pad...`` uid) and agent loops
    that drop a trajectory make other sizes, each handled as groups of its own size.
    """
    uids = np.asarray(index)
    _, inverse, counts = np.unique(uids, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")  # groups consecutive, rows in their original order within
    size_of_row = counts[inverse[order]]
    return [(torch.as_tensor(order[size_of_row == k], dtype=torch.long), int(k)) for k in sorted(set(counts.tolist()))]


def check_trainer(options) -> None:
    """Outside the plugin's trainer (no trainer step set): refuse a non-uniform sampler, warn once that the optimizer
    reset does not happen."""
    global _warned_reset
    if _trainer_step is not None:
        return
    if options.sampler.name != "uniform":
        raise ValueError(
            f"algorithm.k15.sampler.name={options.sampler.name} needs trainer.v1.trainer_mode=k15_sync (and "
            "trainer.use_v1=true): this trainer draws prompts its own way"
        )
    if options.reset_optimizer_each_iteration and not _warned_reset:
        _warned_reset = True
        warnings.warn(
            "algorithm.k15.reset_optimizer_each_iteration=true has no effect outside trainer.v1.trainer_mode=k15_sync",
            stacklevel=3,
        )


def penalty_weight(options) -> float:
    """The length penalty's weight for this advantage computation, from ``algorithm.k15`` (``options``).

    At the trainer step set by :func:`set_trainer_step`, warm-up and ramp applied; with no step set, the plain
    ``weight``, or a ValueError when a warm-up or ramp is configured (they would otherwise be silently ignored).
    """
    lp = options.length_penalty
    if lp.weight == 0:
        return 0.0
    if _trainer_step is None:
        if lp.warmup_steps or lp.ramp_steps:
            raise ValueError(
                "algorithm.k15.length_penalty.warmup_steps/ramp_steps need the trainer step: run with "
                "trainer.v1.trainer_mode=k15_sync (the plugin's configs do)"
            )
        return float(lp.weight)
    return length_penalty_weight(_trainer_step, lp.weight, lp.warmup_steps, lp.ramp_steps)


def penalized_rewards(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, groups, options):
    """(N,) sequence rewards plus the weighted length reward of each row's group (``groups``: from
    :func:`groups_by_size`), and the weight used."""
    rewards = token_level_rewards.sum(dim=-1)  # (N,)
    weight = penalty_weight(options)
    if weight == 0:
        return rewards, weight
    lengths = response_mask.sum(dim=-1)  # (N,) tokens
    out = rewards.clone()
    for rows, k in groups:
        r = rewards[rows]  # (M * k,) groups consecutive
        out[rows] = r + weight * length_reward(lengths[rows], r >= options.correct_threshold, k).to(r.dtype)
    return out, weight


def _with_length_penalty(token_level_rewards, response_mask, index, config) -> torch.Tensor:
    """token_level_rewards with each row's length reward added on its last response token."""
    options = k15_settings(config)
    check_trainer(options)
    rewards, weight = penalized_rewards(token_level_rewards, response_mask, groups_by_size(index), options)
    if weight == 0:
        return token_level_rewards
    extra = rewards - token_level_rewards.sum(dim=-1)  # (N,)
    mask = response_mask.to(token_level_rewards.dtype)  # (N, T)
    positions = torch.arange(1, mask.shape[-1] + 1, dtype=mask.dtype) * mask  # (N, T)
    last = positions.argmax(dim=-1)  # (N,) the row's last response token
    out = token_level_rewards.clone()
    rows = torch.arange(out.shape[0])
    out[rows, last] += extra * mask[rows, last]  # a row without response tokens keeps its rewards
    return out


@register_adv_est("k15_md")
def compute_k15_md_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index, config=None, **kwargs
):
    """r_j - tau log Z of the group, broadcast over the row's response tokens: (advantages, returns), each (N, T)."""
    options = k15_settings(config)
    check_trainer(options)
    groups = groups_by_size(index)
    rewards, _ = penalized_rewards(token_level_rewards, response_mask, groups, options)  # (N,)
    advantages = torch.empty_like(rewards)
    for rows, k in groups:
        advantages[rows] = mirror_descent_advantages(rewards[rows], k, options.tau, options.log_z_estimator)
    advantages = advantages.unsqueeze(-1) * response_mask  # (N, T)
    return advantages, advantages


@register_adv_est("k15_grpo")
def compute_k15_grpo_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index, config=None, **kwargs
):
    """verl's GRPO advantage on the length-penalized rewards."""
    rewards = _with_length_penalty(token_level_rewards, response_mask, index, config)
    norm = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    return compute_grpo_outcome_advantage(rewards, response_mask, index, norm_adv_by_std_in_grpo=norm, config=config)


@register_adv_est("k15_rloo")
def compute_k15_rloo_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index, config=None, **kwargs
):
    """verl's RLOO advantage on the length-penalized rewards."""
    rewards = _with_length_penalty(token_level_rewards, response_mask, index, config)
    return compute_rloo_outcome_advantage(rewards, response_mask, index, config=config)
