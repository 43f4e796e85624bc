"""``k15-train host=verl``: the composed k15-train config as a verl 0.9 run of the plugin's verl configs.

The run is verl's own launcher on the plugin's config directory, ``python -m verl.trainer.main_ppo --config-dir
<k15_plugin.verl.CONFIG_DIR> --config-name <k15_md|k15_grpo|k15_dr_grpo|k15_rloo> <overrides>``, with overrides
derived from the same config groups as a TRL run (algorithm, model, data, reward, sampler, trainer, launcher) plus
``host.flags``, a nested node of verl's own dotted keys applied last (so any verl key can be set, and a derived one
overridden). Before anything loads, the verl config is composed in this process with Hydra, checked by verl's own
``validate_config`` and by the plugin's :func:`k15_plugin.verl.trainer.check_config`; a refusal is one line naming
the k15-train key the bad value came from (:attr:`VerlPlan.sources`).

What is derived (``host.flags`` wins where both set a key; S = optimizer steps per rollout batch =
algorithm.num_iterations x trainer.steps_per_generation / trainer.gradient_accumulation_steps):

===========================================  ==========================================================================
k15-train                                    verl
===========================================  ==========================================================================
algorithm=kimi_md / grpo / dr_grpo / rloo    ``--config-name`` k15_md / k15_grpo / k15_dr_grpo / k15_rloo (dapo, ppo:
                                             refused)
algorithm.tau, log_z_estimator,              ``algorithm.k15.*`` from :func:`k15_plugin.cli.build.k15_settings` (the
length_normalize, reset_optimizer_each_      loss reads tau and length_normalize from there); the other algorithms
iteration; reward.length_penalty.*;          keep the defaults and no optimizer reset, as on TRL
sampler.*
reward.length_penalty.warmup_steps,          the same keys divided by S, rounded up: verl counts trainer steps
ramp_steps; sampler.switch_step, ramp_steps  (rollout batches), TRL optimizer steps
sampler.difficulty_column                    ``algorithm.k15.sampler.difficulty_column=extra_info.<column>``
algorithm.num_iterations                     ``actor_rollout_ref.actor.ppo_epochs`` (passes over each rollout batch)
algorithm.epsilon, epsilon_high              ``actor.clip_ratio_low``, ``actor.clip_ratio_high`` (PPO-clip baselines)
algorithm.beta > 0                           ``actor.use_kl_loss=true``, ``kl_loss_coef``, ``kl_loss_type=low_var_kl``
                                             (TRL's k3 estimator)
algorithm.loss_type                          ``actor.loss_agg_mode``: grpo seq-mean-token-mean, dr_grpo
                                             seq-mean-token-sum-norm, dapo/bnpo token-mean
algorithm.scale_rewards                      ``algorithm.norm_adv_by_std_in_grpo``: group true, none false
model.path, a built-in demo model's          ``actor_rollout_ref.model.path``
directory, or model.name
model.gradient_checkpointing                 ``actor_rollout_ref.model.enable_gradient_checkpointing``
data (any source)                            ``data.train_files`` / ``data.val_files``: the run's own train and held-out
                                             rows as verl RLHFDataset parquet in ``<run dir>/verl/``
data.chat=false                              ``actor_rollout_ref.model.custom_chat_template``: :data:`RAW_TEMPLATE`
(model: a local directory)                   ``data.max_prompt_length``: verl's 512, or less where the model's
                                             max_position_embeddings minus max_completion_length is less
reward.verifier and its options              ``reward.custom_reward_function.path=pkg://k15_plugin.verl.rewards``,
                                             ``+reward.custom_reward_function.reward_kwargs.*`` = the registry's spec
trainer.num_generations                      ``actor_rollout_ref.rollout.n``
trainer.max_completion_length, temperature   ``data.max_response_length``, ``actor_rollout_ref.rollout.temperature``
trainer.per_device_train_batch_size x        ``data.train_batch_size`` (prompts per rollout batch)
launcher.num_processes x steps_per_
generation / num_generations
trainer.per_device_train_batch_size x        ``actor.ppo_mini_batch_size`` (prompts per optimizer step; verl multiplies
launcher.num_processes x gradient_           it by rollout.n): steps_per_generation / gradient_accumulation_steps
accumulation_steps / num_generations         optimizer steps per pass
trainer.per_device_train_batch_size          ``actor.ppo_micro_batch_size_per_gpu``, ``rollout.`` and
                                             ``ref.log_prob_micro_batch_size_per_gpu`` (samples per GPU per forward)
trainer.max_steps (optimizer steps)          ``trainer.total_training_steps`` = max_steps / S, rounded up (rollout
                                             batches); ``trainer.total_epochs`` as many, so the steps end the run
trainer.learning_rate, adam_beta1/2,         ``actor.optim.lr``, ``betas``, ``weight_decay``, ``clip_grad`` (0: inf, no
weight_decay, max_grad_norm                  clipping)
trainer.lr_scheduler_type, warmup_steps      ``actor.optim.lr_scheduler_type`` (constant, cosine),
                                             ``lr_warmup_steps`` (/ S: verl steps its scheduler once per rollout batch)
trainer.vllm_gpu_memory_utilization          ``actor_rollout_ref.rollout.gpu_memory_utilization`` (colocated)
trainer.save_steps, save_total_limit,        ``trainer.save_freq``, ``max_actor_ckpt_to_keep``, ``test_freq`` (steps /
eval_steps                                   S; 0: -1, never)
trainer.report_to                            ``trainer.logger`` (console plus tensorboard, wandb, mlflow, swanlab)
launcher.num_processes                       ``trainer.n_gpus_per_node``
seed                                         ``data.seed`` (loader and sampler), ``actor_rollout_ref.rollout.seed``
the run directory                            ``trainer.default_local_dir=<run dir>/verl/checkpoints``, verl's own
                                             Hydra output in ``<run dir>/verl/hydra``
===========================================  ==========================================================================

Refused with one line: algorithm=dapo (TRL only) and ppo (host=openrlhf); ``rollout=partial`` and repeat detection
(verl generates with its own rollout workers, which have neither); ``model.lora.enabled`` (verl's LoRA keys go in
``host.flags.actor_rollout_ref.model``); ``trainer.resume_from_checkpoint`` (a TRL checkpoint; verl resumes from its
own ``global_step_<n>``: ``host.flags.trainer.resume_mode=resume_path``, ``resume_from_path``); TRL options verl has
no counterpart for, when set (``algorithm.mask_truncated_completions``, ``algorithm.normalize_advantages``,
``scale_rewards=batch``, other loss types and schedulers); a batch shape verl cannot split (a mini-batch that is not
a whole number of prompts, or steps_per_generation not a multiple of gradient_accumulation_steps).

TRL's own switches are not used: ``trainer.use_cpu``, ``bf16``, ``torch_threads``, ``use_vllm``, ``vllm_mode``,
``logging_steps`` (verl logs every step), ``eval_size`` (verl evaluates the whole held-out file),
``save_final_model`` (verl's checkpoints hold the model), ``model.dtype`` (verl's FSDP keeps fp32 weights and computes
in bf16: ``host.flags.actor_rollout_ref.actor.fsdp_config``).

**Prompts and the chat template.** verl 0.9 always tokenizes a prompt through a chat template: ``RLHFDataset`` hands
the ``prompt`` message list on as ``raw_prompt`` and the agent loop's continuous-token builder calls
``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``. verl's switch for a model
without one (or for raw text prompts) is ``actor_rollout_ref.model.custom_chat_template``, which ``HFModelConfig`` and
the agent loop put on the tokenizer. With ``data.chat=false`` (the built-in tasks) the rows' text becomes one user
message and :data:`RAW_TEMPLATE` renders it as it is, after the tokenizer's BOS token where it has one: for the
shipped demo models (and Llama-style tokenizers) exactly the ids TRL's ``tokenizer(text)`` gives. With
``data.chat=true`` the model's own template is used, and a local model directory without one is refused.

**Rewards.** verl scores each sample by its decoded text (special tokens skipped) against ``reward_model.ground_truth``
(the verifier's label column; the code verifier's tests as a JSON string). ``reward.verifier=task`` is the
registry's per-sample ``task`` scorer (the answer found by ``data.answer_extraction``), not the built-in tasks'
exact-token checker, which needs the token ids: on the demo task a right answer cut off before its EOS still counts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from k15_plugin.cli.build import (
    check_ranges,
    hydra_key,
    in_rollout_batches,
    k15_settings,
    settings_in_rollout_batches,
)
from k15_plugin.cli.hosts.tree import leaves, merged, set_dotted
from k15_plugin.core.settings import K15Settings, RolloutSettings
from k15_plugin.errors import ConfigError
from k15_plugin.rewards.registry import VERIFIERS, plain, spec_of

VERL_MODULE = "verl.trainer.main_ppo"
CONFIG_NAMES = {"kimi_md": "k15_md", "grpo": "k15_grpo", "dr_grpo": "k15_dr_grpo", "rloo": "k15_rloo"}
REWARD_MODULE = "pkg://k15_plugin.verl.rewards"
# The prompt's text as it is, after the tokenizer's BOS token where it has one (data.chat=false).
RAW_TEMPLATE = (
    '{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}{{ message["content"] }}{% endfor %}'
)
VERL_MAX_PROMPT_LENGTH = 512  # verl's default data.max_prompt_length
LOSS_AGG_MODES = {
    "grpo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "bnpo": "token-mean",
}
SCHEDULERS = {"constant": "constant", "constant_with_warmup": "constant", "cosine": "cosine"}
LOGGERS = ("tensorboard", "wandb", "mlflow", "swanlab")
# the node the derived reward spec adds to verl's config (compute_score's keyword arguments)
REWARD_KWARGS = "reward.custom_reward_function.reward_kwargs"
# nodes of verl's config whose keys are free (a new key there is added with `+`, not refused as unknown)
_OPEN_NODE = re.compile(r"(kwargs|override_config)$")
_BARE = re.compile(r"[A-Za-z_/][\w./:-]*")
_KEYWORDS = ("true", "false", "null", "none", "nan", "inf")


@dataclass
class VerlPlan:
    """One verl run: the config name, its Hydra overrides, which k15-train key each verl key came from, and where the
    run's data files go."""

    config_name: str  # k15_md, k15_grpo, k15_dr_grpo or k15_rloo
    overrides: list[str]  # verl's Hydra overrides, in order
    sources: dict[str, str]  # verl key -> the k15-train Hydra key it came from
    files_dir: Path  # <run dir>/verl: train.parquet, heldout.parquet, checkpoints, verl's Hydra output
    algorithm: str  # the k15-train algorithm

    def argv(self) -> list[str]:
        """verl's launcher with the plugin's config directory and this run's overrides."""
        from k15_plugin.verl import CONFIG_DIR

        return [
            sys.executable,
            "-m",
            VERL_MODULE,
            "--config-dir",
            CONFIG_DIR,
            "--config-name",
            self.config_name,
            *self.overrides,
            f"hydra.run.dir={hydra_value(str(self.files_dir / 'hydra'))}",
        ]

    def command(self) -> str:
        """The run as one shell command line (what ``host.dry_run=true`` prints)."""
        return shlex.join(self.argv())


