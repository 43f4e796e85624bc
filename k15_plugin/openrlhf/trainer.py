"""The Ray actor classes the OpenRLHF adapter puts in place of OpenRLHF's own (see :mod:`k15_plugin.openrlhf.launch`).

* :class:`K15PPOTrainer`, the single controller: the k1.5 advantage step (:mod:`k15_plugin.openrlhf.advantages`), the
  trainer step for the length penalty's warm-up, and the curriculum/prioritized sampler as the prompt loader's
  sampler, fed from each step's scores and saved with OpenRLHF's checkpoint of the loader state;
* :class:`K15PolicyModelActor`, the training ranks: the mirror-descent loss in place of ``PolicyLoss`` (``kimi_md``)
  and the optimizer's moments zeroed before each rollout batch's update.

Ray refuses to subclass an actor class, so these subclass the plain classes Ray keeps behind OpenRLHF's and are made
actors again here; Ray pickles them by reference, so every node imports this module (the package must be installed
there, or shipped with the job's ``py_modules``). OpenRLHF 0.11 internals used: ``PPOTrainer.__init__`` /
``train_step`` / ``prompts_dataloader`` / ``samples_generator`` / ``experience_maker``, ``prepare_datasets``'s
``blending_datasets`` call, ``PolicyModelActor.init_model_from_pretrained`` / ``fit`` / ``trainer.actor_loss_fn`` /
``actor_optim``.
"""

from __future__ import annotations

import collections

import ray
import torch
from openrlhf.trainer import ppo_trainer as upstream_trainer
from openrlhf.trainer.ray import ppo_actor as upstream_actor
from torchdata.stateful_dataloader import StatefulDataLoader

from k15_plugin.core.optimizer import zero_optimizer_state as reset_optimizer_moments
from k15_plugin.core.prompt_sampler import PromptSampler, build_prompt_sampler
from k15_plugin.openrlhf.advantages import K15ExperienceMaker
from k15_plugin.openrlhf.loss import K15MirrorDescentLoss


def plain_class(actor_class):
    """The class behind a ``@ray.remote`` actor class (or the class itself)."""
    metadata = getattr(actor_class, "__ray_metadata__", None)
    return metadata.modified_class.__ray_actor_class__ if metadata is not None else actor_class


class _K15PPOTrainer(plain_class(upstream_trainer.PPOTrainer)):
    def __init__(self, pretrain, strategy, *args, **kwargs):
        super().__init__(pretrain, strategy, *args, **kwargs)
        self.k15 = strategy.args.k15
        self.experience_maker.__class__ = K15ExperienceMaker  # the same object, with the k1.5 advantage step
        self.k15_sampler: PromptSampler | None = None
        self._k15_rows: dict[str, collections.deque[int]] = collections.defaultdict(collections.deque)
        self._k15_install_sampler()

    def _k15_difficulty(self, num_rows: int) -> torch.Tensor:
        """The curriculum's labels, read from the prompt data exactly as ``prepare_datasets`` reads the prompts."""
        args = self.strategy.args
        data = upstream_trainer.blending_datasets(
            args.data.prompt_dataset,
            args.data.prompt_probs,
            self.strategy,
            args.train.seed,
            max_count=args.data.max_samples,
            dataset_split=args.data.prompt_split,
        )
        data = data.select(range(min(args.data.max_samples, len(data))))
        column = self.k15.sampler.difficulty_column
        if column not in data.column_names or len(data) != num_rows:
            raise ValueError(f"sampler=curriculum: the prompt data has no column {column!r} (data.difficulty_column)")
        return torch.tensor([float(x) for x in data[column]], dtype=torch.float64)

    def _k15_install_sampler(self) -> None:
        args = self.strategy.args
        dataset = self.prompts_dataloader.dataset
        options = self.k15.sampler
        difficulty = self._k15_difficulty(len(dataset)) if options.name == "curriculum" else None
        self.k15_sampler = build_prompt_sampler(
            options, len(dataset), int(args.rollout.batch_size), int(args.train.seed), difficulty
        )
        if self.k15_sampler is None:
            return
        self.prompts_dataloader = StatefulDataLoader(
            dataset,
            batch_size=1,
            sampler=self.k15_sampler,
            drop_last=True,
            collate_fn=dataset.collate_fn,
            num_workers=0,
        )
        self.samples_generator.prompts_dataloader = self.prompts_dataloader

    def k15_record(self, rollout_samples) -> int:
        """Feed the sampler one step's samples (each with its prompt text and score); returns the groups recorded.

        The loader hands out prompts, not row numbers: the rows drawn so far are matched to the samples by prompt
        text, one row per group of ``n_samples_per_prompt`` samples (rows of prompts still buffered or filtered out
        stay queued).
        """
        dataset = self.prompts_dataloader.dataset
        for row in self.k15_sampler.pop_emitted():
            self._k15_rows[dataset.prompts[row]].append(row)
        k = self.strategy.args.rollout.n_samples_per_prompt
        by_prompt: dict[str, list[float]] = collections.defaultdict(list)
        for sample in rollout_samples:
            score = sample.scores if sample.scores is not None else sample.rewards
            for prompt, value in zip(sample.prompts, score.reshape(-1).tolist(), strict=True):
                by_prompt[prompt].append(value)
        rows, successes = [], []
        for prompt, values in by_prompt.items():
            for g in range(0, len(values), k):
                queue = self._k15_rows.get(prompt)
                if not queue:
                    raise RuntimeError("k15 sampler: a sample's prompt was not handed out by the sampler")
                row = queue.popleft()
                rows += [row] * len(values[g : g + k])
                successes += [v >= self.k15.correct_threshold for v in values[g : g + k]]
        self.k15_sampler.update(torch.tensor(rows, dtype=torch.long), torch.tensor(successes, dtype=torch.float64))
        return len(rows) // k

    def train_step(self, rollout_samples, global_step: int):
        self.experience_maker.k15_step = global_step  # OpenRLHF counts rollout batches from 0
        groups = self.k15_record(rollout_samples) if self.k15_sampler is not None else 0
        status, global_step = super().train_step(rollout_samples, global_step)
        if self.k15_sampler is not None:
            status["k15/sampler_groups"] = groups
        return status, global_step


class _K15PolicyModelActor(plain_class(upstream_actor.PolicyModelActor)):
    def init_model_from_pretrained(self, strategy, *args, **kwargs):
        super().init_model_from_pretrained(strategy, *args, **kwargs)
        settings = strategy.args.k15
        if settings.algorithm == "kimi_md":
            self.trainer.actor_loss_fn = K15MirrorDescentLoss(settings.tau, settings.length_normalize)
        self._k15_resets = 0

    def fit(self, kl_ctl: float = 0):
        if self.strategy.args.k15.reset_optimizer_each_iteration:
            reset_optimizer_moments(self.actor_optim)
            self._k15_resets += 1
        status = super().fit(kl_ctl)
        status["k15/optimizer_resets"] = self._k15_resets
        return status


K15PPOTrainer = ray.remote(_K15PPOTrainer)
K15PolicyModelActor = ray.remote(num_gpus=1)(_K15PolicyModelActor)
