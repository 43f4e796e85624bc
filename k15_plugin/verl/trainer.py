"""``trainer.v1.trainer_mode=k15_sync``: verl's synchronous trainer with the plugin's per-step pieces.

What it adds to ``PPOTrainerSync`` (which it otherwise is: the mode is reset to ``sync`` before verl reads it):

* the curriculum or prioritized prompt sampler (``algorithm.k15.sampler``) as the training loader's sampler, fed
  with each step's rewards and saved in verl's ``data.pt`` with the loader (exact resume);
* the trainer step for the length penalty's warm-up (:func:`k15_plugin.verl.advantages.set_trainer_step`);
* the optimizer reset before each actor update (``algorithm.k15.reset_optimizer_each_iteration``), through
  :class:`~k15_plugin.verl.workers.K15ActorRolloutRefWorker`.

Private verl 0.9 methods overridden: ``_init_dataloader``, ``_init_resource_pool_mgr``, ``_fetch_one_gen_batch``,
``_compute_advantage``, ``_update_actor`` (each calls verl's own first or last).
"""

from __future__ import annotations

import numpy as np
import ray
import torch
from omegaconf import open_dict
from torchdata.stateful_dataloader import StatefulDataLoader
from verl.trainer.ppo.v1 import trainer_base
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.dataset.rl_dataset import collate_fn
from verl.workers.engine_workers import ActorRolloutRefWorker

from k15_plugin.core.prompt_sampler import PromptSampler, build_prompt_sampler
from k15_plugin.core.settings import K15Settings
from k15_plugin.verl.advantages import penalty_weight, set_trainer_step
from k15_plugin.verl.config import k15_settings

RESETTABLE_STRATEGIES = ("fsdp", "fsdp2")


def check_config(config, k15_sync: bool | None = None) -> K15Settings:
    """Refuse settings the trainer cannot honour, before any worker starts; returns the checked options.

    ``k15_sync``: whether the plugin's trainer runs (None: read ``trainer.use_v1`` and ``trainer.v1.trainer_mode``).
    Any other verl trainer draws prompts and steps the optimizer its own way, so a non-uniform sampler or the
    optimizer reset would be silently ignored there and is refused.
    """
    options = k15_settings(config.algorithm)
    if k15_sync is None:
        trainer = config.get("trainer", {})
        k15_sync = bool(trainer.get("use_v1", True)) and trainer.get("v1", {}).get("trainer_mode") == "k15_sync"
    if not k15_sync:
        if options.sampler.name != "uniform":
            raise ValueError(
                f"algorithm.k15.sampler.name={options.sampler.name} needs trainer.v1.trainer_mode=k15_sync and "
                "trainer.use_v1=true: other verl trainers draw prompts their own way"
            )
        if options.reset_optimizer_each_iteration:
            raise ValueError(
                "algorithm.k15.reset_optimizer_each_iteration=true needs trainer.v1.trainer_mode=k15_sync and "
                "trainer.use_v1=true: other verl trainers keep the optimizer state; set it to false there"
            )
    strategy = config.actor_rollout_ref.actor.get("strategy", "fsdp")
    if options.reset_optimizer_each_iteration and strategy not in RESETTABLE_STRATEGIES:
        raise ValueError(
            f"algorithm.k15.reset_optimizer_each_iteration=true is implemented for actor.strategy "
            f"{'/'.join(RESETTABLE_STRATEGIES)}, not {strategy!r}: set it to false"
        )
    if options.sampler.name != "uniform" and config.data.get("dataloader_num_workers", 0) != 0:
        raise ValueError(
            f"algorithm.k15.sampler.name={options.sampler.name} needs data.dataloader_num_workers=0 (worker processes "
            "would draw prompts before the latest rewards are in, and resume would not be exact)"
        )
    if options.sampler.name != "uniform":
        filtering = bool((config.algorithm.get("filter_groups", None) or {}).get("enable", False))
        v1 = config.get("trainer", {}).get("v1", {})
        refill = bool((v1.get("sampler", None) or {}).get("sync_refill_failed_groups", False))
        if filtering or refill:
            key = "algorithm.filter_groups.enable" if filtering else "trainer.v1.sampler.sync_refill_failed_groups"
            raise ValueError(
                f"{key}=true with algorithm.k15.sampler.name={options.sampler.name}: the groups verl evicts (every "
                "sample right or every sample wrong) never reach the sampler's statistics, and refills move its "
                "schedule ahead of the trainer step; use sampler.name=uniform with group filtering"
            )
    loss_mode = config.actor_rollout_ref.actor.get("policy_loss", {}).get("loss_mode", None)
    correction = config.algorithm.get("rollout_correction", None) or {}
    if loss_mode == "k15_md":
        if correction.get("bypass_mode", False):
            raise ValueError(
                "algorithm.rollout_correction.bypass_mode=true with policy_loss.loss_mode=k15_md: pi_i would become "
                "the rollout engine's log-probs, and the squared term would pull the actor towards its numerics; "
                "set it to false"
            )
        if correction.get("rollout_rs", None) is not None:
            raise ValueError(
                f"algorithm.rollout_correction.rollout_rs={correction.get('rollout_rs')} with policy_loss.loss_mode="
                "k15_md: rejection rewrites the response mask, so the sequence log-probs and lengths would cover part "
                "of each response; set it to null"
            )
    return options