# ------------------------------------------------------------------------------------------------ Hydra values
def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (strings quoted where needed, lists and dicts nested)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in _KEYWORDS:
        return text
    if "\\" in text or "${" in text:
        raise ValueError(f"{text!r} has a backslash or an interpolation, which verl's command line would change")
    return "'" + text.replace("'", "\\'") + "'"


# ------------------------------------------------------------------------------------------------ the mapping
def batch_shape(cfg: DictConfig) -> dict[str, int]:
    """verl's batch sizes for the trainer's (TRL's) shape: ``train_batch_size`` and ``ppo_mini_batch_size`` (prompts),
    ``micro`` (samples per GPU per forward) and ``steps_per_batch`` (optimizer steps per rollout batch, S)."""
    t = cfg.trainer
    processes = int(cfg.launcher.num_processes)
    k = int(t.num_generations)
    rollout = int(t.per_device_train_batch_size) * processes * int(t.steps_per_generation)
    if rollout % k:
        raise ConfigError(
            f"trainer.per_device_train_batch_size x launcher.num_processes x trainer.steps_per_generation ({rollout} "
            f"completions per rollout batch) must be a multiple of trainer.num_generations ({k})"
        )
    if t.steps_per_generation % t.gradient_accumulation_steps:
        raise ConfigError(
            f"trainer.steps_per_generation={t.steps_per_generation} must be a multiple of "
            f"trainer.gradient_accumulation_steps={t.gradient_accumulation_steps} on verl (whole optimizer steps per "
            "pass over a rollout batch)"
        )
    step = int(t.per_device_train_batch_size) * processes * int(t.gradient_accumulation_steps)
    if step % k:
        raise ConfigError(
            f"trainer.per_device_train_batch_size x launcher.num_processes x trainer.gradient_accumulation_steps "
            f"({step} completions per optimizer step) must be a multiple of trainer.num_generations ({k}) on verl, "
            "which splits a rollout batch into optimizer steps by whole prompts"
        )
    passes = int(t.steps_per_generation) // int(t.gradient_accumulation_steps)
    return {
        "train_batch_size": rollout // k,
        "ppo_mini_batch_size": step // k,
        "micro": int(t.per_device_train_batch_size),
        "steps_per_batch": passes * int(cfg.algorithm.num_iterations),
    }


