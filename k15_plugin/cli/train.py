"""``k15-train``: the Hydra entry point (also ``python -m k15_plugin.cli.train``).

    k15-train                                   # the built-in CPU demo, k1.5 mirror descent
    k15-train algorithm=grpo trainer.max_steps=5
    k15-train -m algorithm=kimi_md,grpo         # both, one job each

Every override is composed and checked before Hydra starts the job (so before any model or dataset loads and before
the run directory exists): a bad key, type or value exits with status 2 and one line naming the key.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from k15_plugin.cli.build import check_config
from k15_plugin.cli.inputs import check_inputs
from k15_plugin.cli.resolve import check_sources
from k15_plugin.cli.schema import check_known_keys, register_schemas
from k15_plugin.errors import ConfigError

_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")  # as the user started the process
_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc", "--version")


def config_dir() -> Path:
    """``conf/`` inside an installed wheel (k15_plugin/conf), else the repository's top-level ``conf/``."""
    packaged = Path(__file__).resolve().parents[1] / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


def run_id() -> str:
    """Name of this launch's run directory, the same in every process of one ``accelerate launch``.

    Processes of a distributed launch share their parent (the launcher's agent), so its start time and pid name the
    run; a plain process uses its own. Multi-node runs should set ``hydra.run.dir`` explicitly.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import psutil

        pid = os.getppid()
        started = psutil.Process(pid).create_time()
    else:
        pid, started = os.getpid(), time.time()
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started)) + f"_{pid}"


def _register() -> None:
    register_schemas()
    if not OmegaConf.has_resolver("k15_run_id"):
        OmegaConf.register_new_resolver("k15_run_id", run_id, use_cache=True)


# ------------------------------------------------------------------------------------------------ checking overrides
def _override_variants(overrides: list[str]) -> list[list[str]]:
    """One override list per value of each sweep (``a=x,y``), so a multirun is checked value by value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for raw, ov in zip(overrides, parsed, strict=True):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([raw])
    variants = [[c[0] for c in choices]]
    for i, c in enumerate(choices):
        for value in c[1:]:
            variants.append([*variants[0][:i], value, *variants[0][i + 1 :]])
    return variants if len(variants) < 64 else list(itertools.islice(variants, 64))


def _one_line(err: Exception) -> str:
    """Hydra's and OmegaConf's composition errors as one line that keeps the key and the allowed values."""
    text = str(err).strip()
    if "Available options in '" in text:  # an unknown option of a config group
        wrong = text.split("Could not find '", 1)[-1].split("'", 1)[0]  # e.g. sampler/nonexistent
        group, _, option = wrong.rpartition("/")
        listing = text.split("Available options in '", 1)[1].split("Config search path", 1)[0].splitlines()[1:]
        options = [o.strip() for o in listing if o.strip() and not o.strip().endswith("_schema")]
        return f"{group}={option} is not an option of the config group '{group}'; allowed: {', '.join(options)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if err.__cause__ is not None:  # "Could not override 'x.y'": the cause says why (unknown key, wrong type)
        lines = [line.strip() for line in str(err.__cause__).splitlines() if line.strip()] or lines
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None)
    first = lines[0] if lines else type(err).__name__
    return f"{key}: {first}" if key and key not in first else first


