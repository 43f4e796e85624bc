"""``k15-train host=openrlhf``: the composed k15-train config as an OpenRLHF 0.11 run.

The run's OpenRLHF command line is built from the same config groups as a TRL run (algorithm, model, data, reward,
sampler, trainer) plus ``host.flags``, a nested node of OpenRLHF's own dotted flags that is applied last (so any
OpenRLHF option can be set, and a derived one overridden). Before anything starts, the flags are parsed by
OpenRLHF's real parser (:func:`k15_plugin.openrlhf.flags.check_flags`) and a refusal names the Hydra key.

What is derived (``host.flags`` wins where both set a flag):

==========================================  =====================================================================
k15-train                                   OpenRLHF
==========================================  =====================================================================
algorithm=kimi_md / grpo / dr_grpo / rloo   ``algo.advantage.estimator`` dr_grpo (replaced by the k1.5 baseline) /
/ ppo                                       group_norm / dr_grpo / rloo / gae; ``algo.kl`` from ``beta`` (kimi_md: 0)
algorithm.num_iterations                    ``train.max_epochs`` (passes over each rollout batch)
algorithm.epsilon                           ``actor.eps_clip``
model.path or model.name (tiny_demo: the    ``actor.model_name_or_path``
shipped demo checkpoint)
data (any source)                           ``data.prompt_dataset`` / ``eval.dataset``: the run's own train and
                                            held-out rows, written as JSONL into ``<run dir>/openrlhf/``
reward.verifier                             ``reward.remote_url``: a reward file over k15_plugin.rewards
trainer.num_generations, max_completion_    ``rollout.n_samples_per_prompt``, ``rollout.max_new_tokens``,
length, temperature                         ``rollout.temperature``
trainer.per_device_train_batch_size x       ``rollout.batch_size`` (prompts per rollout batch, the TRL
steps_per_generation / num_generations      generation batch) and ``train.batch_size`` (samples per optimizer
(x the policy's data-parallel ranks)        step: per_device x gradient_accumulation_steps x ranks); ranks =
                                            ``actor.num_nodes`` x ``num_gpus_per_node`` / ``ds.ring_attn_size`` /
                                            ``ds.tensor_parallel_size`` from ``host.flags`` (a ``launcher`` of more
                                            than one process must name the same count)
trainer.learning_rate, adam_beta1/2,        ``actor.adam.*``, ``actor.max_norm``, ``actor.lr_scheduler``
weight_decay, max_grad_norm, lr_scheduler
seed, trainer.save_steps, eval_steps        ``train.seed``, ``ckpt.save_steps``, ``eval.steps``
==========================================  =====================================================================

The run length is OpenRLHF's: ``host.flags.train.num_episodes`` passes over the prompts (``trainer.max_steps`` is
TRL's). The length penalty, sampler and k1.5 settings travel as ``args.k15``
(:class:`~k15_plugin.openrlhf.config.OpenRLHFSettings`), not as flags.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from k15_plugin.cli.build import check_ranges, k15_settings, settings_in_rollout_batches
from k15_plugin.cli.hosts.tree import leaves, merged, set_dotted
from k15_plugin.core.settings import RolloutSettings
from k15_plugin.errors import ConfigError
from k15_plugin.openrlhf.config import OpenRLHFSettings
from k15_plugin.openrlhf.flags import OPENRLHF_MODULE, check_flag_sets, flag_of_error, to_flags
from k15_plugin.rewards.registry import VERIFIERS, plain, spec_of

ESTIMATORS = {"kimi_md": "dr_grpo", "grpo": "group_norm", "dr_grpo": "dr_grpo", "rloo": "rloo", "ppo": "gae"}


@dataclass
class OpenRLHFPlan:
    """One OpenRLHF run: its flags, the ``args.k15`` it attaches, which Hydra key each flag came from, and where the
    run's data and reward files go."""

    argv: list[str]  # OpenRLHF's flags
    settings: OpenRLHFSettings  # args.k15
    sources: dict[str, str]  # flag -> the Hydra key it came from
    files_dir: Path  # where the run's data and reward files go

    def command(self) -> str:
        """The run as one shell command line (what ``host.dry_run=true`` prints)."""
        return shlex.join([sys.executable, "-m", OPENRLHF_MODULE, *self.argv])