def settings_of(cfg: DictConfig) -> K15Settings:
    """The run's k1.5 settings (:func:`k15_plugin.cli.build.k15_settings`); partial rollouts and repeat detection are
    refused."""
    settings = k15_settings(cfg)
    if settings.rollout != RolloutSettings():
        raise ConfigError(
            "rollout: partial rollouts and repeat detection run on host=trl only (verl generates with its own rollout "
            "workers); use rollout=full without rollout.repeat.detection on verl"
        )
    return settings


def _model_dir(cfg: DictConfig) -> tuple[str, str, Path | None]:
    """(the model verl loads, its k15-train key, its directory when it is on disk)."""
    from k15_plugin.data.arithmetic import DEMO_MODELS

    model = cfg.model
    if model.path:
        return str(model.path), "model.path", Path(model.path)
    if model.name in DEMO_MODELS:
        return str(DEMO_MODELS[model.name]), "model.name", Path(DEMO_MODELS[model.name])
    local = Path(model.name)
    return str(model.name), "model.name", local if local.is_dir() else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    return bool(_read_json(directory / "tokenizer_config.json").get("chat_template"))


def _reward_source(cfg: DictConfig, verifier: str, key: str) -> str:
    """The k15-train key of one entry of the reward spec (``extraction`` -> ``reward.math.extraction``)."""
    head, _, leaf = key.partition(".")
    if head == "verifier":
        return "reward.verifier"
    if head == "sandbox":
        return f"reward.code.{leaf}"
    if OmegaConf.select(cfg, f"reward.{verifier}.{head}") is not None:
        return f"reward.{verifier}.{head}"
    return "data.answer_extraction" if head == "extraction" else "reward"


