"""``k15-train host=trl`` (the default): the composed config as TRL's config and trainer, and the job that runs it.

:data:`CONFIGS` and :func:`trainer_classes` are the algorithm table: ``kimi_md`` is the plugin's
:class:`~k15_plugin.trl.KimiMirrorDescentTrainer`, the others TRL's own GRPO / RLOO losses with the plugin's length
penalty, samplers and partial rollouts (``K15GRPOTrainer``, ``K15RLOOTrainer``). :func:`check_config` builds the TRL
config before anything loads, so TRL's own checks run then too, and an error names the Hydra key.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from k15_plugin.cli.build import ALGORITHM_PATHS, check_ranges, deepspeed_launched, hydra_key, setting_value
from k15_plugin.errors import ConfigError
from k15_plugin.trl.config import K15GRPOConfig, K15RLOOConfig, KimiMirrorDescentConfig

# TRL's config class of each algorithm (grpo, dr_grpo and dapo differ in the loss_type / scale_rewards / clipping
# keys of their conf/algorithm file)
CONFIGS: dict[str, type] = {
    "kimi_md": KimiMirrorDescentConfig,
    "grpo": K15GRPOConfig,
    "dr_grpo": K15GRPOConfig,
    "dapo": K15GRPOConfig,
    "rloo": K15RLOOConfig,
}
ALGORITHMS = tuple(CONFIGS)
_K15_FLAT = {f.name: f for f in dataclass_fields(KimiMirrorDescentConfig) if "k15_path" in f.metadata}
_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")  # as the user started the process


def trainer_classes() -> dict[str, type]:
    """The trainer class of each algorithm (imported on first use: TRL's trainers take seconds to import, and the
    checks before a run need only the configs)."""
    from k15_plugin.trl.trainer import K15GRPOTrainer, K15RLOOTrainer, KimiMirrorDescentTrainer

    return {
        "kimi_md": KimiMirrorDescentTrainer,
        "grpo": K15GRPOTrainer,
        "dr_grpo": K15GRPOTrainer,
        "dapo": K15GRPOTrainer,
        "rloo": K15RLOOTrainer,
    }


@dataclass
class TrainingSpec:
    """What one k15-train run builds on TRL: the algorithm, its config class and keyword arguments (with the Hydra key
    each came from), and the built config once :func:`check_config` has run."""

    algorithm: str
    config_cls: type
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
    if deepspeed_launched() and not t.use_cpu and not _has_accelerator():
        # DeepSpeed on its CPU accelerator (no GPU): accelerate 1.16 finds no default backend for the CPU, and without
        # one counts a single process (DeepSpeed then asserts on the batch size); gloo is what DeepSpeed uses there.
        kwargs["ddp_backend"] = "gloo"
    # The k1.5 settings (length penalty, sampler, partial rollouts, repeat detection) as TRL's flat fields.
    for name, field_ in _K15_FLAT.items():
        path = field_.metadata["k15_path"]
        if path in ALGORITHM_PATHS:
            continue  # the algorithm's own keys (tau, ...) are copied by training_spec
        kwargs[name] = setting_value(cfg, path)
        fields[name] = hydra_key(path)
    return kwargs, fields


def _has_accelerator() -> bool:
    import torch

    return torch.accelerator.current_accelerator() is not None


def training_spec(cfg: DictConfig, output_dir: str | os.PathLike) -> TrainingSpec:
    """The TRL config class and keyword arguments for this composed config."""
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
    return TrainingSpec(algo.name, CONFIGS[algo.name], kwargs, sources)


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


# ------------------------------------------------------------------------------------------------ the job
def _load_model(model_cfg, images: bool = False):
    """``(model, tokenizer)``; for an image task ``(model, processor)``, loaded with ``AutoModelForImageTextToText``
    and ``AutoProcessor`` (TRL's vision-language path takes the processor as its ``processing_class``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from k15_plugin.data.arithmetic import DEMO_MODELS, load_demo_checkpoint

    if images:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = model_cfg.path or DEMO_MODELS.get(model_cfg.name, model_cfg.name)
        dtype = getattr(torch, model_cfg.dtype)
        return AutoModelForImageTextToText.from_pretrained(source, dtype=dtype), AutoProcessor.from_pretrained(source)
    if model_cfg.name in DEMO_MODELS:
        return load_demo_checkpoint(model_cfg.path or DEMO_MODELS[model_cfg.name])
    source = model_cfg.path or model_cfg.name
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, model_cfg.dtype))
    return model, tokenizer


