"""The one JSONL row reader of the training data: what a row must hold, how a file is streamed and checked.

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

:func:`read_rows` is the one reader: ``k15-train``'s pre-run check (``k15_plugin.cli.inputs``) and the loader
(``k15_plugin.data.tasks``) both use it, so what the check accepts is what the loader loads.

Errors are :class:`~k15_plugin.errors.ConfigError`, one line naming the file and line (``data.path=<file>:<line>``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k15_plugin.errors import ConfigError, K15Error
from k15_plugin.rewards.registry import plain

ROW_EXAMPLE = '{"prompt": "What is 17 * 3?", "answer": "51"}'
TESTS_FORMAT = '[{"input": str, "output": str}, ...]'
DIFFICULTY = "difficulty"  # the column the loaders hand to the curriculum sampler


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
        """The row format of composed config nodes: the ``data`` node's prompt and answer columns, a ``tests`` field
        when ``reward.verifier`` is ``code``, a difficulty when ``sampler.name`` is ``curriculum`` (``reward`` or
        ``sampler`` None: not required)."""
        verifier = None if reward is None else plain(reward.verifier)
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


def _text_lines(path: str | Path, name: str, error: type[K15Error]) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line of ``path``, decoded as UTF-8 (a leading byte-order mark, as
    some Windows editors write, dropped). A file that cannot be opened, or a line that is not UTF-8, raises ``error``
    naming the file as ``name``."""
    try:
        handle = open(path, "rb")  # closed by the `with` below
    except OSError as err:
        raise error(f"{name}: cannot be read ({err.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise error(
                    f"{name}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} "
                    "of the line); save the file as UTF-8"
                ) from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                yield number, text


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
    lines = 0
    for number, text in _text_lines(path, f"{key}={path}", ConfigError):
        where = f"{key}={path}:{number}"
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


def file_identity(path: str) -> tuple:
    """A file's version: its real path, size and modification time (a cache key)."""
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


def heldout_count(rows: int, heldout_size: int) -> int:
    """Rows the loader holds out of a single file of ``rows`` (``k15_plugin.data.tasks``)."""
    return min(heldout_size, rows // 5 or 1)


def read_objects(
    path: str | Path, option: str, error: type[K15Error] = K15Error, allow_empty: bool = False
) -> list[dict]:
    """The JSON objects of a JSONL file, for the offline commands (``k15-curate``, ``k15-long2short``), which check
    the fields they need themselves. Blank lines are skipped; a missing file, a line that is not UTF-8 or not a JSON
    object, or a file without rows (unless ``allow_empty``) raises ``error`` naming the file (``option`` is how the
    user named it) and the line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{option} {path}: no such file")
    rows = []
    for number, line in _text_lines(path, str(path), error):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows and not allow_empty:
        raise error(f"{option} {path}: the file has no rows")
    return rows
