"""The files a run will read, checked before Hydra starts the job: training data, the model directory, a checkpoint.

``check_inputs`` runs in the CLI's pre-Hydra phase right after ``check_config`` (so before any model loads and before
the run directory exists) and raises :class:`~k15_plugin.errors.ConfigError` with one line naming the file (with
its line number for a bad row) or the Hydra key.

The row format and the reader are :mod:`k15_plugin.data.jsonl`'s; this module only runs them over the files a
run names, once per file version.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from k15_plugin.data.builtin import DEMO_SOURCES
from k15_plugin.data.jsonl import (
    DIFFICULTY,
    FileStats,
    RowFormat,
    duplicate_warnings,
    file_identity,
    heldout_count,
    read_rows,
)
from k15_plugin.errors import ConfigError

COMPARED_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")  # checkpoint vs model


# ------------------------------------------------------------------------------------------------ the data
@dataclass
class JsonlScan:
    """What one scan of the JSONL files saw: the training file's statistics and the held-out file's (None: the rows
    are held out of ``data.path``)."""

    train: FileStats
    heldout: FileStats | None  # None: rows are held out of data.path


# One scan per (files with their size and mtime, row format): the variants of a multirun share it.
_SCANS: dict[tuple, JsonlScan] = {}


def scan_jsonl(data, fmt: RowFormat) -> JsonlScan:
    """Read ``data.path`` (and ``data.heldout_split`` when set) once per file version and row format."""
    if not Path(data.path).is_file():
        raise ConfigError(f"data.path={data.path!r} is not a file: expected a JSONL file with prompt and answer fields")
    heldout_path = data.heldout_split
    if heldout_path is not None and not Path(heldout_path).is_file():
        raise ConfigError(
            f"data.heldout_split={heldout_path!r} is not a file: expected a second JSONL file of held-out rows, "
            "or null to hold out data.heldout_size rows of data.path"
        )
    cache_key = (file_identity(data.path), heldout_path and file_identity(heldout_path), fmt)
    if cache_key in _SCANS:
        return _SCANS[cache_key]
    held_stats, held_keys = None, set()
    if heldout_path is not None:
        held_stats = FileStats()
        for _ in read_rows(heldout_path, "data.heldout_split", fmt, held_stats, seen=held_keys):
            pass
    train = FileStats()
    for _ in read_rows(data.path, "data.path", fmt, train, exclude=held_keys):
        pass
    scan = JsonlScan(train, held_stats)
    warnings = duplicate_warnings("data.path", data.path, train, heldout_path)
    if held_stats is not None:
        warnings += duplicate_warnings("data.heldout_split", heldout_path, held_stats)
    if int(os.environ.get("RANK", "0")) == 0:  # once per launch, not once per process
        for line in warnings:
            print(f"k15-train: warning: {line}", file=sys.stderr, flush=True)
    _SCANS[cache_key] = scan
    return scan


def prompts_per_batch(cfg: DictConfig) -> tuple[int, str]:
    """Distinct prompts in one generation batch, as TRL's GRPOConfig computes it, and the keys it comes from."""
    t = cfg.trainer
    steps = OmegaConf.select(cfg, "trainer.steps_per_generation", default=None)
    steps_key = "trainer.steps_per_generation" if steps is not None else "trainer.gradient_accumulation_steps"
    steps = steps if steps is not None else t.gradient_accumulation_steps
    n = t.per_device_train_batch_size * cfg.launcher.num_processes * steps // t.num_generations
    how = (
        f"trainer.per_device_train_batch_size={t.per_device_train_batch_size} x launcher.num_processes="
        f"{cfg.launcher.num_processes} x {steps_key}={steps} / trainer.num_generations={t.num_generations}"
    )
    return n, how