def settings_of(cfg: DictConfig) -> OpenRLHFSettings:
    """``args.k15`` for this run: the run's k1.5 settings (:func:`k15_plugin.cli.build.k15_settings`) and algorithm.

    The settings counted in steps (warm-up, ramps, the curriculum's switch) are optimizer steps in k15-train, as on
    TRL; OpenRLHF's controller counts rollout batches, so they are divided by the optimizer steps per rollout batch
    (``algorithm.num_iterations`` passes x ``steps_per_generation / gradient_accumulation_steps``), rounded up.
    """
    settings = k15_settings(cfg)
    if settings.rollout != RolloutSettings():
        raise ConfigError(
            "rollout: partial rollouts and repeat detection run on host=trl only; use rollout=full without "
            "rollout.repeat.detection on OpenRLHF"
        )
    t = cfg.trainer
    per_batch = max(1, int(t.steps_per_generation) // int(t.gradient_accumulation_steps)) * int(
        cfg.algorithm.num_iterations
    )
    settings = settings_in_rollout_batches(settings, per_batch)
    return OpenRLHFSettings(
        algorithm=cfg.algorithm.name, **{f.name: getattr(settings, f.name) for f in fields(settings)}
    )


def policy_ranks(flags: dict) -> int:
    """The policy's data-parallel ranks OpenRLHF starts for these (nested) flags: actor GPUs over the ring-attention
    and tensor-parallel sizes, as its DeepSpeed strategy divides them."""
    flat = leaves(flags)
    gpus = int(flat.get("actor.num_nodes", 1)) * int(flat.get("actor.num_gpus_per_node", 1))
    return max(1, gpus // int(flat.get("ds.ring_attn_size", 1)) // int(flat.get("ds.tensor_parallel_size", 1)))


def _derived(cfg: DictConfig, files: Path, ranks: int) -> tuple[dict, dict[str, str]]:
    """The flags k15-train's own keys imply (``ranks``: the policy's data-parallel ranks), and which key each came
    from."""
    tree: dict = {}
    sources: dict[str, str] = {}

    def put(flag: str, value: Any, key: str) -> None:
        set_dotted(tree, flag, value)
        sources[f"--{flag}"] = key

    a, t = cfg.algorithm, cfg.trainer
    if a.name not in ESTIMATORS:
        raise ConfigError(
            f"algorithm={a.name} runs on host=trl only; on OpenRLHF use one of {', '.join(ESTIMATORS)} "
            "(DAPO's dynamic sampling: algorithm=grpo host.flags.algo.dynamic_filtering_enable=true, with "
            "sampler=uniform)"
        )
    put("algo.advantage.estimator", ESTIMATORS[a.name], "algorithm")
    beta = float(a.get("beta", 0.0) or 0.0)
    put("algo.kl.init_coef", beta, "algorithm.beta" if "beta" in a else "algorithm")
    if beta > 0:
        put("algo.kl.use_loss", True, "algorithm.beta")
        put("algo.kl.estimator", "k3", "algorithm.beta")
    put("train.max_epochs", int(a.num_iterations), "algorithm.num_iterations")
    if "epsilon" in a:
        put("actor.eps_clip", float(a.epsilon), "algorithm.epsilon")

    model = cfg.model
    from k15_plugin.data.arithmetic import DEMO_MODELS

    source = model.path or str(DEMO_MODELS.get(model.name, model.name))
    put("actor.model_name_or_path", source, "model.path" if model.path else "model.name")

    put("data.prompt_dataset", str(files / "train.jsonl"), "data")
    put("eval.dataset", str(files / "heldout.jsonl"), "data")
    put("data.input_key", "prompt", "data.prompt_column")
    put("data.label_key", VERIFIERS[plain(cfg.reward.verifier)].column, "data.answer_column")
    if cfg.data.chat:
        put("data.apply_chat_template", True, "data.chat")
    put("reward.remote_url", str(files / "reward_func.py"), "reward.verifier")

    completions = t.per_device_train_batch_size * ranks * t.steps_per_generation
    if completions % t.num_generations:
        raise ConfigError(
            f"trainer.per_device_train_batch_size x steps_per_generation x the policy's {ranks} rank(s) "
            f"({completions}) must be a multiple of trainer.num_generations ({t.num_generations})"
        )
    put("rollout.batch_size", completions // t.num_generations, "trainer.per_device_train_batch_size")
    put("rollout.n_samples_per_prompt", int(t.num_generations), "trainer.num_generations")
    put("rollout.max_new_tokens", int(t.max_completion_length), "trainer.max_completion_length")
    put("rollout.temperature", float(t.temperature), "trainer.temperature")
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * ranks
    put("train.batch_size", int(per_step), "trainer.per_device_train_batch_size")
    put("train.seed", int(cfg.seed), "seed")
    put("actor.adam.lr", float(t.learning_rate), "trainer.learning_rate")
    put("actor.adam.betas", [float(t.adam_beta1), float(t.adam_beta2)], "trainer.adam_beta2")
    put("actor.adam.weight_decay", float(t.weight_decay), "trainer.weight_decay")
    put("actor.max_norm", float(t.max_grad_norm), "trainer.max_grad_norm")
    put("actor.lr_scheduler", str(t.lr_scheduler_type), "trainer.lr_scheduler_type")
    if t.warmup_steps == 0:
        put("actor.lr_warmup_ratio", 0.0, "trainer.warmup_steps")
    put("ckpt.path", str(files / "checkpoints"), "hydra.run.dir")
    put("ckpt.output_dir", str(files / "model"), "hydra.run.dir")
    put("ckpt.save_steps", int(t.save_steps) if t.save_steps > 0 else -1, "trainer.save_steps")
    if t.resume_from_checkpoint:
        put("ckpt.path", str(t.resume_from_checkpoint), "trainer.resume_from_checkpoint")
        put("ckpt.load_enable", True, "trainer.resume_from_checkpoint")
    put("eval.steps", int(t.eval_steps) if t.eval_steps > 0 else -1, "trainer.eval_steps")
    put("logger.tensorboard_dir", str(files / "tensorboard"), "hydra.run.dir")
    return tree, sources


def build_plan(cfg: DictConfig, run_dir: str | os.PathLike) -> OpenRLHFPlan:
    """The OpenRLHF command line and ``args.k15`` of this run; raises :class:`ConfigError` (one line)."""
    files = Path(run_dir) / "openrlhf"
    user = OmegaConf.to_container(cfg.host.flags, resolve=True) or {}
    ranks = policy_ranks(user)
    processes = int(cfg.launcher.num_processes)
    if processes not in (1, ranks):
        raise ConfigError(
            f"launcher.num_processes={processes}: OpenRLHF trains the policy on host.flags.actor.num_nodes x "
            f"num_gpus_per_node (over ds.ring_attn_size x ds.tensor_parallel_size) = {ranks} rank(s); set those "
            "flags to the GPUs you have (launcher=local leaves the count to them)"
        )
    tree, sources = _derived(cfg, files, ranks)
    for dotted in leaves(user):
        sources[f"--{dotted}"] = f"host.flags.{dotted}"
    combined = merged(tree, user)
    flat = leaves(combined)
    if flat.get("train.async_enable"):
        raise ConfigError("host.flags.train.async_enable: the plugin's trainer is OpenRLHF's synchronous one")
    _check_batches(flat, sources, ranks)
    sampler = cfg.get("sampler", {}).get("name", "uniform")
    if flat.get("algo.dynamic_filtering_enable") and sampler != "uniform":
        raise ConfigError(
            f"host.flags.algo.dynamic_filtering_enable with sampler={sampler}: the prompts it drops (every sample "
            "right or every sample wrong) never reach the sampler's statistics and its replacements move the "
            "schedule ahead of the trainer step; use sampler=uniform with dynamic filtering"
        )
    if cfg.algorithm.name == "kimi_md":
        if flat.get("algo.advantage.is_correction_level", "off") != "off":
            raise ConfigError(
                f"{sources.get('--algo.advantage.is_correction_level')}: algorithm=kimi_md's loss applies no "
                "train/rollout importance correction (its squared term anchors to the DeepSpeed actor's recompute); "
                "keep algo.advantage.is_correction_level=off"
            )
        if flat.get("actor.policy_loss_type", "ppo") != "ppo":
            raise ConfigError(
                f"{sources.get('--actor.policy_loss_type')}: algorithm=kimi_md replaces the policy loss; "
                "actor.policy_loss_type does not apply"
            )
    if cfg.algorithm.name == "kimi_md" and float(flat.get("algo.kl.init_coef", 0) or 0) > 0:
        raise ConfigError(
            f"{sources.get('--algo.kl.init_coef', 'host.flags.algo.kl.init_coef')}: algorithm=kimi_md regularises "
            "with its tau term, not a KL to a reference model: keep algo.kl.init_coef at 0"
        )
    try:
        settings = settings_of(cfg)
    except ValueError as err:
        raise ConfigError(f"algorithm: {err}") from None
    return OpenRLHFPlan(to_flags(combined), settings, sources, files)


def _check_batches(flat: dict, sources: dict[str, str], ranks: int) -> None:
    """The batch shapes OpenRLHF's launcher and DeepSpeed assert at start-up, refused here with the key to change:
    enough sample micro-batches for every rank, and whole micro-batches on every rank per optimizer step."""
    n = int(flat.get("rollout.n_samples_per_prompt", 1))
    prompts = int(flat.get("rollout.batch_size", 1))
    micro = int(flat.get("rollout.micro_batch_size", 1))
    if n * prompts // micro < ranks:
        raise ConfigError(
            f"{sources.get('--rollout.batch_size', 'host.flags.rollout.batch_size')}: {prompts} prompts x {n} "
            f"samples make {n * prompts // micro} micro-batches of rollout.micro_batch_size={micro}, fewer than the "
            f"policy's {ranks} ranks"
        )
    per_step, train_micro = int(flat.get("train.batch_size", 1)), int(flat.get("train.micro_batch_size", 1))
    if per_step % (train_micro * ranks):
        raise ConfigError(
            f"{sources.get('--train.batch_size', 'host.flags.train.batch_size')}: train.batch_size={per_step} must "
            f"be a multiple of train.micro_batch_size ({train_micro}) x the policy's {ranks} ranks"
        )


def check(cfg: DictConfig) -> OpenRLHFPlan:
    """The OpenRLHF command line this run would start, every derived value checked (OpenRLHF's parser checks the flags
    afterwards, once for all variants: :func:`check_plans`)."""
    check_ranges(cfg)
    return build_plan(cfg, "<run dir>")


def check_plan(plan: OpenRLHFPlan) -> None:
    """OpenRLHF's own parser on the plan's flags; raises :class:`ConfigError` naming the Hydra key."""
    check_plans([plan])


def check_plans(plans: list[OpenRLHFPlan]) -> None:
    """:func:`check_plan` for several plans (a multirun) with one start of OpenRLHF's parser."""
    for plan, error in zip(plans, check_flag_sets([p.argv for p in plans]), strict=True):
        if error is None:
            continue
        flag = flag_of_error(error)
        key = plan.sources.get(flag or "", None)
        said = error if "OpenRLHF" in error else f"OpenRLHF {error}"  # a parser message does not say whose it is
        raise ConfigError(f"{key}: {said}" if key else said)


def write_files(cfg: DictConfig, plan: OpenRLHFPlan) -> None:
    """The data and reward files the plan's flags name."""
    from k15_plugin.cli.run_files import write_text_atomically
    from k15_plugin.data.tasks import task_rows

    train, heldout = task_rows(cfg.data, cfg.seed, cfg.trainer.max_completion_length, cfg.reward)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        lines = []
        for row in rows:
            if "tests" in row and not isinstance(row["tests"], str):
                row = {**row, "tests": json.dumps(row["tests"])}
            lines.append(json.dumps(row))
        write_text_atomically(plan.files_dir / name, "\n".join(lines) + "\n")
    spec = json.dumps(spec_of(cfg.reward, cfg.data))
    write_text_atomically(
        plan.files_dir / "reward_func.py",
        "# OpenRLHF reward file of this run (--reward.remote_url), written by k15-train\n"
        "from k15_plugin.openrlhf.rewards import make_reward_func\n\n"
        f"reward_func = make_reward_func({spec})\n",
    )


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Dry run: print the command; otherwise write the run's files and start OpenRLHF with the plugin's classes."""
    plan = build_plan(cfg, run_dir)
    if cfg.host.dry_run:
        print("# k15-train starts OpenRLHF in-process with the plugin's classes in place; its command line:")
        print(plan.command())
        print(f"# args.k15 = {plan.settings}")
        return {"host": "openrlhf", "dry_run": True, "argv": plan.argv}
    write_files(cfg, plan)
    from k15_plugin.openrlhf.launch import run

    run(plan.argv, plan.settings)
    return {"host": "openrlhf", "argv": plan.argv, "run_dir": str(run_dir)}