def _algorithm_keys(cfg: DictConfig, put) -> None:
    a = cfg.algorithm
    put("actor_rollout_ref.actor.ppo_epochs", int(a.num_iterations), "algorithm.num_iterations")
    if "epsilon" in a:
        put("actor_rollout_ref.actor.clip_ratio_low", float(a.epsilon), "algorithm.epsilon")
        high = a.get("epsilon_high", None)
        high_key = "algorithm.epsilon_high" if high is not None else "algorithm.epsilon"
        put("actor_rollout_ref.actor.clip_ratio_high", float(a.epsilon if high is None else high), high_key)
    beta = float(a.get("beta", 0.0) or 0.0)
    if beta > 0:
        put("actor_rollout_ref.actor.use_kl_loss", True, "algorithm.beta")
        put("actor_rollout_ref.actor.kl_loss_coef", beta, "algorithm.beta")
        put("actor_rollout_ref.actor.kl_loss_type", "low_var_kl", "algorithm.beta")
    if "loss_type" in a:
        if a.loss_type not in LOSS_AGG_MODES:
            raise ConfigError(
                f"algorithm.loss_type={a.loss_type} has no verl counterpart here; use one of {list(LOSS_AGG_MODES)} "
                "(or host.flags.actor_rollout_ref.actor.loss_agg_mode)"
            )
        put("actor_rollout_ref.actor.loss_agg_mode", LOSS_AGG_MODES[a.loss_type], "algorithm.loss_type")
    if "scale_rewards" in a:
        if a.scale_rewards not in ("group", "none"):
            raise ConfigError(
                f"algorithm.scale_rewards={a.scale_rewards}: verl's GRPO estimator scales by the group's std or not at "
                "all; use group or none on verl"
            )
        put("algorithm.norm_adv_by_std_in_grpo", a.scale_rewards == "group", "algorithm.scale_rewards")
    if a.get("mask_truncated_completions", False):
        raise ConfigError("algorithm.mask_truncated_completions=true has no verl counterpart: set it to false on verl")
    if a.get("normalize_advantages", False):
        raise ConfigError(
            "algorithm.normalize_advantages=true has no counterpart in verl's RLOO estimator: set it to false on verl"
        )


