"""Length penalty, Kimi k1.5 (arXiv 2501.12599), section 2.3.3.

For the k responses to one prompt with token lengths len_j, min_len and max_len over the group:

    lambda_j = 0.5 - (len_j - min_len) / (max_len - min_len)          (0 for every j when max_len == min_len)
    len_reward_j = lambda_j if y_j is correct else min(0, lambda_j)

The reward the policy sees is r_j + weight * len_reward_j, with weight 0 during a warm-up (the paper's remedy for the
collapse an early penalty causes). Hosts must call :func:`length_reward` on the whole gathered group, in tokens.
"""

from __future__ import annotations

import math

import torch

from k15_plugin.core.mirror_descent import _check_1d, _check_num_generations


def length_reward(
    lengths: torch.Tensor, correct: torch.Tensor, num_generations: int, scorable: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample length reward of section 2.3.3.

    Args:
        lengths: (N,) completion lengths in tokens (non-negative).
        correct: (N,) bool, whether each response is correct.
        num_generations: k, the group size; groups are ``num_generations`` consecutive samples.
        scorable: optional (N,) bool; samples marked False (no reward function could score them) are left out of
            their group's min_len / max_len and get 0.

    Returns:
        (N,) float32 tensor (float64 if ``lengths`` is float64).
    """
    _check_1d("lengths", lengths)
    _check_1d("correct", correct, lengths.numel())
    _check_num_generations(num_generations, lengths.numel(), "lengths")
    if correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool tensor, got dtype {correct.dtype}")
    if scorable is None:
        scorable = torch.ones_like(correct)
    _check_1d("scorable", scorable, lengths.numel())
    if scorable.dtype != torch.bool:
        raise ValueError(f"scorable must be a bool tensor, got dtype {scorable.dtype}")
    dtype = torch.float64 if lengths.dtype == torch.float64 else torch.float32
    lens = lengths.detach().to(dtype).view(-1, num_generations)  # (G, k)
    if not torch.isfinite(lens).all() or (lens < 0).any():
        raise ValueError("lengths must be finite and non-negative token counts")
    valid = scorable.view(-1, num_generations)  # (G, k)
    min_len = lens.masked_fill(~valid, math.inf).min(dim=1, keepdim=True).values  # (G, 1) over scored samples
    max_len = lens.masked_fill(~valid, -math.inf).max(dim=1, keepdim=True).values  # (G, 1)
    span = max_len - min_len  # (G, 1); -inf when the group has no scored sample
    lam = 0.5 - (lens - min_len) / span.clamp(min=1e-12)  # (G, k)
    lam = torch.where((span > 0) & valid, lam, torch.zeros_like(lam))  # all lengths equal, or unscored: 0
    lam = lam.reshape(-1)  # (N,)
    return torch.where(correct, lam, lam.clamp(max=0.0))  # (N,)


def length_penalty_weight(step: int, weight: float, warmup_steps: int = 0, ramp_steps: int = 0) -> float:
    """Weight of the length reward at optimizer step ``step``.

    0 for ``step < warmup_steps``; then rises linearly over ``ramp_steps`` steps (``ramp_steps=0``: switches straight
    to ``weight``). The paper switches the penalty on after a warm-up and gives no values for either.
    """
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    if ramp_steps < 0:
        raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps!r}")
    if step < warmup_steps:
        return 0.0
    if ramp_steps == 0:
        return float(weight)
    return float(weight) * min(1.0, (step - warmup_steps + 1) / ramp_steps)
