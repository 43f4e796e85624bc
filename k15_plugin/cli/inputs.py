"""The files a run will read, checked before Hydra starts the job: training data, the model directory, a checkpoint.

``check_inputs`` runs in the CLI's pre-Hydra phase right after ``check_config`` (so before any model loads and before
the run directory exists) and raises :class:`~k15_plugin.cli.build.ConfigError` with one line naming the file (with
its line number for a bad row) or the Hydra key.

A JSONL file (``data.source=jsonl``; README "Your own data") holds one JSON object per line, UTF-8, blank lines
ignored::

    {"prompt": "What is 17 * 3?", "answer": "51", "difficulty": 0.4}

* ``data.prompt_column``: a non-empty string (chat message lists are not accepted: ``data.prompt_template`` formats a
  string, and ``data.chat=true`` wraps it as the user message);
* ``data.answer_column``: a non-empty string or a finite number (read as its string), in every row; with
  ``reward.verifier=code`` it is optional and a ``tests`` field is required instead: a non-empty list of
  ``{"input": str, "output": str}`` (an output may be a number), or that list as a JSON string, or APPS'
  ``{"inputs": [...], "outputs": [...]}``;
* ``difficulty``: optional, a finite number (higher is harder); ``sampler=curriculum`` needs it in every row. It
  reaches the trainer only when every row has it;
* duplicates: a row whose prompt equals an earlier row's is dropped (the first is kept), and so is a training row whose
  prompt is in the ``data.heldout_split`` file; one warning line on stderr says how many. Dropped rather than kept:
  with a random hold-out one copy could land in the held-out set and another in training, inflating held-out accuracy;
  the prioritized sampler keeps success statistics per row, which copies would split; and copies with different
  answers would reward contradictory outputs. To weight a prompt up, use a sampler, not copies.

:func:`read_rows` is the one reader: the checker and the loader (``k15_plugin.data.tasks``) both use it, so what the
check accepts is what the loader loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from k15_plugin.cli.build import ConfigError

ROW_EXAMPLE = '{"prompt": "What is 17 * 3?", "answer": "51"}'
TESTS_FORMAT = '[{"input": str, "output": str}, ...]'
DIFFICULTY = "difficulty"  # the column the loaders hand to the curriculum sampler
COMPARED_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")  # checkpoint vs model


# ------------------------------------------------------------------------------------------------ one row
@dataclass(frozen=True)
class RowFormat:
    """What each JSONL row must hold; part of the cache key of a scan."""

    prompt_column: str = "prompt"
    answer_column: str = "answer"
    code: bool = False  # reward.verifier=code: a `tests` field is required, the answer is optional
    difficulty_required: bool = False  # sampler=curriculum

    @classmethod
    def of(cls, data, reward=None, sampler=None) -> RowFormat:
        verifier = None if reward is None else getattr(reward.verifier, "value", reward.verifier)
        return cls(
            data.prompt_column,
            data.answer_column,
            verifier == "code",
            sampler is not None and sampler.name == "curriculum",
        )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({_show(value)})" if math.isfinite(value) else _show(value)
    if isinstance(value, str):
        return f"a string ({_show(value)})"
    return "a list" if isinstance(value, list) else "an object"


def _show(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields(row: dict) -> str:
    names = list(row)
    shown = ", ".join(f'"{n}"' for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"the row has {shown}" if names else "the row is {}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _test_cases(value: Any) -> tuple[list[dict[str, str]] | None, str]:
    """The test cases of a ``tests`` cell as ``[{"input", "output"}]`` strings, else ``(None, why)``.

    Accepts what :func:`k15_plugin.rewards.code.parse_tests` accepts, but an output must be a string or a number.
    """
    if isinstance(value, str):  # the list as a JSON string, as some datasets store it
        try:
            value = json.loads(value)
        except ValueError:
            return None, "is a string that is not JSON"
    if isinstance(value, dict) and "inputs" in value and "outputs" in value:  # APPS / TACO
        inputs, outputs = value["inputs"], value["outputs"]
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
            return None, 'has "inputs" and "outputs" that are not two lists of the same length'
        value = [{"input": i, "output": o} for i, o in zip(inputs, outputs, strict=True)]
    if not isinstance(value, list):
        return None, f"is {_kind(value)}"
    if not value:
        return None, "is an empty list"
    cases = []
    for i, case in enumerate(value, 1):
        if not isinstance(case, dict):
            return None, f"item {i} is {_kind(case)}, not an object"
        for name in ("input", "output"):
            if name not in case:
                return None, f'item {i} has no "{name}"'
        if not isinstance(case["input"], str):
            return None, f'item {i} "input" is {_kind(case["input"])}, not a string'
        output = case["output"]
        if not isinstance(output, str) and not (_is_number(output) and math.isfinite(output)):
            return None, f'item {i} "output" is {_kind(output)}, not a string or a number'
        cases.append({"input": case["input"], "output": output if isinstance(output, str) else str(output)})
    return cases, ""


def parse_row(obj: Any, where: str, fmt: RowFormat) -> dict[str, Any]:
    """One decoded JSONL line as ``{"prompt", "answer", "difficulty"[, "tests"]}``; raises ConfigError at ``where``."""
    if not isinstance(obj, dict):
        what = "an array" if isinstance(obj, list) else _kind(obj)
        raise ConfigError(f"{where}: the line is {what}, expected one JSON object per line like {ROW_EXAMPLE}")
    p, a = fmt.prompt_column, fmt.answer_column
    if p not in obj:
        raise ConfigError(f'{where}: no "{p}" field (data.prompt_column={p}); {_fields(obj)}')
    prompt = obj[p]
    if isinstance(prompt, list):
        raise ConfigError(
            f'{where}: "{p}" is a list; expected a string (chat message lists are not supported: '
            "data.chat=true sends the string as the user message)"
        )
    if not isinstance(prompt, str):
        raise ConfigError(f'{where}: "{p}" is {_kind(prompt)}, expected a non-empty string')
    if not prompt.strip():
        raise ConfigError(f'{where}: "{p}" is an empty string, expected the prompt text')
    row: dict[str, Any] = {"prompt": prompt, "answer": ""}
    if a in obj:
        answer = obj[a]
        if isinstance(answer, str) and answer.strip():
            row["answer"] = answer
        elif _is_number(answer) and math.isfinite(answer):
            row["answer"] = str(answer)
        elif not fmt.code:  # with the code verifier the answer is not read
            expected = "expected a non-empty string or a finite number"
            shown = "an empty string" if isinstance(answer, str) else _kind(answer)
            raise ConfigError(f'{where}: "{a}" is {shown}, {expected}')
    elif not fmt.code:
        raise ConfigError(f'{where}: no "{a}" field (data.answer_column={a}); {_fields(obj)}')
    if fmt.code:
        if "tests" not in obj:
            raise ConfigError(f'{where}: no "tests" field, which reward.verifier=code runs: expected {TESTS_FORMAT}')
        cases, why = _test_cases(obj["tests"])
        if cases is None:
            raise ConfigError(f'{where}: "tests" {why}; expected a non-empty list {TESTS_FORMAT}')
        row["tests"] = cases
    difficulty = obj.get(DIFFICULTY)
    if DIFFICULTY in obj and not (_is_number(difficulty) and math.isfinite(difficulty)):
        raise ConfigError(f'{where}: "{DIFFICULTY}" is {_kind(difficulty)}, expected a finite number')
    if difficulty is None and fmt.difficulty_required:
        raise ConfigError(f'{where}: no "{DIFFICULTY}" field, which sampler=curriculum reads from every row')
    row[DIFFICULTY] = None if difficulty is None else float(difficulty)
    return row


# ------------------------------------------------------------------------------------------------ one file
@dataclass
class FileStats:
    """What :func:`read_rows` saw in one file."""

    rows: int = 0  # rows yielded
    duplicates: int = 0  # rows dropped: same prompt as an earlier row
    duplicate_lines: list[int] = field(default_factory=list)  # the first two
    overlap: int = 0  # rows dropped: prompt in the held-out file
    overlap_lines: list[int] = field(default_factory=list)


def prompt_key(prompt: str) -> int:
    """A 64-bit digest of a prompt: duplicates are found without holding every prompt in memory."""
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little")


def read_rows(
    path: str,
    key: str,
    fmt: RowFormat,
    stats: FileStats | None = None,
    exclude: set[int] | None = None,
    seen: set[int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream the rows of the JSONL file ``path`` (named ``key=path`` in errors) as :func:`parse_row` returns them.

    Blank lines are skipped; a row whose prompt was seen before, or is in ``exclude`` (the held-out file's prompt keys),
    is dropped and counted in ``stats``. ``seen`` collects the keys of the rows kept. Raises ConfigError.
    """
    stats = FileStats() if stats is None else stats
    seen = set() if seen is None else seen
    exclude = exclude or set()
    try:
        handle = open(path, "rb")  # closed by the `with` below
    except OSError as err:
        raise ConfigError(f"{key}={path}: cannot be read ({err.strerror})") from None
    lines = 0
    with handle:
        for number, raw in enumerate(handle, 1):
            where = f"{key}={path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} "
                    "of the line); save the file as UTF-8"
                ) from None
            if number == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark, as some Windows editors write
            if not text.strip():
                continue
            lines += 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            row = parse_row(obj, where, fmt)
            digest = prompt_key(row["prompt"])
            if digest in seen:
                stats.duplicates += 1
                stats.duplicate_lines += [number] if len(stats.duplicate_lines) < 2 else []
                continue
            if digest in exclude:
                stats.overlap += 1
                stats.overlap_lines += [number] if len(stats.overlap_lines) < 2 else []
                continue
            seen.add(digest)
            stats.rows += 1
            yield row
    if lines == 0:
        what = "is empty" if os.path.getsize(path) == 0 else "has only blank lines"
        raise ConfigError(f"{key}={path}: no rows (the file {what}); expected one JSON object per line")
    if stats.rows == 0:
        raise ConfigError(f"{key}={path}: every prompt is also in data.heldout_split: no training rows left")