def _k15_keys(cfg: DictConfig, settings: K15Settings, put) -> None:
    def walk(obj, prefix: str) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            path = prefix + f.name
            if path == "rollout":
                continue
            if hasattr(value, "__dataclass_fields__"):
                walk(value, path + ".")
                continue
            key = hydra_key(path)
            if OmegaConf.select(cfg, key) is None:
                key = path.split(".", 1)[0] if "." in path else "algorithm"  # a default the config does not hold
            if path == "sampler.difficulty_column":
                value = f"extra_info.{value}"
            put(f"algorithm.k15.{path}", value, key)

    walk(settings, "")


def derived(cfg: DictConfig, files: Path) -> tuple[str, dict, dict[str, str]]:
    """verl's config name and the keys k15-train's own keys imply (a nested tree), with the k15-train key of each.

    Pure: imports nothing from verl. Raises :class:`~k15_plugin.errors.ConfigError` (one line) for what verl cannot
    run as configured."""
    a, t = cfg.algorithm, cfg.trainer
    if a.name not in CONFIG_NAMES:
        other = "host=openrlhf runs PPO with a critic" if a.name == "ppo" else "it runs on host=trl only"
        raise ConfigError(
            f"algorithm={a.name} does not run on host=verl ({other}); use one of {', '.join(CONFIG_NAMES)}"
        )
    if cfg.model.lora.enabled:
        raise ConfigError(
            "model.lora.enabled: k15-train does not map LoRA onto verl; set verl's own keys instead "
            "(host.flags.actor_rollout_ref.model.lora_rank, lora_alpha, target_modules)"
        )
    if t.resume_from_checkpoint:
        raise ConfigError(
            "trainer.resume_from_checkpoint names a TRL checkpoint; verl resumes from its own global_step_<n> "
            "directories: host.flags.trainer.resume_mode=resume_path host.flags.trainer.resume_from_path=<dir>"
        )
    tree: dict = {}
    sources: dict[str, str] = {}

    def put(key: str, value: Any, source: str) -> None:
        set_dotted(tree, key, value)
        sources[key] = source

    shape = batch_shape(cfg)
    per_batch = shape["steps_per_batch"]
    _algorithm_keys(cfg, put)
    _k15_keys(cfg, settings_in_rollout_batches(settings_of(cfg), per_batch), put)

    path, model_key, directory = _model_dir(cfg)
    put("actor_rollout_ref.model.path", path, model_key)
    put(
        "actor_rollout_ref.model.enable_gradient_checkpointing",
        bool(cfg.model.gradient_checkpointing),
        "model.gradient_checkpointing",
    )
    if cfg.data.chat:
        if directory is not None and not _has_chat_template(directory):
            raise ConfigError(
                f"data.chat=true, but {model_key}={cfg.model.path or cfg.model.name} has no chat template for verl to "
                "apply: set data.chat=false (the prompt text as it is)"
            )
    else:
        put("actor_rollout_ref.model.custom_chat_template", RAW_TEMPLATE, "data.chat")
    prompt_length = VERL_MAX_PROMPT_LENGTH
    positions = _read_json(directory / "config.json").get("max_position_embeddings") if directory else None
    if isinstance(positions, int):
        if positions <= t.max_completion_length:
            raise ConfigError(
                f"trainer.max_completion_length={t.max_completion_length} leaves no room for a prompt in "
                f"{model_key}'s {positions} positions"
            )
        prompt_length = min(prompt_length, positions - int(t.max_completion_length))
    put("data.max_prompt_length", prompt_length, model_key)

    put("data.train_files", str(files / "train.parquet"), "data")
    put("data.val_files", str(files / "heldout.parquet"), "data")
    put("data.max_response_length", int(t.max_completion_length), "trainer.max_completion_length")
    put("data.seed", int(cfg.seed), "seed")
    spec = spec_of(cfg.reward, cfg.data)
    put("reward.custom_reward_function.path", REWARD_MODULE, "reward.verifier")
    put("reward.custom_reward_function.name", "compute_score", "reward.verifier")
    for key, value in leaves(spec, empty_is_leaf=True).items():
        put(f"{REWARD_KWARGS}.{key}", value, _reward_source(cfg, spec["verifier"], key))

    put("data.train_batch_size", shape["train_batch_size"], "trainer.per_device_train_batch_size")
    put(
        "actor_rollout_ref.actor.ppo_mini_batch_size",
        shape["ppo_mini_batch_size"],
        "trainer.gradient_accumulation_steps",
    )
    for key in (
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu",
    ):
        put(key, shape["micro"], "trainer.per_device_train_batch_size")
    put("actor_rollout_ref.rollout.n", int(t.num_generations), "trainer.num_generations")
    put("actor_rollout_ref.rollout.temperature", float(t.temperature), "trainer.temperature")
    put("actor_rollout_ref.rollout.seed", int(cfg.seed), "seed")
    put(
        "actor_rollout_ref.rollout.gpu_memory_utilization",
        float(t.vllm_gpu_memory_utilization),
        "trainer.vllm_gpu_memory_utilization",
    )
    steps = in_rollout_batches(t.max_steps, per_batch)
    put("trainer.total_training_steps", steps, "trainer.max_steps")
    put("trainer.total_epochs", steps, "trainer.max_steps")  # an epoch is >= 1 step: the steps end the run, as on TRL

    optim = "actor_rollout_ref.actor.optim"
    put(f"{optim}.lr", float(t.learning_rate), "trainer.learning_rate")
    put(f"{optim}.betas", [float(t.adam_beta1), float(t.adam_beta2)], "trainer.adam_beta2")
    put(f"{optim}.weight_decay", float(t.weight_decay), "trainer.weight_decay")
    put(f"{optim}.clip_grad", float(t.max_grad_norm) if t.max_grad_norm > 0 else math.inf, "trainer.max_grad_norm")
    scheduler = str(t.lr_scheduler_type)
    if scheduler not in SCHEDULERS:
        raise ConfigError(
            f"trainer.lr_scheduler_type={scheduler}: verl's optimizer has constant and cosine schedules; use one of "
            f"{list(SCHEDULERS)} on verl"
        )
    put(f"{optim}.lr_scheduler_type", SCHEDULERS[scheduler], "trainer.lr_scheduler_type")
    put(f"{optim}.lr_warmup_steps", in_rollout_batches(t.warmup_steps, per_batch), "trainer.warmup_steps")

    put("trainer.n_gpus_per_node", int(cfg.launcher.num_processes), "launcher.num_processes")
    put(
        "trainer.save_freq",
        in_rollout_batches(t.save_steps, per_batch) if t.save_steps > 0 else -1,
        "trainer.save_steps",
    )
    put("trainer.max_actor_ckpt_to_keep", t.save_total_limit, "trainer.save_total_limit")
    put(
        "trainer.test_freq",
        in_rollout_batches(t.eval_steps, per_batch) if t.eval_steps > 0 else -1,
        "trainer.eval_steps",
    )
    report = [str(r) for r in t.report_to]
    unknown = [r for r in report if r not in (*LOGGERS, "none")]
    if unknown:
        raise ConfigError(f"trainer.report_to={report}: verl logs to console, {', '.join(LOGGERS)}; not {unknown}")
    put("trainer.logger", ["console", *[r for r in report if r in LOGGERS]], "trainer.report_to")
    put("trainer.experiment_name", f"{a.name}_{cfg.data.name}", "algorithm")
    put("trainer.default_local_dir", str(files / "checkpoints"), "hydra.run.dir")
    return CONFIG_NAMES[a.name], tree, sources


