"""The k1.5 settings of the Ray-based host adapters (verl, OpenRLHF), read and checked in one place; no host import.

:func:`k15_options` reads verl's ``algorithm.k15`` node: every key has a default, so an empty node means the paper's
defaults with the length penalty off and the host's own uniform sampling; unknown keys and out-of-range values raise
``ValueError`` naming the full key. :func:`build_prompt_sampler` turns the sampler settings into a
:class:`~k15_plugin.core.prompt_sampler.PromptSampler`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch

from k15_plugin.core.mirror_descent import ESTIMATORS
from k15_plugin.core.prompt_sampler import CurriculumPromptSampler, PrioritizedPromptSampler, PromptSampler
from k15_plugin.core.sampling import CURRICULUM_SCHEDULES

SAMPLER_TYPES = ("uniform", "prioritized", "curriculum")
PREFIX = "algorithm.k15"


@dataclass(frozen=True)
class LengthPenaltyOptions:
    weight: float = 0.0  # weight of the length reward added to the task reward (0: off)
    warmup_steps: int = 0  # trainer steps (rollout batches, counted from 0) before the penalty switches on
    ramp_steps: int = 0  # then rises linearly over this many steps (0: at once)


@dataclass(frozen=True)
class SamplerOptions:
    type: str = "uniform"  # uniform (the host's own), prioritized or curriculum
    prior: float = 0.5  # success rate credited to prompts not attempted yet
    floor: float = 0.05  # prioritized: smallest weight a prompt keeps
    difficulty_key: str = "difficulty"  # curriculum: dataset column (or dotted path, e.g. extra_info.difficulty)
    schedule: str = "staged"  # curriculum: staged (all, then the hardest part) or gradual (easy first, widening)
    switch_step: int = 0  # staged: trainer step from which only the hardest prompts are drawn
    hard_fraction: float = 0.5  # staged: share of the set kept after the switch
    start_fraction: float = 0.3  # gradual: easiest share of the set at step 0
    ramp_steps: int = 100  # gradual: steps to widen the pool to the whole set


@dataclass(frozen=True)
class K15Options:
    tau: float = 1.0  # KL weight tau of the mirror-descent objective; b = tau log Z
    log_z_estimator: str = "mean"  # mean or log_mean_exp
    correct_threshold: float = 1.0  # a reward >= this counts as correct (length penalty, sampler statistics)
    reset_optimizer_each_iteration: bool = True  # fresh optimizer state for every rollout batch (paper 2.3.2)
    length_penalty: LengthPenaltyOptions = field(default_factory=LengthPenaltyOptions)
    sampler: SamplerOptions = field(default_factory=SamplerOptions)


def _read(cls, node, prefix: str):
    node = {} if node is None else node
    if not isinstance(node, Mapping):
        raise ValueError(f"{prefix} must be a mapping, got {type(node).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(node) - set(known))
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]}: unknown key (known: {', '.join(known)})")
    values = {}
    for name in known:
        if name not in node:
            continue
        value = node[name]
        key = f"{prefix}.{name}"
        if name == "length_penalty":
            values[name] = _read(LengthPenaltyOptions, value, key)
        elif name == "sampler":
            values[name] = _read(SamplerOptions, value, key)
        else:
            values[name] = _coerce(value, type(getattr(cls(), name)), key)
    return cls(**values)


def _coerce(value, kind: type, key: str):
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _check(ok: bool, key: str, message: str, value) -> None:
    if not ok:
        raise ValueError(f"{PREFIX}.{key} {message}, got {value!r}")


def k15_options(algorithm) -> K15Options:
    """Read and check ``algorithm.k15`` from verl's ``algorithm`` config node (a DictConfig, dict or None)."""
    node = None if algorithm is None else algorithm.get("k15", None)
    o = _read(K15Options, node, PREFIX)
    lp, s = o.length_penalty, o.sampler
    _check(o.tau > 0, "tau", "must be > 0", o.tau)
    _check(o.log_z_estimator in ESTIMATORS, "log_z_estimator", f"must be one of {list(ESTIMATORS)}", o.log_z_estimator)
    _check(lp.weight >= 0, "length_penalty.weight", "must be >= 0", lp.weight)
    _check(lp.warmup_steps >= 0, "length_penalty.warmup_steps", "must be >= 0", lp.warmup_steps)
    _check(lp.ramp_steps >= 0, "length_penalty.ramp_steps", "must be >= 0", lp.ramp_steps)
    _check(s.type in SAMPLER_TYPES, "sampler.type", f"must be one of {list(SAMPLER_TYPES)}", s.type)
    _check(0 <= s.prior <= 1, "sampler.prior", "must be in [0, 1]", s.prior)
    _check(0 < s.floor <= 1, "sampler.floor", "must be in (0, 1]", s.floor)
    _check(bool(s.difficulty_key), "sampler.difficulty_key", "must be a column name", s.difficulty_key)
    _check(
        s.schedule in CURRICULUM_SCHEDULES,
        "sampler.schedule",
        f"must be one of {list(CURRICULUM_SCHEDULES)}",
        s.schedule,
    )
    _check(s.switch_step >= 0, "sampler.switch_step", "must be >= 0", s.switch_step)
    _check(0 < s.hard_fraction <= 1, "sampler.hard_fraction", "must be in (0, 1]", s.hard_fraction)
    _check(0 < s.start_fraction <= 1, "sampler.start_fraction", "must be in (0, 1]", s.start_fraction)
    _check(s.ramp_steps >= 1, "sampler.ramp_steps", "must be >= 1", s.ramp_steps)
    return o


def build_prompt_sampler(
    options: SamplerOptions, num_problems: int, chunk_size: int, seed: int, difficulty: torch.Tensor | None = None
) -> PromptSampler | None:
    """The prompt sampler for ``options`` (None for ``uniform``: the host keeps its own); ``difficulty`` (P,) is
    needed by the curriculum."""
    if options.type == "uniform":
        return None
    if options.type == "prioritized":
        return PrioritizedPromptSampler(num_problems, chunk_size, seed=seed, prior=options.prior, floor=options.floor)
    if difficulty is None:
        raise ValueError("the curriculum sampler needs difficulty labels")
    return CurriculumPromptSampler(
        num_problems,
        chunk_size,
        seed=seed,
        prior=options.prior,
        difficulty=difficulty,
        schedule=options.schedule,
        switch_step=options.switch_step,
        hard_fraction=options.hard_fraction,
        start_fraction=options.start_fraction,
        ramp_steps=options.ramp_steps,
    )
