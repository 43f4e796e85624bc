"""Online policy mirror descent, Kimi k1.5 (arXiv 2501.12599), section 2.3.

Iteration i samples k responses y_1..y_k per prompt x from the reference policy pi_i (the policy that generated the
batch) and minimises, per prompt,

    L(theta) = mean_j [ -(r_j - b) * log pi_theta(y_j|x) + tau/2 * (log pi_theta(y_j|x) - log pi_i(y_j|x))^2 ]

with b = tau * log Z estimated from the group's rewards (the paper's practical choice is the mean reward). Its gradient
is minus the paper's update direction (eq. 3, averaged over j):

    (1/k) sum_j [ grad log pi_theta(y_j|x) (r_j - b) - tau/2 * grad (log pi_theta(y_j|x) - log pi_i(y_j|x))^2 ].

Everything here works on *sequence* log-probabilities (the sum of the completion's token log-probs), as the paper does.
torch and the standard library only: the host adapters call these functions, they never re-derive them.
"""

from __future__ import annotations

import math

import torch

ESTIMATORS = ("mean", "log_mean_exp")


def _check_tau(tau: float) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")


def _check_num_generations(num_generations: int, n: int, name: str) -> None:
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be an integer >= 1, got {num_generations!r}")
    if n % num_generations != 0:
        raise ValueError(
            f"num_generations={num_generations} must divide the number of samples in {name} ({n}): "
            "groups of num_generations consecutive samples share one prompt"
        )