# ------------------------------------------------------------------------------------------------ verl's config
def require_verl() -> None:
    """Raise :class:`~k15_plugin.errors.ConfigError` (one line) when verl is not installed."""
    if importlib.util.find_spec("verl") is None:
        raise ConfigError("verl is not installed: pip install 'k15-plugin[verl]' (README: verl)")


@contextlib.contextmanager
def _quiet():
    """verl's import-time notices (warnings, WARNING log lines, prints) kept off the terminal, so that a refusal is
    the one line k15-train prints."""
    import logging
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _verl_hydra():
    """Hydra initialised on the plugin's verl configs, inside k15-train's own Hydra (restored afterwards)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from k15_plugin.verl import CONFIG_DIR

    outer = GlobalHydra.instance()
    saved = outer.hydra if outer.is_initialized() else None
    outer.clear()
    try:
        with _quiet(), initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):  # imports verl
            yield
    finally:
        GlobalHydra.instance().clear()
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


_BASES: dict[str, dict] = {}


def _base_tree(config_name: str) -> dict:
    """The plugin's verl config ``config_name`` with no overrides, as plain containers (cached)."""
    if config_name not in _BASES:
        from hydra import compose

        with _verl_hydra():
            _BASES[config_name] = OmegaConf.to_container(compose(config_name=config_name), resolve=False)
    return _BASES[config_name]


