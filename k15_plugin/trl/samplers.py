"""Curriculum and prioritized prompt samplers for TRL, Kimi k1.5 (arXiv 2501.12599), section 2.3.4.

The samplers replace TRL's ``RepeatSampler`` and keep its contract exactly: the index stream is a sequence of
*chunks*, one chunk being one generation batch of ``batch_size`` distinct prompts; each chunk is emitted
``repeat_count`` times (``num_iterations * steps_per_generation``, TRL reuses one rollout batch for that many
micro-batches) and, inside, each index ``mini_repeat_count`` (= ``num_generations``) times consecutively, so one
prompt's completions form one group. Every process holds an identical sampler (same seed, its own
``torch.Generator``, statistics fed with the gathered rewards), so all processes agree on the prompts.

What a chunk contains is the paper's choice, from :mod:`k15_plugin.core.sampling`: problem i with probability
proportional to max(1 - s_i, floor) (:class:`PrioritizedSampler`), or uniformly from a difficulty-ordered pool
(:class:`CurriculumSampler`). The state (success statistics, generator, and the chunks drawn but not yet trained on)
is saved with every TRL checkpoint by :class:`K15SamplerMixin`, so ``trainer.train(resume_from_checkpoint=...)``
draws exactly the prompts the uninterrupted run would have drawn.

Resume, in short: the checkpoint stores the tracker, the generator state and the chunks drawn from the one the
checkpoint falls in onwards (prefetched ahead of training, with the statistics of that moment). On resume the sampler
first re-emits the micro-batches transformers' ``skip_first_batches`` throws away (placeholders; none with
``ignore_data_skip``), then replays the stored chunks, then draws live from the restored generator. TRL regenerates
the rollout batch a checkpoint falls inside; its second report to :meth:`K15RepeatSampler.update` is dropped, and the
mixin restores TRL's micro-step counter ``_step`` so later rollout batches start at the uninterrupted run's steps.

Private TRL 1.16 / transformers methods overridden by the mixin: ``_get_train_sampler``, ``_save_checkpoint``,
``_load_optimizer_and_scheduler``; iterable datasets are refused at construction (:func:`check_sampler_dataset`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

from k15_plugin.core.sampling import (
    CurriculumPool,
    SuccessRateTracker,
    check_sampler_state,
    draw_chunk,
    prioritized_weights,
)

SAMPLER_STATE_NAME = "k15_sampler_state.pt"
_STATE_VERSION = 1
# transformers' checkpoint folder prefix (transformers.trainer_utils.PREFIX_CHECKPOINT_DIR); repeated here so this
# module imports nothing from the host beyond torch.
_CHECKPOINT_PREFIX = "checkpoint"


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class K15RepeatSampler(Sampler[int]):
    r"""``RepeatSampler``-compatible sampler whose chunks are drawn from weights that change during training.

    Subclasses define :meth:`chunk_weights`; this class owns the stream layout, the success statistics
    (:meth:`update`), and checkpointing (:meth:`state_dict` / :meth:`load_state_dict`).

    Chunks are drawn lazily, when the data loader asks for the chunk's first index, with
    ``torch.multinomial(weights, batch_size, replacement=False)``, so a chunk's prompts are distinct. When fewer than
    ``batch_size`` problems have a positive weight (a curriculum pool smaller than a generation batch), the draw falls
    back to sampling with replacement and warns once. Without replacement the chance that a problem is *in* a chunk is
    only approximately proportional to its weight (the first draw of a chunk is exact); the gap grows with
    ``batch_size / P``.

    **Statistics lag.** The trainer calls :meth:`update` once per generation batch, in the training step that generates
    it, but the data loader runs ahead of training: transformers fetches the ``gradient_accumulation_steps``
    micro-batches of an optimizer step before running them, and accelerate's ``DataLoaderShard`` prefetches one more.
    With u = ``repeat_count / gradient_accumulation_steps`` optimizer steps per chunk (:attr:`updates_per_chunk`),
    chunk c is drawn while the batches of optimizer step ceil(c * u) - 1 are fetched, before that step trains; it sees
    the statistics of every generation batch that started at an earlier step:

    * default layout (``num_iterations=1``, ``steps_per_generation == gradient_accumulation_steps``, u = 1): chunk c
      sees generation batches 0 .. c-2 -- one generation batch of lag (chunks 0 and 1 both see the prior only);
    * ``num_iterations=2`` (u = 2): chunk c sees batches 0 .. c-1 -- no lag;
    * ``steps_per_generation=1`` with ``gradient_accumulation_steps=2`` (u = 1/2): chunks 2m+1 and 2m+2 see
      batches 0 .. 2m-1.

    The prefetch stops at an epoch's end, so the first chunk of an epoch sees every batch before it.
    ``dataloader_num_workers > 0`` adds the workers' prefetch (``prefetch_factor * num_workers`` micro-batches).

    Args:
        data_source: the training dataset (only its length is used).
        mini_repeat_count: times each index repeats consecutively (TRL: ``num_generations``).
        batch_size: distinct prompts per chunk (TRL: ``generation_batch_size // num_generations``).
        repeat_count: times each chunk is emitted (TRL: ``num_iterations * steps_per_generation``).
        gradient_accumulation_steps: micro-batches per optimizer step, to map chunks to optimizer steps and
            checkpoints to stream positions the way transformers does.
        seed: seed of the sampler's own generator (TRL: ``args.seed``); ``None`` seeds it from the global RNG once.
        prior: success rate credited to problems not attempted yet.
    """

    def __init__(
        self,
        data_source: Sized,
        mini_repeat_count: int,
        batch_size: int = 1,
        repeat_count: int = 1,
        *,
        gradient_accumulation_steps: int = 1,
        seed: int | None = None,
        prior: float = 0.5,
    ):
        for name, value in (
            ("mini_repeat_count", mini_repeat_count),
            ("batch_size", batch_size),
            ("repeat_count", repeat_count),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
        ):
            _check_positive_int(name, value)
        num_samples = len(data_source)
        if num_samples < batch_size:
            # RepeatSampler would silently yield nothing (and the Trainer would train zero steps).
            raise ValueError(
                f"batch_size ({batch_size} prompts per generation batch) must not exceed the dataset size "
                f"({num_samples})"
            )
        self.data_source = data_source
        self.num_samples = num_samples
        self.mini_repeat_count = mini_repeat_count
        self.batch_size = batch_size
        self.repeat_count = repeat_count
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.seed = seed
        # Named `generator` like RepeatSampler's: accelerate then keeps it synchronized across processes as well.
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        self.tracker = SuccessRateTracker(num_samples, prior)
        self.num_chunks_per_epoch = num_samples // batch_size  # RepeatSampler drops the incomplete last chunk too
        self.num_chunks_drawn = 0
        self.num_updates = 0
        self._next_epoch = 0
        self._records: dict[int, torch.Tensor] = {}  # chunk position in epoch -> (batch_size,) indices, this epoch
        self._records_epoch: int | None = None
        self._resume: dict | None = None  # plan for the first iteration after load_state_dict
        self._pending_duplicate: torch.Tensor | None = None  # chunk whose regenerated statistics must not count twice
        self._warned_replacement = False

    # ------------------------------------------------------------------------------------------------------------------
    # What a chunk contains
    # ------------------------------------------------------------------------------------------------------------------

    def chunk_weights(self, chunk_number: int) -> torch.Tensor:
        """(P,) non-negative weights for chunk ``chunk_number`` (counted over all epochs); 0 = not eligible."""
        raise NotImplementedError

    @property
    def updates_per_chunk(self) -> float:
        """Optimizer steps per chunk: ``num_iterations * steps_per_generation / gradient_accumulation_steps``."""
        return self.repeat_count / self.gradient_accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the sampler, computed as transformers does (``num_update_steps_per_epoch``)."""
        return max(math.ceil(self.num_chunks_per_epoch * self.repeat_count / self.gradient_accumulation_steps), 1)

    def step_of_chunk(self, chunk_number: int) -> int:
        """Optimizer step (completed steps, 0-based) at which chunk ``chunk_number`` starts being trained on.

        floor(chunk_number * updates_per_chunk) within an epoch; across epochs transformers lets a last, shorter
        accumulation step end each epoch, which this follows.
        """
        epoch, position = divmod(chunk_number, self.num_chunks_per_epoch)
        return epoch * self.steps_per_epoch + (position * self.repeat_count) // self.gradient_accumulation_steps

    def _draw_chunk(self, chunk_number: int) -> torch.Tensor:
        chunk, self._warned_replacement = draw_chunk(
            self.chunk_weights(chunk_number),
            self.batch_size,
            self.generator,
            who=type(self).__name__,
            batch="generation batch",
            warned=self._warned_replacement,
        )
        self.num_chunks_drawn += 1
        return chunk  # (batch_size,)

    # ------------------------------------------------------------------------------------------------------------------
    # Statistics
    # ------------------------------------------------------------------------------------------------------------------

    def update(self, indices: torch.Tensor, successes: torch.Tensor, scored: torch.Tensor | None = None) -> None:
        """Record one generation batch: (N,) gathered dataset indices and (N,) success flags, one per completion.

        ``scored``: optional (N,) bool; completions marked False (no reward function could score them) are not
        counted as attempts. After a resume inside a rollout batch, TRL regenerates that batch (its completions are
        not checkpointed) and reports it again; its statistics are already in the restored tracker, so that one report
        is dropped.
        """
        if self._pending_duplicate is not None:
            expected = self._pending_duplicate.repeat_interleave(self.mini_repeat_count).sort().values  # (N,)
            self._pending_duplicate = None
            got = indices.detach().cpu().to(torch.int64).sort().values
            if got.shape == expected.shape and torch.equal(got, expected):
                return
            warnings.warn(
                f"{type(self).__name__}: the first generation batch after resuming is not the rollout batch the "
                "checkpoint was taken in; counting it (the statistics may differ from an uninterrupted run).",
                stacklevel=2,
            )
        if scored is not None:
            indices, successes = indices[scored], successes[scored]
        self.tracker.update(indices, successes)
        self.num_updates += 1

    # ------------------------------------------------------------------------------------------------------------------
    # The index stream
    # ------------------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_chunks_per_epoch * self.batch_size * self.mini_repeat_count * self.repeat_count

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate/transformers before each pass; without it, each ``iter()`` is the next epoch."""
        self._next_epoch = int(epoch)

    def _emit(self, chunk: list[int], times: int) -> Iterator[int]:
        for _ in range(times):
            for index in chunk:
                for _ in range(self.mini_repeat_count):
                    yield index

    def __iter__(self) -> Iterator[int]:
        # Decide epoch and resume plan now, not at the first next(): set_epoch/load_state_dict may follow iter().
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        plan = self._resume if self._resume is not None and self._resume["epoch"] == epoch else None
        self._resume = None
        self._records = {}
        self._records_epoch = epoch
        return self._stream(epoch, plan)

    def _stream(self, epoch: int, plan: dict | None) -> Iterator[int]:
        nc, r = self.num_chunks_per_epoch, self.repeat_count
        position = 0
        if plan is not None:
            first, offset = plan["first_chunk"], plan["offset"]
            if plan["skip_consumed"]:
                # transformers' skip_first_batches reads (and throws away) the micro-batches already trained on in
                # this epoch: any valid indices do, as long as there are exactly as many. No draw, no statistics.
                placeholder = list(range(self.batch_size))
                for _ in range(first):
                    yield from self._emit(placeholder, r)
            for j, chunk in enumerate(plan["records"], start=first):
                self._records[j] = chunk
                # The chunk the checkpoint fell in: its first `offset` repeats were trained on before the checkpoint.
                # With skipping they are emitted and skipped; with ignore_data_skip only the remaining ones are.
                times = r - offset if (j == first and not plan["skip_consumed"]) else r
                yield from self._emit(chunk.tolist(), times)
            position = first + len(plan["records"])
        for j in range(position, nc):
            chunk = self._draw_chunk(epoch * nc + j)
            self._records[j] = chunk
            yield from self._emit(chunk.tolist(), r)

    # ------------------------------------------------------------------------------------------------------------------
    # Checkpointing
    # ------------------------------------------------------------------------------------------------------------------

    def _layout(self) -> dict:
        return {
            "kind": type(self).__name__,
            "num_problems": self.num_samples,
            "batch_size": self.batch_size,
            "mini_repeat_count": self.mini_repeat_count,
            "repeat_count": self.repeat_count,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }

    def state_dict(self, global_step: int) -> dict:
        """State to resume at optimizer step ``global_step`` (the checkpoint's ``state.global_step``).

        Beyond the statistics and the generator, it keeps the chunks of the current epoch from the one the
        checkpoint falls in onwards: the data loader drew them ahead of training (prefetch), with the statistics of
        that moment, so a resumed run must replay them rather than draw again.
        """
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be an integer >= 0, got {global_step!r}")
        epoch, step_in_epoch = divmod(global_step, self.steps_per_epoch)
        batches = step_in_epoch * self.gradient_accumulation_steps  # micro-batches into the epoch, as transformers
        first, offset = divmod(batches, self.repeat_count)
        records = []
        if self._records_epoch == epoch:
            j = first
            while j in self._records:
                records.append(self._records[j])
                j += 1
        elif self._records_epoch is not None and self._records_epoch > epoch:
            warnings.warn(
                f"{type(self).__name__}: saving for step {global_step} (epoch {epoch}) but the sampler already "
                f"iterates epoch {self._records_epoch}; a resume from this state will not be exact.",
                stacklevel=2,
            )
        return {
            "version": _STATE_VERSION,
            **self._layout(),
            "tracker": self.tracker.state_dict(),
            "generator": self.generator.get_state(),
            "global_step": global_step,
            "epoch": epoch,
            "first_chunk": first,
            "offset": offset,
            # training_step calls so far (GRPOTrainer._step): full epochs plus the micro-batches of this one
            "micro_batches": epoch * self.num_chunks_per_epoch * self.repeat_count + batches,
            "records": torch.stack(records) if records else torch.zeros(0, self.batch_size, dtype=torch.int64),
            "num_chunks_drawn": self.num_chunks_drawn,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict, *, skip_consumed: bool = True) -> None:
        """Restore a :meth:`state_dict`; the next ``iter()`` continues the stream where the checkpoint left it.

        Args:
            state: from :meth:`state_dict` of a sampler with the same layout.
            skip_consumed: ``True`` when the trainer skips the micro-batches already trained on in the resumed epoch
                (transformers' default): they are emitted again as placeholders. ``False`` (``ignore_data_skip``):
                the stream starts directly with what was not trained on yet.
        """
        check_sampler_state(
            state, _STATE_VERSION, self._layout(), "resume with the same dataset, sampler_type and batch layout"
        )
        self.tracker.load_state_dict(state["tracker"])
        self.generator.set_state(state["generator"])
        self.num_chunks_drawn = int(state["num_chunks_drawn"])
        self.num_updates = int(state["num_updates"])
        records = [row.clone() for row in state["records"]]
        self._next_epoch = int(state["epoch"])
        self._resume = {
            "epoch": int(state["epoch"]),
            "first_chunk": int(state["first_chunk"]),
            "offset": int(state["offset"]),
            "records": records,
            "skip_consumed": bool(skip_consumed),
        }
        self._pending_duplicate = None
        if state["offset"] > 0:
            if records:
                self._pending_duplicate = records[0]
            else:
                warnings.warn(
                    f"{type(self).__name__}: the checkpoint falls inside a rollout batch that was never recorded; "
                    "it will be drawn again and the resumed run will not be exact.",
                    stacklevel=2,
                )

    @staticmethod
    def micro_batches_of(state: dict) -> int:
        """Micro-batches (``training_step`` calls) trained before the checkpoint ``state`` was taken."""
        return int(state["micro_batches"])


class PrioritizedSampler(K15RepeatSampler):
    """Prioritized sampling (section 2.3.4): problem i with probability proportional to max(1 - s_i, floor), or
    max(s_i (1 - s_i), floor) with ``priority="learnability"``.

    s_i is the cumulative success rate of problem i (``prior`` before its first attempt), read when the chunk is
    drawn (see the statistics lag in :class:`K15RepeatSampler`).

    Args:
        floor: smallest weight a problem keeps (TRL config: ``prioritized_floor``).
        priority: ``"failure"`` (1 - s_i, the paper's) or ``"learnability"`` (TRL config: ``prioritized_priority``).
        Others: see :class:`K15RepeatSampler`.
    """

    def __init__(
        self,
        data_source: Sized,
        mini_repeat_count: int,
        batch_size: int = 1,
        repeat_count: int = 1,
        *,
        floor: float = 0.05,
        priority: str = "failure",
        **kwargs,
    ):
        super().__init__(data_source, mini_repeat_count, batch_size, repeat_count, **kwargs)
        prioritized_weights(torch.zeros(1), floor, priority)  # validates them now rather than at the first draw
        self.floor, self.priority = floor, priority

    def chunk_weights(self, chunk_number: int) -> torch.Tensor:
        """(P,) float64 weights (:func:`~k15_plugin.core.sampling.prioritized_weights`) from the success rates at the
        time of the draw; ``chunk_number`` is unused: only the statistics change between chunks."""
        return prioritized_weights(self.tracker.rates(), self.floor, self.priority)  # (P,)


class CurriculumSampler(K15RepeatSampler):
    """Curriculum sampling (section 2.3.4): uniform over the pool of :func:`~k15_plugin.core.sampling.curriculum_pool`.

    The pool is the one of the optimizer step at which the chunk starts being trained on
    (:meth:`K15RepeatSampler.step_of_chunk`), so it follows the schedule exactly whatever the prefetch. The success
    statistics are still tracked (for inspection) but do not affect the draws.

    Args:
        difficulty: (P,) difficulty labels, higher is harder.
        schedule, switch_step, hard_fraction, start_fraction, ramp_steps: see ``curriculum_pool``.
        Others: see :class:`K15RepeatSampler`.
    """

    def __init__(
        self,
        data_source: Sized,
        mini_repeat_count: int,
        batch_size: int = 1,
        repeat_count: int = 1,
        *,
        difficulty: torch.Tensor,
        schedule: str = "staged",
        switch_step: int = 0,
        hard_fraction: float = 0.5,
        start_fraction: float = 0.3,
        ramp_steps: int = 100,
        **kwargs,
    ):
        super().__init__(data_source, mini_repeat_count, batch_size, repeat_count, **kwargs)
        # pool(step): the (P,) bool mask of the problems eligible at optimizer step ``step``
        self.pool = CurriculumPool(
            difficulty,
            self.num_samples,
            schedule,
            switch_step=switch_step,
            hard_fraction=hard_fraction,
            start_fraction=start_fraction,
            ramp_steps=ramp_steps,
        )
        self.difficulty = self.pool.difficulty

    def chunk_weights(self, chunk_number: int) -> torch.Tensor:
        """(P,) float64 0/1 weights: 1 for the problems in the pool of the optimizer step at which the chunk starts
        being trained on (:meth:`K15RepeatSampler.step_of_chunk`), not the step at which it is drawn."""
        return self.pool(self.step_of_chunk(chunk_number)).to(torch.float64)  # (P,) 1 in the pool, 0 outside


# ----------------------------------------------------------------------------------------------------------------------
# Trainer glue
# ----------------------------------------------------------------------------------------------------------------------


def check_sampler_dataset(sampler_type: str, dataset) -> None:
    """Refuse a dataset the sampler cannot index: TRL never calls ``_get_train_sampler`` for an iterable dataset, so
    the plugin's samplers would silently be replaced by TRL's buffered shuffle."""
    if sampler_type != "uniform" and is_iterable_dataset(dataset):
        raise ValueError(
            f"sampler_type={sampler_type!r} needs a map-style (indexable) train_dataset, got an iterable dataset: "
            "use a datasets.Dataset, or sampler_type='uniform'"
        )


def is_iterable_dataset(dataset) -> bool:
    """True for a torch ``IterableDataset`` or a ``datasets.IterableDataset`` (datasets need not be installed)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return True
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover
        return False
    return isinstance(dataset, IterableDataset)


class K15SamplerMixin:
    """Puts the plugin's samplers into a TRL trainer (``GRPOTrainer``, ``RLOOTrainer``) and checkpoints them.

    Place it first in the bases (``class T(K15SamplerMixin, GRPOTrainer)``); the config must carry the
    :class:`~k15_plugin.trl.config.K15Options` fields. With ``sampler_type="uniform"`` everything is TRL's own. The
    trainer feeds the statistics: once per generation batch, in train mode, it calls
    ``self._k15_sampler.update(gathered_indices, successes)`` (see ``K15TrainerMixin._calculate_rewards``).
    ``shuffle_dataset`` has no effect on the plugin's samplers, which always draw at random.

    Resume: transformers builds the data loader (and so the sampler) before it calls
    ``_load_optimizer_and_scheduler``, and iterates it only later, so restoring the sampler there is in time.
    """

    _k15_sampler: K15RepeatSampler | None = None

    # Overrides GRPOTrainer/RLOOTrainer._get_train_sampler.
    def _get_train_sampler(self, dataset=None):
        args = self.args
        if getattr(args, "sampler_type", "uniform") == "uniform":  # also a plain GRPOConfig/RLOOConfig
            self._k15_sampler = None
            return super()._get_train_sampler(dataset)
        if dataset is None:
            dataset = self.train_dataset
        common = {
            "mini_repeat_count": self.num_generations,
            "batch_size": args.generation_batch_size // self.num_generations,
            "repeat_count": self.num_iterations * args.steps_per_generation,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "seed": args.seed,
            "prior": args.prioritized_prior,
        }
        if args.sampler_type == "prioritized":
            sampler = PrioritizedSampler(
                dataset, floor=args.prioritized_floor, priority=args.prioritized_priority, **common
            )
        elif args.sampler_type == "curriculum":
            sampler = CurriculumSampler(
                dataset,
                difficulty=self._k15_difficulty(dataset),
                schedule=args.curriculum_schedule,
                switch_step=args.curriculum_switch_step,
                hard_fraction=args.curriculum_hard_fraction,
                start_fraction=args.curriculum_start_fraction,
                ramp_steps=args.curriculum_ramp_steps,
                **common,
            )
        else:  # K15Options.__post_init__ already rejects other values
            raise ValueError(f"unknown sampler_type {args.sampler_type!r}")
        self._k15_sampler = sampler
        return sampler

    def _k15_difficulty(self, dataset) -> torch.Tensor:
        column = self.args.curriculum_difficulty_column
        columns = list(getattr(dataset, "column_names", None) or [])
        source = dataset
        if column not in columns:
            # remove_unused_columns=True may have dropped it from the loader's copy; the original rows are the same.
            full = self.train_dataset
            if column in (getattr(full, "column_names", None) or []) and len(full) == len(dataset):
                source = full
            else:
                raise ValueError(
                    f"curriculum_difficulty_column={column!r} is not a column of the training dataset; "
                    f"columns present: {columns}"
                )
        values = list(source[column])
        try:
            difficulty = torch.tensor(values, dtype=torch.float64)  # (P,)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"curriculum_difficulty_column={column!r} must hold one number per row, got e.g. {values[:3]!r}"
            ) from err
        if not torch.isfinite(difficulty).all():
            raise ValueError(f"curriculum_difficulty_column={column!r} holds non-finite values")
        return difficulty

    # Overrides GRPOTrainer/RLOOTrainer._save_checkpoint: same pattern as TRL's entropy_ctrl_state.json.
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        sampler = self._k15_sampler
        if sampler is not None and self.args.should_save:
            # Every process holds the same sampler, so the main process's copy is the state.
            folder = f"{_CHECKPOINT_PREFIX}-{self.state.global_step}"
            output_dir = os.path.join(self._get_output_dir(trial=trial), folder)
            torch.save(sampler.state_dict(self.state.global_step), os.path.join(output_dir, SAMPLER_STATE_NAME))

    # Overrides Trainer._load_optimizer_and_scheduler, which transformers calls after building the data loader
    # (get_train_dataloader in _inner_training_loop) and before iterating it (_run_epoch).
    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        sampler = self._k15_sampler
        if checkpoint is None or sampler is None:
            return
        path = os.path.join(checkpoint, SAMPLER_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(
                f"{path} not found: the {type(sampler).__name__} starts from scratch (no statistics, new draws).",
                stacklevel=2,
            )
            return
        state = torch.load(path, weights_only=True)
        sampler.load_state_dict(state, skip_consumed=not self.args.ignore_data_skip)
        if hasattr(self, "_step"):
            # TRL regenerates every steps_per_generation * num_iterations training steps, counted by self._step,
            # which it does not restore (it restarts at 0). Restored, a resume inside a rollout batch regenerates
            # that batch's prompts (TRL does this whenever _buffered_inputs is empty) and then keeps the
            # uninterrupted run's rhythm; left at 0, every later rollout batch would start at the wrong step.
            self._step = sampler.micro_batches_of(state)