def _check_1d(name: str, x: torch.Tensor, n: int | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got {getattr(x, 'shape', type(x))}")
    if n is not None and x.numel() != n:
        raise ValueError(f"{name} must have {n} elements (one per sample), got {x.numel()}")


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        where = torch.nonzero(~torch.isfinite(x)).tolist()[:4]
        raise ValueError(f"{name} must be finite, got non-finite values at positions {where}")


def log_partition_estimate(
    rewards: torch.Tensor, tau: float, estimator: str = "mean", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Estimate of tau * log Z per prompt, the baseline b of the mirror-descent loss.

    Args:
        rewards: (G, k) rewards of the k samples of each of G prompts.
        tau: the KL weight (> 0).
        estimator: ``"mean"``: the group's mean reward (the paper's practical choice); ``"log_mean_exp"``:
            ``tau * log(mean_j exp(r_j / tau))``, the sample estimate of tau * log Z under pi_i, computed with
            logsumexp in float64 so it stays finite for tau down to 1e-4 and rewards up to 1e4.
        mask: optional (G, k) bool, the samples that have a reward (a host marks completions no reward function
            could score as False); the estimate uses only those, and their entries of ``rewards`` may be NaN. A
            group without any is given 0.

    Returns:
        (G,) tensor, same dtype as ``rewards``; carries no gradient.
    """
    _check_tau(tau)
    _check_estimator(estimator)
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or rewards.size(1) < 1:
        raise ValueError(f"rewards must be a (G, k) tensor with k >= 1, got {getattr(rewards, 'shape', type(rewards))}")
    r = rewards.detach()
    if mask is None:
        _check_finite("rewards", r)
        if estimator == "mean":
            return r.mean(dim=1)  # (G,)
        r64 = r.to(torch.float64)  # (G, k); float64: r / tau reaches 1e8 for tau=1e-4, r=1e4
        log_z = torch.logsumexp(r64 / tau, dim=1) - math.log(r.size(1))  # (G,)  log mean_j exp(r_j / tau)
        return (tau * log_z).to(r.dtype)  # (G,)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != r.shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(r.shape)}, got {getattr(mask, 'shape', mask)}")
    _check_finite("rewards", r[mask])
    count = mask.sum(dim=1)  # (G,) scored samples per group
    r64 = r.to(torch.float64).masked_fill(~mask, 0.0)  # (G, k)
    if estimator == "mean":
        b = r64.sum(dim=1) / count.clamp(min=1)  # (G,)
    else:
        lse = torch.logsumexp((r64 / tau).masked_fill(~mask, -math.inf), dim=1)  # (G,) -inf where count == 0
        b = tau * (lse - count.clamp(min=1).to(torch.float64).log())  # (G,)  tau * log mean_{j scored} exp(r_j/tau)
    return b.masked_fill(count == 0, 0.0).to(r.dtype)  # (G,)


def mirror_descent_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    tau: float,
    estimator: str = "mean",
    scorable: torch.Tensor | None = None,
) -> torch.Tensor:
    """r_j - b_g for every sample, groups of ``num_generations`` consecutive samples sharing one baseline.

    Hosts call this on the *gathered* rewards of the whole generation batch, before splitting it into micro-batches,
    so the baseline always sees the full group. ``scorable``: optional (N,) bool; samples marked False (no reward
    function could score them) neither enter their group's baseline nor get an advantage (0). Returns (N,), no
    gradient.
    """
    _check_1d("rewards", rewards)
    _check_num_generations(num_generations, rewards.numel(), "rewards")
    grouped = rewards.detach().view(-1, num_generations)  # (G, k)
    if scorable is None:
        b = log_partition_estimate(grouped, tau, estimator)  # (G,)
        return (grouped - b.unsqueeze(1)).reshape(-1)  # (N,)
    _check_1d("scorable", scorable, rewards.numel())
    mask = scorable.view(-1, num_generations)  # (G, k)
    b = log_partition_estimate(grouped, tau, estimator, mask=mask)  # (G,)
    advantages = (grouped - b.unsqueeze(1)).masked_fill(~mask, 0.0)  # (G, k)
    return advantages.reshape(-1)  # (N,)


def mirror_descent_terms(
    seq_logps: torch.Tensor,
    old_seq_logps: torch.Tensor,
    advantages: torch.Tensor,
    tau: float,
    weights: torch.Tensor | None = None,
    policy_seq_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two per-sample terms of the mirror-descent loss, for any subset of samples (e.g. a micro-batch).

    Args:
        seq_logps: (B,) log pi_theta(y_j|x), carries the gradient.
        old_seq_logps: (B,) log pi_i(y_j|x) of the policy that generated the batch, fixed for the iteration.
        advantages: (B,) r_j - b_g from :func:`mirror_descent_advantages` (treated as a constant).
        tau: the KL weight (> 0).
        weights: optional (B,) importance weights pi_i(y_j|x) / mu(y_j|x) (constants) for samples drawn from a
            sampler mu other than pi_i (e.g. a vLLM engine whose numerics differ from the trainer's). Both terms are
            expectations over y ~ pi_i, so each sample's whole loss is weighted.
        policy_seq_logps: optional (B,) sequence log-probs for the policy-gradient term only, in place of
            ``seq_logps``: an off-policy correction passes ``sequence_logps(gradient_weighted(per_token_logps, w))``
            (:mod:`k15_plugin.core.off_policy`), whose value is ``seq_logps`` and whose gradient weights each token;
            the squared term keeps ``seq_logps`` and pi_i as its anchor.

    Returns:
        ``(policy_term, l2_term)``, each (B,): ``-w_j (r_j - b) logp_j`` and ``w_j tau/2 (logp_j - old_j)^2``.
    """
    _check_tau(tau)
    _check_1d("seq_logps", seq_logps)
    _check_1d("old_seq_logps", old_seq_logps, seq_logps.numel())
    _check_1d("advantages", advantages, seq_logps.numel())
    if policy_seq_logps is not None:
        _check_1d("policy_seq_logps", policy_seq_logps, seq_logps.numel())
    policy_term = -advantages.detach() * (seq_logps if policy_seq_logps is None else policy_seq_logps)  # (B,)
    log_ratio = seq_logps - old_seq_logps.detach()  # (B,)  log pi_theta / pi_i, zero at the iteration's first update
    l2_term = 0.5 * tau * log_ratio.pow(2)  # (B,)
    if weights is not None:
        _check_1d("weights", weights, seq_logps.numel())
        w = weights.detach().to(seq_logps.dtype)  # (B,)
        policy_term, l2_term = w * policy_term, w * l2_term
    return policy_term, l2_term


def mirror_descent_loss(
    seq_logps: torch.Tensor,
    old_seq_logps: torch.Tensor,
    rewards: torch.Tensor,
    num_generations: int,
    tau: float,
    estimator: str = "mean",
) -> torch.Tensor:
    """Mean over the N samples of ``-(r_j - b_g) * logp_j + tau/2 * (logp_j - old_j)^2``.

    All inputs (N,), N = G * num_generations, groups consecutive; ``seq_logps`` carries the gradient, the baseline b_g
    (see :func:`log_partition_estimate`) and ``old_seq_logps`` are constants.
    """
    _check_1d("seq_logps", seq_logps)
    _check_1d("old_seq_logps", old_seq_logps, seq_logps.numel())
    _check_1d("rewards", rewards, seq_logps.numel())
    advantages = mirror_descent_advantages(rewards, num_generations, tau, estimator)  # (N,)
    policy_term, l2_term = mirror_descent_terms(seq_logps, old_seq_logps, advantages, tau)
    return (policy_term + l2_term).mean()


def sequence_logps(per_token_logps: torch.Tensor, mask: torch.Tensor, length_normalize: bool = False) -> torch.Tensor:
    """Sequence log-probability from per-token log-probs: sum over the completion's tokens.

    Args:
        per_token_logps: (B, T) token log-probs.
        mask: (B, T) 1 for completion tokens that count, 0 for padding.
        length_normalize: divide by the number of counted tokens (the opt-in length-normalized variant; the
            paper-faithful default sums).

    Returns:
        (B,) tensor.
    """
    if per_token_logps.shape != mask.shape or per_token_logps.dim() != 2:
        raise ValueError(
            f"per_token_logps and mask must both be (B, T), got {tuple(per_token_logps.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.to(per_token_logps.dtype)
    total = (per_token_logps * mask).sum(dim=1)  # (B,)
    if length_normalize:
        total = total / mask.sum(dim=1).clamp(min=1.0)  # (B,)
    return total
