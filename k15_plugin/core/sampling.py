"""Prompt sampling strategies, Kimi k1.5 (arXiv 2501.12599), section 2.3.4.

Two ways to choose which problems the policy trains on:

* **Prioritized sampling.** Track each problem's success rate s_i and draw problem i with probability proportional to
  1 - s_i, so the policy spends its samples where it still fails. A floor keeps solved problems (s_i = 1) in play,
  and problems never attempted are credited a prior success rate. Beside the paper's priority, ``"learnability"``
  weighs s_i (1 - s_i): most for problems solved half the time, least for those always or never solved, whose groups
  of samples all score the same and so give no gradient to a group-baseline method.
* **Curriculum sampling.** Order the problems by a difficulty label (higher is harder). ``"staged"`` is the paper's
  ablation: the whole set until a switch step, then only the hardest fraction. ``"gradual"`` widens an easy-first
  pool linearly from a start fraction to the whole set.

This module is the math only (torch and the standard library): success-rate bookkeeping, priority weights and
curriculum pools. The host adapters (e.g. :mod:`k15_plugin.trl.samplers`) turn them into samplers that keep the
host's prompt grouping and save their state with its checkpoints.
"""

from __future__ import annotations

import math
import warnings

import torch

CURRICULUM_SCHEDULES = ("staged", "gradual")
PRIORITIES = ("failure", "learnability")  # prioritized sampling's weight of a success rate s: 1 - s or s(1 - s)

