"""A host-independent prompt sampler for curriculum and prioritized sampling (section 2.3.4).

Hosts whose data loader hands out prompts once per rollout batch (verl, OpenRLHF) use :class:`PromptSampler`
directly as the ``sampler`` of a torch or torchdata data loader: it yields dataset row indices, one *chunk* of
``chunk_size`` distinct prompts per rollout batch, drawn when the loader asks for the chunk's first index, so a chunk
sees the success statistics of every rollout batch reported before it. (TRL repeats and interleaves prompts itself,
so :mod:`k15_plugin.trl.samplers` keeps its own layout over the same weights.)

The state is a no-argument :meth:`PromptSampler.state_dict` / :meth:`PromptSampler.load_state_dict` pair, the
``Stateful`` protocol of torchdata's ``StatefulDataLoader``: the loader saves it with its own state and restores it
before it iterates again, and the sampler then continues the epoch it was in, with the same generator, statistics
and current chunk, so a resumed run draws exactly the prompts the uninterrupted run would have drawn. That holds when
the loader does not prefetch (``num_workers=0``): with worker processes, batches are drawn ahead of the statistics
and the state saved is the main process's, not the workers'.

Which rows a batch holds: the host reads them back with :meth:`PromptSampler.pop_emitted` right after each batch,
then reports one success flag per completion with :meth:`PromptSampler.update`.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from k15_plugin.core.sampling import (
    CurriculumPool,
    SuccessRateTracker,
    check_sampler_state,
    draw_chunk,
    prioritized_weights,
)
from k15_plugin.core.settings import SamplerSettings

_STATE_VERSION = 1


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class PromptSampler(Sampler[int]):
    """Yields dataset rows chunk by chunk; subclasses say which rows a chunk may hold (:meth:`chunk_weights`).

    A chunk is ``chunk_size`` distinct rows drawn with ``torch.multinomial(weights, chunk_size,
    replacement=False)`` from the sampler's own generator (with replacement, and a warning once, when fewer rows
    are eligible). An epoch is ``num_problems // chunk_size`` chunks, as a loader with ``drop_last=True`` makes of
    a shuffled set; ``len(sampler)`` is the number of rows an epoch yields.

    Args:
        num_problems: P, the number of dataset rows.
        chunk_size: distinct prompts per rollout batch (a multiple of the loader's batch size).
        seed: seed of the sampler's generator.
        prior: success rate credited to rows not attempted yet.
        steps_per_chunk: trainer steps per rollout batch, to place chunk c at step ``c * steps_per_chunk`` (the
            curriculum's schedule is in trainer steps).
    """

    def __init__(
        self, num_problems: int, chunk_size: int, *, seed: int = 0, prior: float = 0.5, steps_per_chunk: int = 1
    ):
        _check_int("num_problems", num_problems, 1)
        _check_int("chunk_size", chunk_size, 1)
        _check_int("seed", seed, 0)
        _check_int("steps_per_chunk", steps_per_chunk, 1)
        if chunk_size > num_problems:
            raise ValueError(
                f"chunk_size ({chunk_size} prompts per rollout batch) must not exceed the dataset size ({num_problems})"
            )
        self.num_problems = num_problems
        self.chunk_size = chunk_size
        self.seed = seed
        self.steps_per_chunk = steps_per_chunk
        self.tracker = SuccessRateTracker(num_problems, prior)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.chunks_per_epoch = num_problems // chunk_size
        self.epoch = -1  # the epoch being iterated; -1 before the first iter()
        self.position = 0  # rows yielded in this epoch
        self.chunk: torch.Tensor | None = None  # (chunk_size,) the chunk being yielded
        self.num_chunks_drawn = 0
        self.num_updates = 0
        self._resuming = False
        self._emitted: collections.deque[int] = collections.deque()  # yielded, not yet claimed by pop_emitted
        self._warned_replacement = False

    # ------------------------------------------------------------------------------------------------------------------

    def chunk_weights(self, chunk_number: int) -> torch.Tensor:
        """(P,) non-negative weights for chunk ``chunk_number`` (counted over all epochs); 0 = not eligible."""
        raise NotImplementedError

    def step_of_chunk(self, chunk_number: int) -> int:
        """Trainer step (0-based) at which chunk ``chunk_number`` is trained on."""
        return chunk_number * self.steps_per_chunk

    def _draw_chunk(self) -> torch.Tensor:
        chunk, self._warned_replacement = draw_chunk(
            self.chunk_weights(self.num_chunks_drawn),
            self.chunk_size,
            self.generator,
            who=type(self).__name__,
            batch="rollout batch",
            warned=self._warned_replacement,
            stacklevel=3,
        )
        self.num_chunks_drawn += 1
        return chunk  # (chunk_size,)

    # ------------------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.chunks_per_epoch * self.chunk_size

    def __iter__(self) -> Iterator[int]:
        if self._resuming:  # the first iter() after load_state_dict continues the saved epoch
            self._resuming = False
        else:
            self.epoch += 1
            self.position = 0
            self.chunk = None
        return self._stream()

    def _stream(self) -> Iterator[int]:
        while self.position < len(self):
            offset = self.position % self.chunk_size
            if offset == 0:  # the position moves past a chunk's first row in the same step that draws it
                self.chunk = self._draw_chunk()
            index = int(self.chunk[offset])
            self.position += 1
            self._emitted.append(index)
            yield index

    def pop_emitted(self, count: int | None = None) -> list[int]:
        """The next ``count`` rows yielded and not yet claimed, in yield order (the rows of the batch just fetched);
        all of them when ``count`` is None."""
        count = len(self._emitted) if count is None else count
        _check_int("count", count, 0)
        if count > len(self._emitted):
            raise RuntimeError(
                f"{type(self).__name__}: {count} rows asked for, {len(self._emitted)} yielded and unclaimed (is the "
                "data loader prefetching? use num_workers=0)"
            )
        return [self._emitted.popleft() for _ in range(count)]

    def update(self, indices: torch.Tensor, successes: torch.Tensor) -> None:
        """Record one rollout batch: (N,) row indices and (N,) success flags (or credit in [0, 1]), one per sample."""
        self.tracker.update(indices, successes)
        self.num_updates += 1

    # ------------------------------------------------------------------------------------------------------------------

    def _layout(self) -> dict:
        return {"kind": type(self).__name__, "num_problems": self.num_problems, "chunk_size": self.chunk_size}

    def state_dict(self) -> dict:
        """Everything needed to continue the stream exactly: statistics, generator, epoch, position, current chunk."""
        return {
            "version": _STATE_VERSION,
            **self._layout(),
            "tracker": self.tracker.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "position": self.position,
            "chunk": None if self.chunk is None else self.chunk.clone(),
            "num_chunks_drawn": self.num_chunks_drawn,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the next ``iter()`` continues the saved epoch where it stopped."""
        check_sampler_state(
            state, _STATE_VERSION, self._layout(), "resume with the same dataset, sampler and rollout batch size"
        )
        self.tracker.load_state_dict(state["tracker"])
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.chunk = None if state["chunk"] is None else state["chunk"].clone()
        self.num_chunks_drawn = int(state["num_chunks_drawn"])
        self.num_updates = int(state["num_updates"])
        self._emitted.clear()
        self._resuming = self.epoch >= 0


class PrioritizedPromptSampler(PromptSampler):
    """Row i with probability proportional to max(1 - s_i, floor) (or max(s_i (1 - s_i), floor) with ``priority``
    ``"learnability"``), s_i its success rate so far."""

    def __init__(self, num_problems: int, chunk_size: int, *, floor: float = 0.05, priority: str = "failure", **kwargs):
        super().__init__(num_problems, chunk_size, **kwargs)
        prioritized_weights(torch.zeros(1), floor, priority)  # validates them now rather than at the first draw
        self.floor, self.priority = floor, priority

    def chunk_weights(self, chunk_number: int) -> torch.Tensor:
        """(P,) float64 weights (:func:`~k15_plugin.core.sampling.prioritized_weights`) from the success rates reported
        so far (``prior`` for rows not attempted yet); ``chunk_number`` is unused: only the statistics change between
        chunks."""
        return prioritized_weights(self.tracker.rates(), self.floor, self.priority)  # (P,)


class CurriculumPromptSampler(PromptSampler):
    """Uniform over the :class:`~k15_plugin.core.sampling.CurriculumPool` at the chunk's trainer step.

    Args:
        difficulty: (P,) difficulty labels, higher is harder.
        schedule, switch_step, hard_fraction, start_fraction, ramp_steps: see ``curriculum_pool`` (steps are
            trainer steps, :meth:`PromptSampler.step_of_chunk`).
    """

    def __init__(
        self,
        num_problems: int,
        chunk_size: int,
        *,
        difficulty: torch.Tensor,
        schedule: str = "staged",
        switch_step: int = 0,
        hard_fraction: float = 0.5,
        start_fraction: float = 0.3,
        ramp_steps: int = 100,
        **kwargs,
    ):
        super().__init__(num_problems, chunk_size, **kwargs)
        self.pool = CurriculumPool(
            difficulty,
            num_problems,
            schedule,
            switch_step=switch_step,
            hard_fraction=hard_fraction,
            start_fraction=start_fraction,
            ramp_steps=ramp_steps,
        )
        self.difficulty = self.pool.difficulty

    def chunk_weights(self, chunk_number: int) -> torch.Tensor:
        """(P,) float64 0/1 weights: 1 for the rows in the curriculum pool at the chunk's trainer step
        (:meth:`PromptSampler.step_of_chunk`), so the chunk is drawn uniformly from that pool."""
        return self.pool(self.step_of_chunk(chunk_number)).to(torch.float64)  # (P,)


def build_prompt_sampler(
    options: SamplerSettings, num_problems: int, chunk_size: int, seed: int, difficulty: torch.Tensor | None = None
) -> PromptSampler | None:
    """The prompt sampler for the ``sampler`` settings (None for ``uniform``: the host keeps its own); ``difficulty``
    (P,) is needed by the curriculum. Used by the Ray-based hosts (verl, OpenRLHF)."""
    if options.name == "uniform":
        return None
    if options.name == "prioritized":
        return PrioritizedPromptSampler(
            num_problems, chunk_size, seed=seed, prior=options.prior, floor=options.floor, priority=options.priority
        )
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
