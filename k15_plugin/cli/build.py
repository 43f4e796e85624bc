"""From a composed Hydra config to TRL's config and trainer classes, with every value checked before anything loads.

``check_config`` is what the CLI runs before Hydra starts the job: it raises :class:`ConfigError` with a one-line
message naming the Hydra key, the bad value and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from k15_plugin.core.settings import K15Settings, default, paths
from k15_plugin.errors import ConfigError
from k15_plugin.rewards.registry import plain
from k15_plugin.trl.config import K15GRPOConfig, K15RLOOConfig, KimiMirrorDescentConfig

ALGORITHMS = ("kimi_md", "grpo", "dr_grpo", "dapo", "rloo")
DATA_SOURCES = ("demo_arithmetic", "hub", "jsonl")
ANSWER_EXTRACTIONS = ("last_number", "gsm8k", "boxed")
DTYPES = ("float32", "bfloat16", "float16")
VLLM_MODES = ("colocate", "server")


@dataclass
class TrainingSpec:
    algorithm: str
    config_cls: type
    trainer_name: str  # attribute of k15_plugin.trl (imported lazily by the caller)
    kwargs: dict[str, Any]
    sources: dict[str, str]  # TRL field -> Hydra key it came from
    args: Any = None  # the built TRL config, set by check_config


def _trainer_kwargs(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """TRL/TrainingArguments fields shared by every algorithm, and the Hydra key each came from."""
    t = cfg.trainer
    fields = {
        "seed": "seed",
        "max_steps": "trainer.max_steps",
        "learning_rate": "trainer.learning_rate",
        "adam_beta1": "trainer.adam_beta1",
        "adam_beta2": "trainer.adam_beta2",
        "weight_decay": "trainer.weight_decay",
        "max_grad_norm": "trainer.max_grad_norm",
        "lr_scheduler_type": "trainer.lr_scheduler_type",
        "warmup_steps": "trainer.warmup_steps",
        "per_device_train_batch_size": "trainer.per_device_train_batch_size",
        "gradient_accumulation_steps": "trainer.gradient_accumulation_steps",
        "steps_per_generation": "trainer.steps_per_generation",
        "num_generations": "trainer.num_generations",
        "max_completion_length": "trainer.max_completion_length",
        "temperature": "trainer.temperature",
        "logging_steps": "trainer.logging_steps",
        "save_total_limit": "trainer.save_total_limit",
        "use_vllm": "trainer.use_vllm",
        "vllm_mode": "trainer.vllm_mode",
        "vllm_gpu_memory_utilization": "trainer.vllm_gpu_memory_utilization",
        "use_cpu": "trainer.use_cpu",
        "bf16": "trainer.bf16",
        "gradient_checkpointing": "model.gradient_checkpointing",
    }
    kwargs = {name: OmegaConf.select(cfg, key) for name, key in fields.items()}
    kwargs["report_to"] = list(t.report_to)
    kwargs["save_strategy"] = "steps" if t.save_steps > 0 else "no"
    if t.save_steps > 0:
        kwargs["save_steps"] = t.save_steps
        fields["save_steps"] = "trainer.save_steps"
    kwargs["disable_tqdm"] = True  # the CLI draws its own progress bar
    # The k1.5 settings (length penalty, sampler, partial rollouts, repeat detection) as TRL's flat fields.
    for name, field_ in _K15_FLAT.items():
        path = field_.metadata["k15_path"]
        if path in _ALGORITHM_PATHS:
            continue  # the algorithm's own keys (tau, ...) are copied by training_spec
        kwargs[name] = _flat_value(cfg, path)
        fields[name] = hydra_key(path)
    return kwargs, fields


# ------------------------------------------------------------------------------------------------ the k1.5 settings
# Where each K15Settings path lives in k15-train's config tree: algorithm.<path> for the mirror-descent keys,
# reward.length_penalty.* for the penalty (correct_threshold too), sampler.* and rollout.* as they are.
_ALGORITHM_PATHS = ("tau", "log_z_estimator", "length_normalize", "reset_optimizer_each_iteration")
_K15_FLAT = {f.name: f for f in dataclass_fields(KimiMirrorDescentConfig) if "k15_path" in f.metadata}


def hydra_key(path: str) -> str:
    """The k15-train key of a :class:`~k15_plugin.core.settings.K15Settings` path (``correct_threshold`` ->
    ``reward.length_penalty.correct_threshold``)."""
    if path in _ALGORITHM_PATHS:
        return f"algorithm.{path}"
    if path == "correct_threshold" or path.startswith("length_penalty."):
        return "reward.length_penalty." + path.rsplit(".", 1)[-1]
    return path


def _flat_value(cfg: DictConfig, path: str) -> Any:
    if path == "rollout.segment_tokens":
        return _segment_tokens(cfg)
    if path.startswith("sampler.") and OmegaConf.select(cfg, hydra_key(path)) is None and path != "sampler.name":
        return default(path)  # a key the chosen sampler's group does not have
    if path == "sampler.name":
        return cfg.sampler.name
    return plain(OmegaConf.select(cfg, hydra_key(path)))


def _segment_tokens(cfg: DictConfig) -> int:
    r, t = cfg.rollout, cfg.trainer
    if r.name == "full":
        return 0
    if r.segment_tokens is None:
        return t.max_completion_length // 4 if t.max_completion_length % 4 == 0 else -1
    return r.segment_tokens


def k15_settings(cfg: DictConfig) -> K15Settings:
    """The k1.5 settings of a composed k15-train config, checked; errors name the Hydra key. The algorithm's keys
    apply to ``algorithm=kimi_md`` only (the others keep the defaults: no tau, no optimizer reset)."""
    values = {p: _flat_value(cfg, p) for p in paths() if p not in _ALGORITHM_PATHS}
    if cfg.algorithm.name == "kimi_md":
        values.update({p: OmegaConf.select(cfg, hydra_key(p)) for p in _ALGORITHM_PATHS})
    else:
        values["reset_optimizer_each_iteration"] = False
    try:
        return K15Settings.from_paths(values).check(hydra_key)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def training_spec(cfg: DictConfig, output_dir: str | os.PathLike) -> TrainingSpec:
    """The TRL config class, trainer name and keyword arguments for this composed config."""
    algo = cfg.algorithm
    if algo.name == "ppo":
        raise ConfigError("algorithm=ppo runs on OpenRLHF only: add host=openrlhf (TRL's side has no PPO here)")
    if algo.name not in ALGORITHMS:
        raise ConfigError(f"algorithm={algo.name!r} is not one of {list(ALGORITHMS)}")
    kwargs, sources = _trainer_kwargs(cfg)
    kwargs["output_dir"] = str(output_dir)
    for key, value in algo.items():
        if key != "name":
            kwargs[key] = value
            sources[key] = f"algorithm.{key}"
    if algo.name == "kimi_md":
        return TrainingSpec(algo.name, KimiMirrorDescentConfig, "KimiMirrorDescentTrainer", kwargs, sources)
    if algo.name == "rloo":
        return TrainingSpec(algo.name, K15RLOOConfig, "K15RLOOTrainer", kwargs, sources)
    return TrainingSpec(algo.name, K15GRPOConfig, "K15GRPOTrainer", kwargs, sources)


# (key, test, what is allowed) for values TRL would accept silently or reject with a message that does not name the key.
# The k1.5 settings are not here: k15_plugin.core.settings declares their rules.
_RANGES = [
    ("trainer.max_steps", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.learning_rate", lambda v: v > 0, "a number > 0"),
    ("trainer.num_generations", lambda v: v >= 2, "an integer >= 2 (the group baseline needs two samples)"),
    ("trainer.per_device_train_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.gradient_accumulation_steps", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.steps_per_generation", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.max_completion_length", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.temperature", lambda v: v > 0, "a number > 0"),
    ("trainer.logging_steps", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.save_steps", lambda v: v >= 0, "an integer >= 0 (0: no checkpoints)"),
    ("trainer.eval_steps", lambda v: v >= 0, "an integer >= 0 (0: only before and after)"),
    ("trainer.eval_size", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.torch_threads", lambda v: v >= 0, "an integer >= 0 (0: torch's default)"),
    ("trainer.max_grad_norm", lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    ("trainer.vllm_mode", lambda v: v in VLLM_MODES, f"one of {list(VLLM_MODES)}"),
    ("trainer.vllm_gpu_memory_utilization", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("algorithm.num_iterations", lambda v: v >= 1, "an integer >= 1"),
    ("reward.math.timeout_seconds", lambda v: v > 0, "a number > 0"),
    ("reward.code.timeout_seconds", lambda v: v > 0, "a number > 0"),
    ("reward.code.memory_mb", lambda v: v >= 1, "an integer >= 1 (MiB)"),
    ("reward.code.concurrency", lambda v: v >= 0, "an integer >= 0 (0: one per CPU core)"),
    ("model.dtype", lambda v: v in DTYPES, f"one of {list(DTYPES)}"),
    ("model.lora.r", lambda v: v >= 1, "an integer >= 1"),
    ("data.source", lambda v: v in DATA_SOURCES, f"one of {list(DATA_SOURCES)}"),
    ("data.answer_extraction", lambda v: v in ANSWER_EXTRACTIONS, f"one of {list(ANSWER_EXTRACTIONS)}"),
    ("data.heldout_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.num_train", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("data.filler_max", lambda v: v >= 0, "an integer >= 0"),
    ("data.terms", lambda v: v in (2, 3), "2 (a+b=) or 3 (a+b+c=, worked answers allowed)"),
    ("launcher.num_processes", lambda v: v >= 1, "an integer >= 1"),
]


def check_ranges(cfg: DictConfig) -> None:
    for key, ok, allowed in _RANGES:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")
    t = cfg.trainer
    r = cfg.rollout
    if r.name == "partial" and r.segment_tokens is None and t.max_completion_length % 4:
        raise ConfigError(
            f"rollout.segment_tokens=null takes a quarter of trainer.max_completion_length="
            f"{t.max_completion_length}, which is not a multiple of 4: "
            "set rollout.segment_tokens"
        )
    if r.name == "partial" and r.segment_tokens == 0:
        raise ConfigError(
            "rollout.segment_tokens=0 with rollout=partial: set a budget that divides "
            f"trainer.max_completion_length={t.max_completion_length} "
            "(or null for a quarter of it)"
        )
    rollout = t.per_device_train_batch_size * max(1, cfg.launcher.num_processes) * t.steps_per_generation
    if rollout % t.num_generations != 0:
        raise ConfigError(
            f"trainer.per_device_train_batch_size={t.per_device_train_batch_size} x launcher.num_processes="
            f"{cfg.launcher.num_processes} x trainer.steps_per_generation={t.steps_per_generation} (completions per "
            f"rollout batch) must be divisible by trainer.num_generations={t.num_generations}"
        )
    if t.bf16 and t.use_cpu:
        raise ConfigError("trainer.bf16=true is not allowed with trainer.use_cpu=true: set trainer.bf16=false on CPU")
    m = cfg.model
    deepspeed = cfg.launcher.name.startswith("accelerate_deepspeed")
    if m.dtype != "float32" and not m.lora.enabled and not deepspeed:
        # Pure half-precision weights: an AdamW step moves each weight by about lr, below half a bf16 ulp for
        # |w| > ~2.6e-4 at lr 1e-6, so most weights never change. DeepSpeed keeps fp32 master weights itself.
        raise ConfigError(
            f"model.dtype={m.dtype} trains the weights in {m.dtype} (small updates round away): use "
            "model.dtype=float32 with trainer.bf16=true (bf16 compute, fp32 weights), model.lora.enabled=true, or a "
            "DeepSpeed launcher"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise ConfigError(
            "FSDP (accelerate launch with an FSDP config) is not supported by k15-train's held-out evaluation: use "
            "launcher=accelerate_ddp or a DeepSpeed launcher"
        )
    if cfg.reward.code.allow_paths:
        from k15_plugin.sandbox import SandboxConfig

        try:
            SandboxConfig(allow_paths=tuple(cfg.reward.code.allow_paths))
        except ValueError as err:
            raise ConfigError(f"reward.code.{err}") from None
    d = cfg.data
    if d.source == "demo_arithmetic" and d.terms == 3 and d.filler_max:
        raise ConfigError(
            f"data.filler_max={d.filler_max} applies to the two-term task only: set data.filler_max=0 with data.terms=3"
        )
    if d.source in ("hub", "jsonl") and (OmegaConf.is_missing(d, "path") or not d.path):
        raise ConfigError(f"data.path is required for data.source={d.source} (a Hub dataset id or a JSONL file)")
    if d.source == "jsonl" and not Path(d.path).is_file():
        raise ConfigError(f"data.path={d.path!r} is not a file: expected a JSONL file with prompt and answer fields")
    # model.path and trainer.resume_from_checkpoint are checked by k15_plugin.cli.inputs.check_inputs (what they hold)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and world != cfg.launcher.num_processes:
        raise ConfigError(
            f"launcher.num_processes={cfg.launcher.num_processes} but {world} processes were launched: "
            "make them match (launcher.num_processes=N, or --num_processes N for accelerate launch)"
        )


def check_config(cfg: DictConfig, output_dir: str | os.PathLike = "unused") -> TrainingSpec:
    """Check every value by building the TRL config; returns the spec with it in ``spec.args``.

    Raises :class:`ConfigError` (one line, names the key).
    """
    check_ranges(cfg)
    spec = training_spec(cfg, output_dir)
    try:
        spec.args = spec.config_cls(**spec.kwargs)
    except (ValueError, TypeError) as err:
        message = str(err).strip().splitlines()[0]
        key = next((src for name, src in spec.sources.items() if message.startswith(name)), None)
        if key is None:  # TRL's own messages do not start with the field name: find it anywhere in the text
            key = next(
                (src for name, src in spec.sources.items() if f"`{name}`" in message or f" {name} " in message), None
            )
        raise ConfigError(f"{key}: {message}" if key else message) from None
    return spec