def _exists(tree: dict, dotted: str) -> tuple[bool, list[str]]:
    """Whether ``dotted`` is a key of ``tree``, and the path of its deepest existing ancestor."""
    node, seen = tree, []
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, seen
        node = node[part]
        seen.append(part)
    return True, seen


def _override(key: str, value: Any, base: dict) -> str:
    exists, ancestors = _exists(base, key)
    if exists:
        return f"{key}={hydra_value(value)}"
    parent = ".".join(ancestors)
    node = base
    for part in ancestors:
        node = node[part]
    open_node = (
        key.startswith(REWARD_KWARGS + ".")
        or any(_OPEN_NODE.search(part) for part in ancestors)
        or (isinstance(node, dict) and not node and parent != "")
    )
    # a key verl's config does not have: added where verl leaves the node free, else left for Hydra to refuse
    return f"{'+' if open_node else ''}{key}={hydra_value(value)}"


def build_plan(cfg: DictConfig, run_dir: str | os.PathLike) -> VerlPlan:
    """The verl command line of this run (needs verl's configs installed); raises :class:`ConfigError` (one line)."""
    files = Path(run_dir) / "verl"
    config_name, tree, sources = derived(cfg, files)
    require_verl()
    user = OmegaConf.to_container(cfg.host.flags, resolve=True) or {}
    for key in leaves(user, empty_is_leaf=True):
        sources[key] = f"host.flags.{key}"
    base = _base_tree(config_name)
    overrides = []
    for key, value in leaves(merged(tree, user, empty_replaces=True), empty_is_leaf=True).items():
        try:
            overrides.append(_override(key, value, base))
        except ValueError as err:
            raise ConfigError(f"{sources.get(key, key)}: {err}") from None
    return VerlPlan(config_name, overrides, sources, files, str(cfg.algorithm.name))


def _source_in(message: str, sources: dict[str, str]) -> str | None:
    """The k15-train key whose verl key a verl error message names (a user's host.flags key first)."""
    found = []
    for key, source in sources.items():
        parts = key.split(".")
        names = [".".join(parts[i:]) for i in range(len(parts) - 1)]  # the key and its dotted tails
        if len(parts[-1]) > 6 and "_" in parts[-1]:
            names.append(parts[-1])  # a distinctive leaf name (ppo_mini_batch_size)
        for name in names:
            match = re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message)
            if match:
                found.append((not source.startswith("host.flags."), match.start(), source))
                break
    return min(found)[2] if found else None


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else "(no message)"


def _compose_error(err: Exception, plan: VerlPlan) -> ConfigError:
    text = str(err) + "\n" + str(err.__cause__ or "")
    match = re.search(r"(?:override|already at|key) '([^']+)'", text) or re.search(r"full_key: (\S+)", text)
    key = match.group(1).lstrip("+") if match else None
    source = None
    while key and source is None:
        source = plan.sources.get(key)
        key = key.rpartition(".")[0]
    cause = str(err.__cause__).splitlines()[0] if err.__cause__ else ""
    said = _one_line(str(err).split("\n", 1)[0] + (f" ({cause})" if cause else ""))
    return ConfigError(f"{source}: verl's config: {said}" if source else f"verl's config: {said}")