def _peft_config(model_cfg):
    if not model_cfg.lora.enabled:
        return None
    from peft import LoraConfig

    lora = model_cfg.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def _save_final_model(trainer, run_dir: Path, is_main: bool) -> str:
    """The trained model, written to ``<run dir>/final_model`` all at once (a temporary folder renamed into place)."""
    import shutil

    final, tmp = run_dir / "final_model", run_dir / "final_model.tmp"
    trainer.save_model(str(tmp))  # every process: DeepSpeed ZeRO-3 gathers the weights; the main one writes
    trainer.accelerator.wait_for_everyone()
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    trainer.accelerator.wait_for_everyone()
    return str(final)


def _process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()  # wall_seconds counts imports and loading too, as a user waits for them


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train on TRL as configured; returns the summary written to ``<run dir>/summary.json``."""
    import torch
    import transformers
    from hydra.core.hydra_config import HydraConfig
    from transformers.trainer_callback import PrinterCallback

    from k15_plugin.cli.heldout import heldout_metrics
    from k15_plugin.cli.run_files import RunFilesCallback, write_plots, write_summary
    from k15_plugin.data.builtin import image_task
    from k15_plugin.data.tasks import load_task

    start = _process_start_time()
    transformers.logging.set_verbosity_error()
    if cfg.trainer.torch_threads > 0:
        torch.set_num_threads(cfg.trainer.torch_threads)
    # read by transformers' TensorBoard callback; per job, so each job of a multirun writes into its own run dir
    os.environ["TENSORBOARD_LOGGING_DIR"] = _USER_TENSORBOARD_DIR or str(run_dir / "tensorboard")
    spec = check_config(cfg, run_dir)
    args = spec.args  # built once, by check_config
    is_main = args.process_index == 0

    model, tokenizer = _load_model(cfg.model, images=image_task(cfg.data))  # tokenizer: a processor for images
    task = load_task(cfg.data, tokenizer, cfg.seed, cfg.trainer.max_completion_length, cfg.reward)

    t = cfg.trainer
    # Evaluated through the trainer (its device, its DDP/DeepSpeed wrapping), on every process; the callback takes the
    # "before" figure when training begins.
    evaluate = lambda limit: heldout_metrics(trainer, task, tokenizer, limit)  # noqa: E731
    callback = RunFilesCallback(run_dir, evaluate, t.eval_steps, t.eval_size, is_main)
    trainer = trainer_classes()[spec.algorithm](
        model=model,
        reward_funcs=task.reward_funcs,
        args=args,
        train_dataset=task.train,
        processing_class=tokenizer,
        callbacks=[callback],
        peft_config=_peft_config(cfg.model),
    )
    callback.trainer = trainer
    trainer.remove_callback(PrinterCallback)  # the progress bar replaces the dict printed at every logging step
    trainer.train(resume_from_checkpoint=cfg.trainer.resume_from_checkpoint)

    before, after = callback.before, evaluate(None)
    final_model = _save_final_model(trainer, run_dir, is_main) if t.save_final_model else None
    state = trainer.state
    rollouts = -(
        -state.global_step * args.gradient_accumulation_steps // (args.steps_per_generation * args.num_iterations)
    )
    summary = {
        "algorithm": spec.algorithm,
        "eval_accuracy_before": before["accuracy"],
        "eval_accuracy_after": after["accuracy"],
        "mean_completion_tokens_before": before["mean_completion_tokens"],
        "mean_completion_tokens_after": after["mean_completion_tokens"],
        "train_samples": rollouts * args.generation_batch_size,
        "steps": state.global_step,
        "wall_seconds": round(time.time() - start, 1),
        "heldout_size": len(task.heldout),
        "device": str(args.device),  # where training and the held-out evaluation ran
        "run_dir": str(run_dir),
        "final_model": final_model,
        "overrides": list(HydraConfig.get().overrides.task),
    }
    if is_main:
        write_plots(run_dir, before, after, state.global_step)
        write_summary(run_dir, summary)
        print(
            f"held-out accuracy {100 * before['accuracy']:.1f}% -> {100 * after['accuracy']:.1f}% "
            f"({spec.algorithm}, {state.global_step} steps, {summary['wall_seconds']:.0f} s); run dir: {run_dir}",
            flush=True,
        )
    return summary