# Slack for ceil(fraction * P): 0.7 * 10 is 7.000000000000001 in floating point and must give 7, not 8.
_CEIL_EPS = 1e-9


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def _check_count(name: str, value: int, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _fraction_count(fraction: float, total: int) -> int:
    """ceil(fraction * total), at least 1 and at most ``total``."""
    return min(total, max(1, math.ceil(fraction * total - _CEIL_EPS)))


class SuccessRateTracker:
    """Cumulative success rate per problem: s_i = successes_i / attempts_i.

    Every completion counts as one attempt, so a prompt sampled with k completions adds k attempts and as many
    successes as completions were correct. Problems never attempted report ``prior``.

    Args:
        num_problems: P, the number of problems (dataset rows).
        prior: success rate credited to problems not yet attempted, in [0, 1].
    """

    def __init__(self, num_problems: int, prior: float = 0.5):
        _check_count("num_problems", num_problems, 1)
        if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not 0 <= prior <= 1:
            raise ValueError(f"prior must be a number in [0, 1], got {prior!r}")
        self.num_problems = num_problems
        self.prior = float(prior)
        # float64: counts stay exact up to 2^53, and float successes (partial credit) add without rounding drift.
        self.successes = torch.zeros(num_problems, dtype=torch.float64)  # (P,)
        self.attempts = torch.zeros(num_problems, dtype=torch.int64)  # (P,)

    def update(self, indices: torch.Tensor, successes: torch.Tensor) -> None:
        """Add one attempt per entry.

        Args:
            indices: (N,) integer problem indices in [0, P); an index may repeat (one entry per completion).
            successes: (N,) bool, or float in [0, 1] (partial credit), one per entry.
        """
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
            raise ValueError(f"indices must be a 1-D tensor, got {getattr(indices, 'shape', type(indices))}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        if not isinstance(successes, torch.Tensor) or successes.shape != indices.shape:
            raise ValueError(
                f"successes must be a tensor of shape {tuple(indices.shape)} (one per index), "
                f"got {getattr(successes, 'shape', type(successes))}"
            )
        if indices.numel() == 0:
            return
        idx = indices.detach().cpu().to(torch.int64)  # (N,)
        if idx.min() < 0 or idx.max() >= self.num_problems:
            raise ValueError(
                f"indices must lie in [0, {self.num_problems}), got values from {int(idx.min())} to {int(idx.max())}"
            )
        ok = successes.detach().cpu().to(torch.float64)  # (N,)
        if not torch.isfinite(ok).all() or (ok < 0).any() or (ok > 1).any():
            raise ValueError("successes must be bool or finite values in [0, 1]")
        self.successes.index_add_(0, idx, ok)  # (P,)
        self.attempts += torch.bincount(idx, minlength=self.num_problems)  # (P,)

    def rates(self) -> torch.Tensor:
        """(P,) float64 success rates; ``prior`` where a problem has no attempt yet."""
        seen = self.attempts > 0  # (P,)
        rates = torch.full((self.num_problems,), self.prior, dtype=torch.float64)  # (P,)
        rates[seen] = self.successes[seen] / self.attempts[seen].to(torch.float64)
        return rates

    def state_dict(self) -> dict:
        """The statistics for a checkpoint: ``num_problems``, ``prior`` and copies of the (P,) ``successes`` and
        ``attempts`` tensors."""
        return {
            "num_problems": self.num_problems,
            "prior": self.prior,
            "successes": self.successes.clone(),
            "attempts": self.attempts.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (tensors copied to CPU, float64 successes, int64 attempts).

        Raises ValueError when the state tracks another number of problems or its tensors are not of shape (P,).
        """
        if state.get("num_problems") != self.num_problems:
            raise ValueError(
                f"num_problems mismatch: the state tracks {state.get('num_problems')!r} problems, "
                f"this tracker {self.num_problems}"
            )
        successes, attempts = state["successes"], state["attempts"]
        if successes.shape != (self.num_problems,) or attempts.shape != (self.num_problems,):
            raise ValueError(f"successes and attempts must both have shape ({self.num_problems},)")
        self.prior = float(state["prior"])
        self.successes = successes.detach().cpu().to(torch.float64).clone()
        self.attempts = attempts.detach().cpu().to(torch.int64).clone()


def prioritized_weights(rates: torch.Tensor, floor: float, priority: str = "failure") -> torch.Tensor:
    """Sampling weights of prioritized sampling: w_i = max(1 - s_i, floor) (``priority="failure"``, the paper's) or
    w_i = max(s_i (1 - s_i), floor) (``"learnability"``).

    Args:
        rates: (P,) success rates s_i in [0, 1].
        floor: smallest weight a problem keeps, in (0, 1], so solved problems are not starved.
        priority: ``"failure"`` or ``"learnability"`` (:data:`PRIORITIES`).

    Returns:
        (P,) weights, same floating dtype as ``rates`` (float64 for integer input), not normalized: the probability of
        drawing problem i is w_i / sum_j w_j.

    Example:
    ```python
    >>> import torch
    >>> prioritized_weights(torch.tensor([0.0, 0.5, 1.0]), 0.05)
    tensor([1.0000, 0.5000, 0.0500])
    >>> prioritized_weights(torch.tensor([0.0, 0.5, 0.9]), 0.05, "learnability")
    tensor([0.0500, 0.2500, 0.0900])

    ```
    """
    _check_fraction("floor", floor)
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {list(PRIORITIES)}, got {priority!r}")
    if not isinstance(rates, torch.Tensor) or rates.dim() != 1 or rates.numel() == 0:
        raise ValueError(f"rates must be a non-empty 1-D tensor, got {getattr(rates, 'shape', type(rates))}")
    s = rates.detach() if rates.dtype.is_floating_point else rates.detach().to(torch.float64)  # (P,)
    if not torch.isfinite(s).all() or (s < 0).any() or (s > 1).any():
        raise ValueError("rates must be finite success rates in [0, 1]")
    weight = 1.0 - s if priority == "failure" else s * (1.0 - s)  # (P,)
    return weight.clamp(min=floor)  # (P,)


def draw_chunk(
    weights: torch.Tensor,
    size: int,
    generator: torch.Generator | None,
    *,
    who: str,
    batch: str,
    warned: bool,
    stacklevel: int = 2,
) -> tuple[torch.Tensor, bool]:
    """``size`` distinct prompt indices drawn with probability proportional to ``weights`` (P,), and whether the
    replacement warning has now been given.

    Distinct prompts need at least ``size`` positive weights; with fewer, the draw is with replacement (so a
    ``batch`` may hold a prompt twice, keeping the host's batch shapes intact) and a warning naming ``who`` is given
    once: only when ``warned`` is False. ``stacklevel`` counts from the caller.
    """
    eligible = int((weights > 0).sum())
    replacement = eligible < size
    if replacement and not warned:
        warnings.warn(
            f"{who}: only {eligible} prompts are eligible for a {batch} of {size} prompts; drawing with replacement, "
            "so a batch may hold a prompt twice. (Warned once.)",
            stacklevel=stacklevel + 1,
        )
        warned = True
    return torch.multinomial(weights, size, replacement=replacement, generator=generator), warned  # (size,)


def curriculum_fraction(step: int, start_fraction: float, ramp_steps: int) -> float:
    """Gradual schedule: f(step) = start + (1 - start) * min(step / ramp_steps, 1), the share of the set in the pool."""
    _check_count("step", step, 0)
    _check_fraction("start_fraction", start_fraction)
    _check_count("ramp_steps", ramp_steps, 1)
    return start_fraction + (1.0 - start_fraction) * min(step / ramp_steps, 1.0)


def curriculum_pool(
    difficulty: torch.Tensor,
    step: int,
    schedule: str,
    *,
    switch_step: int = 0,
    hard_fraction: float = 0.5,
    start_fraction: float = 0.3,
    ramp_steps: int = 100,
) -> torch.Tensor:
    """Problems eligible at optimizer step ``step`` under a curriculum.

    The problems are ranked easiest first by a stable sort of ``difficulty`` (ties keep index order), so equal
    labels never make the pool depend on the sort implementation; "the hardest m" is the last m of that ranking.

    Args:
        difficulty: (P,) finite difficulty labels, higher is harder.
        step: optimizer step (>= 0).
        schedule: ``"staged"``: every problem while ``step < switch_step``, then the hardest
            ceil(hard_fraction * P) (the paper's ablation); ``"gradual"``: the easiest ceil(f(step) * P) with f rising
            linearly from ``start_fraction`` to 1 over ``ramp_steps`` steps (see :func:`curriculum_fraction`).
        switch_step, hard_fraction: staged schedule only.
        start_fraction, ramp_steps: gradual schedule only.

    Returns:
        (P,) bool mask of the eligible problems (never empty).
    """
    if schedule not in CURRICULUM_SCHEDULES:
        raise ValueError(f"schedule must be one of {list(CURRICULUM_SCHEDULES)}, got {schedule!r}")
    if not isinstance(difficulty, torch.Tensor) or difficulty.dim() != 1 or difficulty.numel() == 0:
        shape = getattr(difficulty, "shape", type(difficulty))
        raise ValueError(f"difficulty must be a non-empty 1-D tensor, got {shape}")
    if difficulty.dtype == torch.bool or difficulty.dtype.is_complex:
        raise ValueError(f"difficulty must be a real-valued tensor, got dtype {difficulty.dtype}")
    if difficulty.dtype.is_floating_point and not torch.isfinite(difficulty).all():
        raise ValueError("difficulty must be finite")
    _check_count("step", step, 0)
    _check_count("switch_step", switch_step, 0)
    _check_fraction("hard_fraction", hard_fraction)
    _check_fraction("start_fraction", start_fraction)
    _check_count("ramp_steps", ramp_steps, 1)

    num_problems = difficulty.numel()
    order = torch.sort(difficulty.detach().cpu(), stable=True).indices  # (P,) easiest first, ties by index
    mask = torch.zeros(num_problems, dtype=torch.bool)  # (P,)
    if schedule == "staged":
        if step < switch_step:
            mask[:] = True
        else:
            mask[order[num_problems - _fraction_count(hard_fraction, num_problems) :]] = True
    else:
        f = curriculum_fraction(step, start_fraction, ramp_steps)
        mask[order[: _fraction_count(f, num_problems)]] = True
    return mask


class CurriculumPool:
    """A curriculum over fixed labels: ``pool(step)`` is :func:`curriculum_pool` with the settings checked once.

    Args:
        difficulty: (num_problems,) difficulty labels, one per dataset row, higher is harder.
        num_problems: the dataset size the labels must match.
        schedule, switch_step, hard_fraction, start_fraction, ramp_steps: see :func:`curriculum_pool`.
    """

    def __init__(
        self,
        difficulty: torch.Tensor,
        num_problems: int,
        schedule: str = "staged",
        *,
        switch_step: int = 0,
        hard_fraction: float = 0.5,
        start_fraction: float = 0.3,
        ramp_steps: int = 100,
    ):
        if not isinstance(difficulty, torch.Tensor) or difficulty.shape != (num_problems,):
            raise ValueError(
                f"difficulty must be a tensor of shape ({num_problems},) (one label per dataset row), "
                f"got {getattr(difficulty, 'shape', type(difficulty))}"
            )
        self.difficulty = difficulty.detach().cpu()
        self.schedule = schedule
        self.kwargs = {
            "switch_step": switch_step,
            "hard_fraction": hard_fraction,
            "start_fraction": start_fraction,
            "ramp_steps": ramp_steps,
        }
        self(0)  # checks the schedule and its parameters now

    def __call__(self, step: int) -> torch.Tensor:
        """(P,) bool mask of the problems eligible at ``step``."""
        return curriculum_pool(self.difficulty, step, self.schedule, **self.kwargs)


def check_sampler_state(state: dict, version: int, layout: dict, hint: str) -> None:
    """Refuse a saved sampler state of another format version or another layout (dataset size, batch shape, kind);
    ``hint`` says what a matching run needs."""
    if state.get("version") != version:
        raise ValueError(f"unsupported sampler state version {state.get('version')!r}, expected {version}")
    for key, value in layout.items():
        if state.get(key) != value:
            raise ValueError(
                f"sampler state mismatch for {key}: the checkpoint has {state.get(key)!r}, this run {value!r} ({hint})"
            )
