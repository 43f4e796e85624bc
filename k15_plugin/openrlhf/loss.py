"""The k1.5 mirror-descent loss in place of OpenRLHF's ``PolicyLoss`` (same call, same five return values).

OpenRLHF calls the loss once per micro-batch with per-token tensors and the optimizer step's global sample count;
each sequence's loss is divided by that count and multiplied by the data-parallel size, as OpenRLHF's own sample-level
``aggregate_loss`` does, so the micro-batch losses of an optimizer step add up to the core's mean over it.
"""

from __future__ import annotations

import torch
from openrlhf.models.loss import PolicyLoss
from openrlhf.models.utils import masked_mean

from k15_plugin.core import mirror_descent_terms, sequence_logps


class K15MirrorDescentLoss(PolicyLoss):
    """Per sequence ``-(r - b) logp + tau/2 (logp - logp_old)^2``; advantages constant per sequence."""

    def __init__(self, tau: float, length_normalize: bool = False):
        super().__init__(token_level_loss=False)
        self.tau, self.length_normalize = float(tau), bool(length_normalize)

    def forward(
        self,
        log_probs,
        old_log_probs,
        advantages,
        action_mask=None,
        rollout_log_probs=None,
        dp_size=1,
        batch_num_tokens=None,
        global_batch_size=None,
    ):
        """The mirror-descent loss of one micro-batch, in place of ``PolicyLoss``'s clipped per-token PPO surrogate.

        ``log_probs`` and ``old_log_probs`` are (B, A) per-token log-probs, summed per sequence over ``action_mask``
        (or averaged with ``length_normalize``); ``advantages`` (B, A) hold one value per sequence on its response
        tokens, averaged back to (B,). Each sequence's loss is divided by ``global_batch_size`` (the optimizer step's
        sample count; None: the micro-batch's sequences with at least one response token) and multiplied by
        ``dp_size``, so the micro-batches and ranks of a step add up to the mean over the step. Sequences without a
        response token add nothing. ``rollout_log_probs`` and ``batch_num_tokens`` are accepted and ignored.

        Returns:
            ``(loss, clip_ratio, ppo_kl, None, None)``: the scalar loss, a clip ratio of 0 (nothing is clipped), the
            masked mean of ``old_log_probs - log_probs`` (detached), and None for the last two values.
        """
        mask = action_mask.to(log_probs.dtype)  # (B, A)
        n_tokens = mask.sum(dim=-1)  # (B,)
        valid = (n_tokens > 0).to(log_probs.dtype)  # (B,)
        seq = sequence_logps(log_probs, mask, self.length_normalize)  # (B,)
        old = sequence_logps(old_log_probs, mask, self.length_normalize)  # (B,)
        seq_adv = (advantages * mask).sum(dim=-1) / n_tokens.clamp(min=1)  # (B,) the sequence's one advantage
        policy_term, l2_term = mirror_descent_terms(seq, old, seq_adv, self.tau)
        per_seq = (policy_term + l2_term) * valid  # (B,)
        denominator = valid.sum().clamp(min=1) if global_batch_size is None else global_batch_size
        loss = per_seq.sum() / denominator * dp_size
        no_clip = torch.zeros((), device=loss.device)  # nothing is clipped
        ppo_kl = masked_mean(-(log_probs - old_log_probs).detach(), action_mask, dim=None)
        return loss, no_clip, ppo_kl, None, None