def _check_rows_enough(cfg: DictConfig, scan: JsonlScan) -> None:
    d = cfg.data
    rows = scan.train.rows
    if scan.heldout is None:
        held = heldout_count(rows, d.heldout_size)
        train = rows - held
        detail = f"{rows} rows, {held} held out: data.heldout_size={d.heldout_size}, at most a fifth of the rows"
    else:
        train = rows
        detail = f"{rows} rows; the held-out rows are data.heldout_split's"
    where = f"data.path={d.path}"
    fix = "add rows"
    if d.num_train is not None and d.num_train < train:
        train, where, detail, fix = d.num_train, f"data.num_train={d.num_train}", f"of {detail}", "raise it"
    need, how = prompts_per_batch(cfg)
    if train < need:
        raise ConfigError(
            f"{where}: {train} training prompts ({detail}), but one generation batch needs {need} distinct prompts "
            f"({how}): {fix} or lower trainer.per_device_train_batch_size"
        )


def _check_template(d) -> None:
    try:
        d.prompt_template.format(prompt="x")
    except KeyError as err:
        raise ConfigError(
            f"data.prompt_template={d.prompt_template!r}: unknown field {{{err.args[0]}}}; only {{prompt}} is filled "
            "in (write {{ and }} for literal braces)"
        ) from None
    except (IndexError, ValueError) as err:
        raise ConfigError(
            f"data.prompt_template={d.prompt_template!r}: {err} (write {{{{ and }}}} for literal braces)"
        ) from None


def check_data(cfg: DictConfig) -> None:
    """Check the rows the run will train on: the sampler's difficulty column, the built-in task's limits and columns,
    the prompt template, and every row of a JSONL file (cached per file version); raises ConfigError."""
    d, s = cfg.data, cfg.sampler
    if s.name == "curriculum" and s.difficulty_column != DIFFICULTY:
        raise ConfigError(
            f"sampler.difficulty_column={s.difficulty_column!r} is not supported by k15-train: its "
            f"loaders pass the difficulty as the `{DIFFICULTY}` column; name the field "
            f"{DIFFICULTY!r} in the data"
        )
    if d.source in DEMO_SOURCES:
        from k15_plugin.data.tasks import demo_columns
        from k15_plugin.rewards.registry import check_columns

        try:  # e.g. reward=code: the demo rows have no test cases; found here, not after loading
            check_columns(cfg.reward, d, demo_columns(d, cfg.seed))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if d.terms == 3 and s.name == "curriculum":
            raise ConfigError(
                "sampler=curriculum reads difficulty labels, which the three-term task "
                "(data.terms=3) does not have: use sampler=uniform or sampler=prioritized"
            )
        need, how = prompts_per_batch(cfg)
        if d.num_train is not None and d.num_train < need:
            raise ConfigError(
                f"data.num_train={d.num_train}: one generation batch needs {need} distinct prompts ({how})"
            )
        return
    _check_template(d)
    if d.source == "jsonl":
        scan = scan_jsonl(d, RowFormat.of(d, cfg.reward, s))
        _check_rows_enough(cfg, scan)


# ------------------------------------------------------------------------------------------------ model, checkpoint
def _read_config(path: Path, key: str, value: str) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}={value!r}: {path.name} cannot be read as JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}={value!r}: {path.name} is not a JSON object")
    return config


def _saved_model_config(path: str, key: str) -> dict:
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"{key}={path!r} is not a directory: expected a saved model (save_pretrained) or null")
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"{key}={path!r} has no config.json: expected a directory written by save_pretrained "
            "(config.json, weights, tokenizer)"
        )
    return _read_config(directory / "config.json", key, path)


def _model_config(cfg: DictConfig) -> tuple[dict | None, str]:
    """The config.json of the model the run will load and how to name it; None when not on disk (a Hub name)."""
    m = cfg.model
    if m.path is not None:
        return _saved_model_config(m.path, "model.path"), f"model.path={m.path}"
    from k15_plugin.data.arithmetic import DEMO_MODELS

    if m.name in DEMO_MODELS:
        return _read_config(DEMO_MODELS[m.name] / "config.json", "model.name", m.name), f"model.name={m.name}"
    if (Path(m.name) / "config.json").is_file():
        return _read_config(Path(m.name) / "config.json", "model.name", m.name), f"model.name={m.name}"
    from k15_plugin.cli.resolve import cached_config

    cached = cached_config(m.name)  # a Hub model already in the local cache; nothing is downloaded
    if cached is not None:
        return _read_config(Path(cached), "model.name", m.name), f"model.name={m.name}"
    return None, f"model.name={m.name}"


