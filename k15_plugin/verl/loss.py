"""The k1.5 mirror-descent policy loss, registered with verl as ``k15_md`` (``policy_loss.loss_mode=k15_md``).

verl calls a policy loss once per micro-batch with padded per-token tensors; the loss here turns them into
sequence log-probabilities and hands them to :func:`k15_plugin.core.mirror_descent_terms`. Each sequence's loss is
divided by verl's global (mini-batch) sequence count and multiplied by the data-parallel size, verl's own
``seq-mean-token-sum`` aggregation, so the micro-batch losses of a mini-batch add up to the core's mean over it
on any number of ranks. ``loss_agg_mode`` is therefore not read: the loss is per sequence by definition.
"""

from __future__ import annotations

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from k15_plugin.core import mirror_descent_terms, sequence_logps


def _policy_loss_settings(config) -> tuple[float, bool]:
    policy_loss = config.policy_loss
    tau = policy_loss.get("tau", None)
    if tau is None:
        raise ValueError(
            "policy_loss.loss_mode=k15_md needs tau: set actor_rollout_ref.actor.policy_loss._target_="
            "k15_plugin.verl.config.K15PolicyLossConfig (the plugin's configs do), or use --config-name=k15_md"
        )
    return float(tau), bool(policy_loss.get("length_normalize", False))


@register_policy_loss("k15_md")
def compute_policy_loss_k15_md(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-sum",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """Per sequence ``-(r - b) logp + tau/2 (logp - logp_old)^2``; tensors (B, T), advantages constant per row."""
    if rollout_is_weights is not None:
        raise ValueError(
            "policy_loss.loss_mode=k15_md takes no rollout-correction weights: the k1.5 loss is per sequence and the "
            "weights are per token; unset algorithm.rollout_correction.rollout_is"
        )
    tau, length_normalize = _policy_loss_settings(config)
    mask = response_mask.to(log_prob.dtype)  # (B, T)
    n_tokens = mask.sum(dim=-1)  # (B,)
    valid = (n_tokens > 0).to(log_prob.dtype)  # (B,) verl drops fully masked rows too
    seq = sequence_logps(log_prob, mask, length_normalize)  # (B,)
    old = sequence_logps(old_log_prob, mask, length_normalize)  # (B,)
    seq_adv = (advantages * mask).sum(dim=-1) / n_tokens.clamp(min=1)  # (B,) the row's one advantage
    policy_term, l2_term = mirror_descent_terms(seq, old, seq_adv, tau)  # (B,), (B,)
    per_seq = (policy_term + l2_term) * valid  # (B,)

    info = config.global_batch_info
    dp_size = info.get("dp_size", 1) or 1
    global_batch_size = info.get("global_batch_size", None)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("k15_md needs global_batch_size when dp_size > 1")
        global_batch_size = valid.sum().clamp(min=1)
    loss = per_seq.sum() / global_batch_size * dp_size

    count = max(float(valid.sum()), 1.0)
    metrics = {
        "actor/k15_policy_term": float((policy_term.detach() * valid).sum()) / count,
        "actor/k15_l2_term": float((l2_term.detach() * valid).sum()) / count,
        # sequence-level log pi_old / pi_theta: 0 at a rollout batch's first update
        "actor/ppo_kl": float(((old - seq).detach() * valid).sum()) / count,
    }
    return loss, metrics
