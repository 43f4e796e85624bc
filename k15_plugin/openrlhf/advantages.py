"""The advantage step of OpenRLHF's experience maker with the k1.5 length penalty and baseline.

``compute_advantages_and_returns`` sees every sample of the step, so groups are whole here: the rewards are put back
in prompt order (``experience.index``, k consecutive samples per prompt, as OpenRLHF does), the length reward of
each group is added (weight and warm-up at the trainer step the controller sets), and then

* ``kimi_md``: advantage r - tau log Z of the group on every response token, no whitening, no KL in the reward;
* any other algorithm: OpenRLHF's own estimator on the penalized rewards (its DAPO/ProRL length penalties too).
"""

from __future__ import annotations

import itertools

import torch
from openrlhf.trainer.ppo_utils import experience_maker as upstream

from k15_plugin.core import length_penalty_weight, length_reward, mirror_descent_advantages


def _gathered(experiences, name: str) -> torch.Tensor:
    """(N,) per-sample values of ``name`` in prompt order (groups of k consecutive)."""
    index = torch.tensor(list(itertools.chain.from_iterable(e.index for e in experiences)))
    values = torch.cat([getattr(e, name).reshape(-1) for e in experiences])
    out = torch.empty_like(values)
    out[index] = values
    return out


def _scattered(values: torch.Tensor, experiences) -> list[torch.Tensor]:
    """The inverse of :func:`_gathered`: one (len(e.index),) tensor per experience."""
    return [values[torch.tensor(e.index)] for e in experiences]


class K15ExperienceMaker(upstream.RemoteExperienceMaker):
    """``RemoteExperienceMaker`` whose advantage step applies the k1.5 pieces (``args.k15``)."""

    k15_step = 0  # rollout batches trained before this one; the controller sets it every step

    def k15_length_bonus(self, experiences) -> tuple[torch.Tensor, float]:
        """(N,) weighted length reward in prompt order (zeros before the warm-up ends), and the weight."""
        settings = self.strategy.args.k15
        lp = settings.length_penalty
        k = self.strategy.args.rollout.n_samples_per_prompt
        weight = length_penalty_weight(self.k15_step, lp.weight, lp.warmup_steps, lp.ramp_steps)
        rewards = _gathered(experiences, "rewards")
        if weight == 0:
            return torch.zeros_like(rewards), weight
        has_scores = all(e.scores is not None for e in experiences)
        scores = _gathered(experiences, "scores") if has_scores else rewards
        lengths = _gathered(experiences, "response_length")
        correct = scores >= settings.correct_threshold
        return weight * length_reward(lengths, correct, k).to(rewards.dtype), weight

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences):
        """OpenRLHF's advantage step with the length reward added to every sample's reward first.

        For every algorithm the rewards are promoted to at least float32 and get the weighted length reward of their
        group (:meth:`k15_length_bonus`; the weight goes into each experience's ``info`` as
        ``k15_length_penalty_weight``). Other algorithms then go to the upstream method unchanged. ``kimi_md``
        replaces it: after OpenRLHF's own length penalties (when set), each sample's advantage is r - tau log Z of its
        group, put on every response token ((B, A) through ``action_mask``), with ``returns`` equal to the advantages,
        no whitening and no KL term (``kl`` None). Returns ``experiences``, updated in place.
        """
        args = self.strategy.args
        settings = args.k15
        for e in experiences:  # as upstream: at least float32 for rewards and group statistics
            e.rewards = e.rewards.to(torch.promote_types(e.rewards.dtype, torch.float32))
        bonus, weight = self.k15_length_bonus(experiences)
        for e, b in zip(experiences, _scattered(bonus, experiences), strict=True):
            e.rewards = e.rewards + b.to(e.rewards.dtype)
            e.info["k15_length_penalty_weight"] = torch.full_like(b, weight)
        if settings.algorithm != "kimi_md":
            return super().compute_advantages_and_returns(experiences)

        upstream.apply_length_penalties(experiences, args)  # OpenRLHF's DAPO / ProRL options, when set
        k = args.rollout.n_samples_per_prompt
        rewards = _gathered(experiences, "rewards")  # (N,)
        advantages = mirror_descent_advantages(rewards, k, settings.tau, settings.log_z_estimator)  # (N,)
        for e, a in zip(experiences, _scattered(advantages, experiences), strict=True):
            e.advantages = e.action_mask.to(a.dtype) * a.unsqueeze(-1)  # (B, A) the sequence's advantage per token
            e.returns = e.advantages.clone()
            e.info["return"] = a
            e.kl = None
        return experiences