def check_overrides(overrides: list[str]) -> None:
    """Compose and check every variant of ``overrides``; raises :class:`ConfigError` with one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    ours = [o for o in overrides if not o.lstrip("+~").startswith("hydra.") and o not in ("-m", "--multirun")]
    GlobalHydra.instance().clear()
    openrlhf_plans = []  # checked together: one start of OpenRLHF's parser for a whole multirun
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for variant in _override_variants(ours) if ours else [[]]:
            try:
                cfg = compose(config_name="config", overrides=variant)
                OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            except Exception as err:  # composition errors of any kind become one line
                raise ConfigError(_one_line(err)) from None
            check_known_keys(cfg)  # `+key=value` adds keys that struct mode would refuse
            if cfg.host.name == "openrlhf":
                openrlhf_plans.append(openrlhf_plan(cfg))
            else:
                if cfg.host.dry_run:
                    raise ConfigError(
                        "host.dry_run: only host=openrlhf has a dry run (k15-train --cfg job prints the "
                        "composed config)"
                    )
                check_config(cfg)
            check_inputs(cfg)  # the data file, model directory and checkpoint it names
            check_sources(cfg)  # the model and Hub dataset: a local path, the cache or the Hub, else one line
    GlobalHydra.instance().clear()
    if openrlhf_plans:
        from k15_plugin.cli.openrlhf_host import check_plans

        check_plans(openrlhf_plans)


def openrlhf_plan(cfg: DictConfig):
    """host=openrlhf: the OpenRLHF command line this run would start (checked by OpenRLHF's parser afterwards)."""
    from k15_plugin.cli.build import check_ranges
    from k15_plugin.cli.openrlhf_host import build_plan

    check_ranges(cfg)
    return build_plan(cfg, "<run dir>")


# ------------------------------------------------------------------------------------------------ the job
def _load_model(model_cfg):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from k15_plugin.data.arithmetic import DEMO_MODELS, load_demo_checkpoint

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


def run(cfg: DictConfig) -> dict:
    """Train as configured; returns the summary written to ``<run dir>/summary.json``."""
    import torch
    import transformers
    from hydra.core.hydra_config import HydraConfig
    from transformers.trainer_callback import PrinterCallback

    import k15_plugin.trl as k15_trl
    from k15_plugin.cli.heldout import heldout_metrics
    from k15_plugin.cli.run_files import SUMMARY_FILE, RunFilesCallback, write_plots
    from k15_plugin.data.tasks import load_task

    start = _process_start_time()
    if cfg.host.name == "openrlhf":
        from k15_plugin.cli.openrlhf_host import run_openrlhf

        return run_openrlhf(cfg, Path(HydraConfig.get().runtime.output_dir))
    transformers.logging.set_verbosity_error()
    if cfg.trainer.torch_threads > 0:
        torch.set_num_threads(cfg.trainer.torch_threads)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # read by transformers' TensorBoard callback; per job, so each job of a multirun writes into its own run dir
    os.environ["TENSORBOARD_LOGGING_DIR"] = _USER_TENSORBOARD_DIR or str(run_dir / "tensorboard")
    spec = check_config(cfg, run_dir)
    args = spec.args  # built once, by check_config
    is_main = args.process_index == 0

    model, tokenizer = _load_model(cfg.model)
    task = load_task(cfg.data, tokenizer, cfg.seed, cfg.trainer.max_completion_length, cfg.reward)

    t = cfg.trainer
    # Evaluated through the trainer (its device, its DDP/DeepSpeed wrapping), on every process; the callback takes the
    # "before" figure when training begins.
    evaluate = lambda limit: heldout_metrics(trainer, task, tokenizer, limit)  # noqa: E731
    callback = RunFilesCallback(run_dir, evaluate, t.eval_steps, t.eval_size, is_main)
    trainer = getattr(k15_trl, spec.trainer_name)(
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
        tmp = run_dir / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, run_dir / SUMMARY_FILE)  # never a half-written summary
        print(
            f"held-out accuracy {100 * before['accuracy']:.1f}% -> {100 * after['accuracy']:.1f}% "
            f"({spec.algorithm}, {state.global_step} steps, {summary['wall_seconds']:.0f} s); run dir: {run_dir}",
            flush=True,
        )
    return summary


_register()


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, not the user's
    argv = sys.argv[1:]
    if not any(a in _INFO_FLAGS or a.startswith("--cfg") for a in argv):
        overrides = [a for a in argv if not a.startswith("-")]
        try:
            check_overrides(overrides)
        except ConfigError as err:
            print(f"k15-train: error: {err}", file=sys.stderr)
            sys.exit(2)
    _hydra_entry()


if __name__ == "__main__":
    main()