def _lines(numbers: list[int], count: int) -> str:
    return ("line " if count == 1 else "first at lines ") + ", ".join(map(str, numbers))


def duplicate_warnings(key: str, path: str, stats: FileStats, heldout: str | None = None) -> list[str]:
    """The warning lines about rows :func:`read_rows` dropped (none when nothing was dropped)."""
    out = []
    if stats.duplicates:
        lines = _lines(stats.duplicate_lines, stats.duplicates)
        out.append(f"{key}={path}: dropped {stats.duplicates} row(s) repeating an earlier prompt ({lines})")
    if stats.overlap:
        lines = _lines(stats.overlap_lines, stats.overlap)
        out.append(f"{key}={path}: dropped {stats.overlap} row(s) whose prompt is in data.heldout_split ({lines})")
    return out


# ------------------------------------------------------------------------------------------------ the data
@dataclass
class JsonlScan:
    train: FileStats
    heldout: FileStats | None  # None: rows are held out of data.path


# One scan per (files with their size and mtime, row format): the variants of a multirun share it.
_SCANS: dict[tuple, JsonlScan] = {}


def file_identity(path: str) -> tuple:
    """A file's version: its real path, size and modification time (a cache key)."""
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


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


def heldout_count(rows: int, heldout_size: int) -> int:
    """Rows the loader holds out of a single file of ``rows`` (``k15_plugin.data.tasks``)."""
    return min(heldout_size, rows // 5 or 1)


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
    d, s = cfg.data, cfg.sampler
    if s.name == "curriculum" and s.difficulty_column != DIFFICULTY:
        raise ConfigError(
            f"sampler.difficulty_column={s.difficulty_column!r} is not supported by k15-train: its "
            f"loaders pass the difficulty as the `{DIFFICULTY}` column; name the field "
            f"{DIFFICULTY!r} in the data"
        )
    if d.source == "demo_arithmetic":
        if RowFormat.of(d, cfg.reward).code:  # the demo rows have no test cases; found here, not after loading
            from k15_plugin.data.tasks import demo_columns, missing_tests_message

            raise ConfigError(missing_tests_message(d, demo_columns(d, cfg.seed)))
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
    try:  # a Hub model already in the local cache; nothing is downloaded
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(m.name, "config.json")
    except Exception:  # an odd name or cache: skip the comparison; loading will say what is wrong
        cached = None
    if isinstance(cached, str):
        return _read_config(Path(cached), "model.name", m.name), f"model.name={m.name}"
    return None, f"model.name={m.name}"


def _field(config: dict, name: str) -> Any:
    return config.get(name, (config.get("text_config") or {}).get(name))


def check_checkpoint(cfg: DictConfig) -> None:
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
    if cfg.reward.verifier == "code":
        check_sandbox(cfg.reward.code)


def check_sandbox(code: DictConfig) -> None:
    """Build the code sandbox once now (about a second), so a machine that cannot give ``reward.code.isolation``
    stops the run here, in one line, not at the first reward after the model loaded. The job reuses it."""
    from k15_plugin.data.tasks import sandbox_config
    from k15_plugin.rewards import Sandbox, SandboxUnavailableError

    try:
        Sandbox(sandbox_config(code)).mode()
    except SandboxUnavailableError as err:
        raise ConfigError(f"reward.code.isolation={getattr(code.isolation, 'value', code.isolation)}: {err}") from None
    except ValueError as err:
        raise ConfigError(f"reward.code.{err}") from None
