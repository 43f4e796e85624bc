"""From a composed Hydra config to TRL's config and trainer classes, with every value checked before anything loads.

``check_config`` is what the CLI runs before Hydra starts the job: it raises :class:`ConfigError` with a one-line
message naming the Hydra key, the bad value and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from k15_plugin.core.settings import K15Settings, default, paths
from k15_plugin.errors import ConfigError
from k15_plugin.rewards.registry import plain

DATA_SOURCES = ("demo_arithmetic", "demo_chain", "demo_vision", "hub", "jsonl")
ANSWER_EXTRACTIONS = ("last_number", "gsm8k", "boxed")
DTYPES = ("float32", "bfloat16", "float16")
VLLM_MODES = ("colocate", "server")


# ------------------------------------------------------------------------------------------------ the k1.5 settings
# Where each K15Settings path lives in k15-train's config tree: algorithm.<path> for the mirror-descent keys,
# reward.length_penalty.* for the penalty (correct_threshold too), sampler.* and rollout.* as they are.
ALGORITHM_PATHS = ("tau", "log_z_estimator", "length_normalize", "reset_optimizer_each_iteration")


def hydra_key(path: str) -> str:
    """The k15-train key of a :class:`~k15_plugin.core.settings.K15Settings` path (``correct_threshold`` ->
    ``reward.length_penalty.correct_threshold``)."""
    if path in ALGORITHM_PATHS:
        return f"algorithm.{path}"
    if path == "correct_threshold" or path.startswith("length_penalty."):
        return "reward.length_penalty." + path.rsplit(".", 1)[-1]
    return path


def setting_value(cfg: DictConfig, path: str) -> Any:
    """The value of the :class:`~k15_plugin.core.settings.K15Settings` path ``path`` in a composed k15-train config
    (a sampler key the chosen sampler's group does not have: its default)."""
    if path == "rollout.segment_tokens":
        return _segment_tokens(cfg)
    value = OmegaConf.select(cfg, hydra_key(path))
    if value is None and path.startswith("sampler."):
        return default(path)
    return plain(value)


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
    kimi = cfg.algorithm.name == "kimi_md"
    values = {p: setting_value(cfg, p) for p in paths() if kimi or p not in ALGORITHM_PATHS}
    if not kimi:
        values["reset_optimizer_each_iteration"] = False
    try:
        return K15Settings.from_paths(values).check(hydra_key)
    except ValueError as err:
        raise ConfigError(str(err)) from None


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
    ("data.terms_min", lambda v: 2 <= v <= 8, "an integer in 2..8 (data=demo_chain)"),
    ("data.terms_max", lambda v: 2 <= v <= 8, "an integer in 2..8 (data=demo_chain; the shipped model's positions)"),
    ("launcher.num_processes", lambda v: v >= 1, "an integer >= 1"),
]


# k1.5 settings counted in steps: optimizer steps in k15-train (TRL), rollout batches on the Ray hosts (verl, OpenRLHF)
STEP_SETTINGS = (
    "length_penalty.warmup_steps",
    "length_penalty.ramp_steps",
    "sampler.switch_step",
    "sampler.ramp_steps",
)


def in_rollout_batches(steps: int, per_batch: int) -> int:
    """``steps`` optimizer steps (TRL's count) as rollout batches of ``per_batch`` optimizer steps, rounded up."""
    return -(-int(steps) // per_batch)


def settings_in_rollout_batches(settings: K15Settings, per_batch: int) -> K15Settings:
    """``settings`` with each of :data:`STEP_SETTINGS` counted in rollout batches of ``per_batch`` optimizer steps
    (:func:`in_rollout_batches`): what the Ray hosts' controllers count."""
    groups: dict[str, Any] = {}
    for path in STEP_SETTINGS:
        group, name = path.split(".")
        node = groups.setdefault(group, getattr(settings, group))
        groups[group] = replace(node, **{name: in_rollout_batches(getattr(node, name), per_batch)})
    return replace(settings, **groups)


def deepspeed_launched() -> bool:
    """Whether this process was started by ``accelerate launch`` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


def check_image_task(cfg: DictConfig) -> None:
    """What a vision-language task (``data=demo_vision``) cannot be trained with yet; raises ConfigError."""
    from k15_plugin.data.builtin import image_task

    if not image_task(cfg.data):
        return
    data = f"data.source={cfg.data.source} (image prompts)"
    if plain(cfg.host.name) != "trl":
        raise ConfigError(
            f"host={plain(cfg.host.name)} with {data}: k15-train trains image prompts on TRL only; verl's and "
            "OpenRLHF's multimodal rows are not written by its doors yet"
        )
    if plain(cfg.rollout.name) != "full":
        raise ConfigError(
            f"rollout={plain(cfg.rollout.name)} with {data}: partial rollouts continue each trajectory from its "
            "token ids alone, without the image; use rollout=full"
        )
    if cfg.trainer.use_vllm:
        raise ConfigError(
            f"trainer.use_vllm=true with {data}: vLLM generation of image prompts is not supported by the plugin yet "
            "(vLLM 0.31's LLaVA needs torchvision, which the CPU build here cannot load); use trainer.use_vllm=false"
        )


def check_ranges(cfg: DictConfig) -> None:
    """Check the values TRL or a host would accept silently or name badly (:data:`_RANGES`, and the rules that tie
    several keys together); raises :class:`~k15_plugin.errors.ConfigError` naming the Hydra key."""
    check_image_task(cfg)
    for key, ok, allowed in _RANGES:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")
    t = cfg.trainer
    r = cfg.rollout
    if r.name == "partial" and r.segment_tokens is None and t.max_completion_length % 4:
        cap = t.max_completion_length
        fits = [d for d in range(2, cap // 4 + 1) if cap % d == 0]  # divisors giving at least 4 segments
        hint = f" to a divisor of it such as {fits[-1]} ({cap // fits[-1]} segments)" if fits else " to a divisor of it"
        raise ConfigError(
            f"rollout.segment_tokens=null takes a quarter of trainer.max_completion_length={cap}, which is not a "
            f"multiple of 4: set rollout.segment_tokens{hint}"
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
    if t.use_cpu and deepspeed_launched():
        # accelerate's cpu=True skips DeepSpeed altogether: the run would be plain CPU DDP under a DeepSpeed config
        raise ConfigError(
            "trainer.use_cpu=true turns DeepSpeed off (accelerate runs plain CPU DDP): set trainer.use_cpu=false; "
            "on a machine without a GPU DeepSpeed runs on its CPU accelerator"
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
    if d.source == "demo_chain" and d.terms_min > d.terms_max:
        raise ConfigError(f"data.terms_min={d.terms_min} is more than data.terms_max={d.terms_max}")
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