def difficulty_of(dataset, key: str) -> torch.Tensor:
    """(P,) difficulty labels from a verl ``RLHFDataset``: a column, or a dotted path into one (extra_info.level)."""
    frame = getattr(dataset, "dataframe", None)
    head, *path = key.split(".")
    if frame is None or head not in frame.column_names:
        raise ValueError(f"algorithm.k15.sampler.difficulty_column={key}: the training data has no column {head!r}")
    values = []
    for row, value in enumerate(frame[head]):
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"algorithm.k15.sampler.difficulty_column={key}: row {row} has {value!r}, not a number")
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float64)


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


@register_trainer("k15_sync")
class K15SyncTrainer(PPOTrainerSync):
    """``PPOTrainerSync`` with the k1.5 sampler, length-penalty step and optimizer reset (see the module)."""

    def __init__(self, config):
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"  # the registry key chose this class; verl branches on "sync"
        self.k15 = check_config(config, k15_sync=True)
        self.k15_sampler: PromptSampler | None = None
        self._k15_rows: dict[str, int] = {}  # uid -> dataset row, for the prompts fetched and not yet scored
        self._k15_resets = 0
        super().__init__(config)

    # -- data ----------------------------------------------------------------------------------------------------------

    def _init_dataloader(self):
        super()._init_dataloader()
        seed = self.config.data.get("seed", None)
        sampler = self.k15.sampler
        difficulty = (
            difficulty_of(self.train_dataset, sampler.difficulty_column) if sampler.name == "curriculum" else None
        )
        self.k15_sampler = build_prompt_sampler(
            sampler,
            len(self.train_dataset),
            int(self.config.data.train_batch_size),
            0 if seed is None else int(seed),
            difficulty,
        )
        if self.k15_sampler is None:
            return
        loader = self.train_dataloader
        self.train_dataloader = StatefulDataLoader(
            dataset=self.train_dataset,
            batch_size=loader.batch_size,
            num_workers=0,
            drop_last=True,
            collate_fn=collate_fn,
            sampler=self.k15_sampler,
        )
        self.train_dataloader_it = None

    def _fetch_one_gen_batch(self):
        batch = super()._fetch_one_gen_batch()
        if self.k15_sampler is not None:
            uids = _as_list(batch["uid"])
            self._k15_rows.update(zip(uids, self.k15_sampler.pop_emitted(len(uids)), strict=True))
        return batch

    def k15_record_scores(self, uids, scores: torch.Tensor) -> int:
        """Feed one step's rewards to the sampler: (N,) prompt uids and (N,) sequence rewards, one per trajectory.

        A reward >= ``algorithm.k15.correct_threshold`` counts as a success. Returns the number recorded.
        """
        uids = _as_list(uids)
        missing = [uid for uid in uids if uid not in self._k15_rows]
        if missing:
            raise RuntimeError(f"k15 sampler: {len(missing)} trajectories belong to prompts it did not hand out")
        rows = torch.tensor([self._k15_rows[uid] for uid in uids], dtype=torch.long)
        self.k15_sampler.update(rows, scores.detach().cpu() >= self.k15.correct_threshold)
        for uid in set(uids):
            del self._k15_rows[uid]
        return len(uids)

    # -- the step ------------------------------------------------------------------------------------------------------

    def _compute_advantage(self, batch, metrics):
        step = self.global_steps - 1  # verl counts steps from 1; the warm-up counts rollout batches from 0
        set_trainer_step(step)
        if self.k15.length_penalty.weight > 0:
            metrics["k15/length_penalty_weight"] = penalty_weight(self.k15)
        if self.k15_sampler is not None:
            real = np.array([not tag.get("is_padding", False) for tag in batch.tags], dtype=bool)
            data = trainer_base.tq.kv_batch_get(
                keys=batch.keys, partition_id=batch.partition_id, select_fields=["uid", "rm_scores"]
            ).to_padded_tensor()
            scores = data["rm_scores"].sum(dim=-1)[torch.as_tensor(real)]
            uids = np.array(_as_list(data["uid"]), dtype=object)[real]
            metrics["k15/sampler_updates"] = self.k15_record_scores(uids, scores)
        return super()._compute_advantage(batch, metrics)

    def _update_actor(self, batch, metrics):
        if self.k15.reset_optimizer_each_iteration:
            self.actor_rollout_wg.k15_reset_optimizer()
            self._k15_resets += 1
            metrics["k15/optimizer_resets"] = self._k15_resets
        return super()._update_actor(batch, metrics)

    # -- workers -------------------------------------------------------------------------------------------------------

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if not self.k15.reset_optimizer_each_iteration:
            return
        from k15_plugin.verl.workers import K15ActorRolloutRefWorker

        swapped = 0
        for role, cls in list(self.role_worker_mapping.items()):
            original = getattr(getattr(cls, "__ray_metadata__", None), "modified_class", None)
            if original is ActorRolloutRefWorker or getattr(original, "__ray_actor_class__", None) is (
                ActorRolloutRefWorker
            ):
                self.role_worker_mapping[role] = ray.remote(K15ActorRolloutRefWorker)
                swapped += 1
        if swapped == 0:
            raise RuntimeError(
                "algorithm.k15.reset_optimizer_each_iteration: found no ActorRolloutRefWorker to extend in this verl "
                "version's worker mapping; set it to false"
            )