def _field(config: dict, name: str) -> Any:
    return config.get(name, (config.get("text_config") or {}).get(name))


def check_modality(cfg: DictConfig) -> None:
    """An image task needs a vision-language model and a text task a text one, where the model's config.json is on
    disk (a ``vision_config`` in it marks a vision-language model); raises ConfigError."""
    from k15_plugin.data.builtin import image_task

    config, name = _model_config(cfg)
    if config is None:
        return  # a Hub model not on disk: TRL stops at load if it cannot take the rows
    vision, images = "vision_config" in config, image_task(cfg.data)
    if images and not vision:
        raise ConfigError(
            f"{name} is a text-only model ({config.get('model_type')}) and data.source={cfg.data.source} holds image "
            "prompts: use a vision-language model (model.name=tiny_demo_vision, or experiment=demo_vision)"
        )
    if vision and not images:
        raise ConfigError(
            f"{name} is a vision-language model ({config.get('model_type')}) and data.source={cfg.data.source} holds "
            "text prompts only; k15-train trains such a model on image prompts (data=demo_vision)"
        )


def check_checkpoint(cfg: DictConfig) -> None:
    """Check ``trainer.resume_from_checkpoint``: a trainer checkpoint directory of the same model (its config.json
    compared with the model the run loads, where both are on disk); raises ConfigError."""
    ckpt = cfg.trainer.resume_from_checkpoint
    key = "trainer.resume_from_checkpoint"
    if ckpt is None:
        return
    directory = Path(ckpt)
    if not directory.is_dir():
        raise ConfigError(f"{key}={ckpt!r} is not a directory: expected the checkpoint-<step> of an earlier run")
    if not (directory / "trainer_state.json").is_file():
        inside = sorted(directory.glob("checkpoint-*/trainer_state.json"), key=lambda p: _step(p.parent.name))
        hint = f"; did you mean {inside[-1].parent}?" if inside else ": expected <run dir>/checkpoint-<step>"
        raise ConfigError(f"{key}={ckpt!r} has no trainer_state.json, so it is not a trainer checkpoint{hint}")
    if not (directory / "config.json").is_file():
        return  # a LoRA checkpoint holds only the adapter: nothing to compare
    theirs = _read_config(directory / "config.json", key, ckpt)
    ours, name = _model_config(cfg)
    if ours is None:
        return  # a Hub model not on disk: cannot compare without a download
    differ = [
        f
        for f in COMPARED_FIELDS
        if _field(theirs, f) is not None and _field(ours, f) is not None and _field(theirs, f) != _field(ours, f)
    ]
    if differ:
        there = ", ".join(f"{f}={_field(theirs, f)}" for f in differ)
        here = ", ".join(f"{f}={_field(ours, f)}" for f in differ)
        raise ConfigError(f"{key}={ckpt!r} is a checkpoint of another model ({there}) than {name} ({here})")


def _step(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def check_inputs(cfg: DictConfig) -> None:
    """Check the data, model directory and checkpoint ``cfg`` names; raises ConfigError with one line.

    Reads each JSONL file once per version (cached), so every variant of a multirun can be checked cheaply.
    """
    if cfg.model.path is not None:
        _saved_model_config(cfg.model.path, "model.path")
    check_checkpoint(cfg)
    check_data(cfg)
    check_modality(cfg)
    if cfg.reward.verifier == "code":
        check_sandbox(cfg.reward.code)


def check_sandbox(code: DictConfig) -> None:
    """Build the code sandbox once now (about a second), so a machine that cannot give ``reward.code.isolation``
    stops the run here, in one line, not at the first reward after the model loaded. The job reuses it."""
    from k15_plugin.rewards.registry import plain, sandbox_config
    from k15_plugin.sandbox import Sandbox, SandboxUnavailableError

    try:
        Sandbox(sandbox_config(code)).mode()
    except SandboxUnavailableError as err:
        raise ConfigError(f"reward.code.isolation={plain(code.isolation)}: {err}") from None
    except ValueError as err:
        raise ConfigError(f"reward.code.{err}") from None