def validate(plan: VerlPlan) -> None:
    """Compose the plan's verl config in this process and run verl's ``validate_config`` and the plugin's
    :func:`k15_plugin.verl.trainer.check_config` on it; raises :class:`ConfigError` naming the k15-train key."""
    from hydra import compose

    with _verl_hydra():
        try:
            config = compose(config_name=plan.config_name, overrides=plan.overrides)
        except Exception as err:  # Hydra's override errors: unknown key, wrong type, bad syntax
            raise _compose_error(err, plan) from None
    try:
        with _quiet():
            from verl.trainer.ppo.utils import need_critic, need_reference_policy
            from verl.utils.config import validate_config

            from k15_plugin.verl.trainer import check_config

            OmegaConf.to_container(config, resolve=True)
            validate_config(config, need_reference_policy(config), need_critic(config))
            check_config(config)
    except Exception as err:  # verl's asserts and ValueErrors, the plugin's ValueErrors
        message = _one_line(str(err) or type(err).__name__)
        source = _source_in(message, plan.sources)
        raise ConfigError(f"{source}: verl refuses the config: {message}" if source else f"verl: {message}") from None


def check(cfg: DictConfig) -> VerlPlan:
    """The verl run this config starts, composed and checked by verl's own validation before anything loads."""
    check_ranges(cfg)
    plan = build_plan(cfg, "<run dir>")
    validate(plan)
    return plan


# ------------------------------------------------------------------------------------------------ files and the run
def verl_rows(rows, column: str, data_source: str, split: str) -> list[dict]:
    """Task rows (``prompt``, the verifier's label ``column``, optional ``difficulty``) as verl RLHFDataset rows:
    ``data_source``, ``prompt`` (a chat message list), ``ability``, ``reward_model.ground_truth`` (a string; lists
    of tests as JSON) and ``extra_info`` (``index``, ``split`` and ``difficulty`` where the rows have it)."""
    out = []
    for index, row in enumerate(rows):
        prompt = row["prompt"]
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        label = row[column]
        extra: dict[str, Any] = {"index": index, "split": split}
        if "difficulty" in row:
            extra["difficulty"] = None if row["difficulty"] is None else float(row["difficulty"])
        out.append(
            {
                "data_source": data_source,
                "prompt": messages,
                "ability": "code" if column == "tests" else "math",
                "reward_model": {
                    "style": "rule",
                    "ground_truth": label if isinstance(label, str) else json.dumps(label),
                },
                "extra_info": extra,
            }
        )
    return out


def write_files(cfg: DictConfig, plan: VerlPlan) -> dict[str, Path]:
    """The run's train and held-out rows as verl parquet files in ``plan.files_dir``; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from k15_plugin.data.tasks import task_rows

    train, heldout = task_rows(cfg.data, cfg.seed, cfg.trainer.max_completion_length, cfg.reward)
    column = VERIFIERS[plain(cfg.reward.verifier)].column
    plan.files_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, split, rows in (("train.parquet", "train", train), ("heldout.parquet", "heldout", heldout)):
        path = plan.files_dir / name
        tmp = path.with_name(name + ".tmp")
        pq.write_table(pa.Table.from_pylist(verl_rows(rows, column, f"k15/{cfg.data.name}", split)), tmp)
        os.replace(tmp, path)
        paths[split] = path
    return paths


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Write the run's data files into ``<run dir>/verl/``, then start verl's ``main_ppo`` on them (cwd: the run
    directory, its output streamed) or, with ``host.dry_run=true``, print the command and start nothing. Returns the
    summary (also ``<run dir>/summary.json``); a failed verl run exits k15-train with verl's status."""
    from k15_plugin.cli.run_files import write_summary

    run_dir = Path(run_dir).resolve()  # verl runs in the run directory: every path it gets is absolute
    plan = build_plan(cfg, run_dir)
    write_files(cfg, plan)
    summary = {
        "algorithm": plan.algorithm,
        "host": "verl",
        "command": plan.command(),
        "returncode": None,
        "run_dir": str(run_dir),
    }
    if cfg.host.dry_run:
        print(f"# k15-train host=verl: the run's data is in {plan.files_dir}; verl's command line:")
        print(plan.command(), flush=True)
        summary["dry_run"] = True
        write_summary(run_dir, summary)
        return summary
    print(f"k15-train: starting verl ({plan.config_name}); run dir: {run_dir}", flush=True)
    summary["returncode"] = subprocess.run(plan.argv(), cwd=run_dir).returncode
    write_summary(run_dir, summary)
    if summary["returncode"] != 0:
        print(f"k15-train: verl exited with status {summary['returncode']}; run dir: {run_dir}", file=sys.stderr)
        raise SystemExit(summary["returncode"])
    return summary
