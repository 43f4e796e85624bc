"""A verifiable math reward (paper section 2.3, "rule-based reward for math"), checked by ``math-verify``.

The k1.5 reward for problems with a reference answer is binary: 1 when the final answer of the response equals the
reference, 0 otherwise. Equality is mathematical, not textual (``\\frac{1}{2}`` = ``0.5``, ``1,000`` = ``1000``,
``x=5`` = ``5``, ``5\\text{ cm}`` = ``5``), which is what Hugging Face's ``math-verify`` implements (LaTeX and plain
expressions to SymPy, then numeric and symbolic comparison). This module only chooses *which* part of a completion
is the final answer and keeps one pathological sample from hurting training:

* extraction (``extraction=``): ``auto`` lets math-verify find the answer (``\\boxed{}`` first, then the last LaTeX
  or plain expression; several boxes with different contents form a set, so hedging over candidates is not
  rewarded); ``boxed`` takes the last ``\\boxed{}``; ``gsm8k`` the text after the last ``####``; ``last_number``
  the last number;
* a per-sample time budget (``timeout_seconds``), because SymPy can spend minutes on an expression such as
  ``9^{9^{9^9}}``. math-verify's own timeout uses ``signal.alarm`` (whole seconds, main thread only, and it raises
  in any other thread), so it is switched off and replaced here: in the main thread an interval timer
  (``SIGALRM`` via ``setitimer``) bounds the whole check of one sample; in any other thread, or when the process
  already has a timer running, the check runs in a helper process that is killed and restarted on a timeout (it
  also survives a check stuck inside C code, which no signal can interrupt);
* garbage in (``None``, empty text, unparsable LaTeX, a timeout) gives 0.0 and never an exception into the trainer.

TRL calls reward functions as ``f(prompts=, completions=, completion_ids=, **dataset_columns, trainer_state=, ...)``;
:class:`MathReward` reads ``completions`` (plain strings, or chat message lists whose assistant content is used) and
the dataset's ``answer`` column, and logs ``math/timeouts`` through TRL's ``log_metric`` when it gets one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from k15_plugin.rewards.columns import column_values

EXTRACTIONS = ("auto", "boxed", "gsm8k", "last_number")
TIMEOUT_BACKENDS = ("auto", "process")
_HELPER_START_SECONDS = 60.0  # importing SymPy on a busy machine

# A number as it ends a worked solution: optional sign, digits with thousands separators, decimals, or a fraction.
_NUMBER = re.compile(r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-\u2212]?\.\d+")


class _Timeout(BaseException):
    """Raised by the interval timer. A BaseException so math-verify's ``except Exception`` cannot swallow it."""


class _DropTimeoutDisabledWarning(logging.Filter):
    # We pass timeout_seconds=None to math-verify on purpose (this module bounds the time itself); its one-time
    # "Timeout is disabled ..." warning would only confuse a user reading the training log.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


# ----------------------------------------------------------------------------------------------------------------------
# Extraction and checking (pure functions; no timeout of their own)
# ----------------------------------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is; a chat completion (list of messages) -> its assistant content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, list):
        return ""
    parts = []
    for message in completion:
        if not isinstance(message, dict) or message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # multimodal-style content: [{"type": "text", "text": ...}, ...]
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        # \boxed 5 (no braces): the next token is the answer
        rest = text[start:].split(None, 2)
        return rest[1] if len(rest) > 1 and rest[0] in ("\\boxed", "\\fbox") else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the model ran out of tokens inside the box


def extract_final_answer(text: str, extraction: str) -> str | None:
    """The part of ``text`` that holds the final answer under ``extraction`` (None: no answer found).

    ``auto`` returns the whole text: math-verify itself finds the answer in it.
    """
    if extraction == "auto":
        return text if text.strip() else None
    if extraction == "boxed":
        return last_boxed(text)
    if extraction == "gsm8k":
        if "####" not in text:
            return None
        lines = text.rsplit("####", 1)[1].strip().splitlines()
        return lines[0] if lines else None
    if extraction == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1] if numbers else None
    raise ValueError(f"extraction must be one of {list(EXTRACTIONS)}, got {extraction!r}")


def _has_expression(parsed: list) -> bool:
    return any(not isinstance(p, str) for p in parsed)


def _parse_answer(answer: str) -> list:
    """A bare answer (``\\frac{1}{2}``, ``1,000``, ``x=5``, ``\\$18``) parsed by math-verify.

    Wrapping it in ``\\boxed{}`` makes math-verify read the whole string as one answer (and strips units, ``\\$``,
    ``\\text{}``); ``$...$`` is the fallback for what the boxed normalisation rejects (e.g. a trailing period).
    """
    from math_verify import parse

    best: list = []
    for candidate in ("\\boxed{" + answer + "}", "$" + answer + "$", answer):
        parsed = parse(candidate, parsing_timeout=None)
        if _has_expression(parsed):
            return parsed
        best = best or parsed
    return best


def _parse_reference(reference: str) -> list:
    if "\\boxed" in reference or "\\fbox" in reference:  # a worked solution: its last box is the answer
        boxed = last_boxed(reference)
        if boxed is not None:
            return _parse_answer(boxed)
    if "####" in reference:  # a GSM8K worked solution
        tail = extract_final_answer(reference, "gsm8k")
        if tail is not None:
            return _parse_answer(tail)
    return _parse_answer(reference)


def check_answer(completion: str, reference: str, extraction: str) -> float:
    """1.0 when ``completion``'s final answer equals ``reference`` for math-verify, else 0.0. No time limit."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if not isinstance(completion, str) or reference is None:
        return 0.0
    reference = str(reference).strip()
    if not reference:
        return 0.0
    answer = extract_final_answer(completion, extraction)
    if answer is None or not answer.strip():
        return 0.0
    if extraction == "auto":
        # The last \boxed{} first, then the last LaTeX or plain expression (open-r1's configuration).
        config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
        predicted = parse(answer, extraction_config=config, parsing_timeout=None)
        boxed = last_boxed(answer)
        if not _has_expression(predicted) and boxed is not None:
            # math-verify found the box but could not parse it in context (e.g. \boxed{10\%}): parse it bare
            predicted = _parse_answer(boxed)
    else:
        predicted = _parse_answer(answer)
    gold = _parse_reference(reference)
    if not predicted or not gold:
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=None) else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Time limits
# ----------------------------------------------------------------------------------------------------------------------


def _signal_timer_usable() -> bool:
    """SIGALRM can bound a call here: main thread of the main interpreter, and no interval timer already running."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False
    return signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # never clobber a caller's own alarm


def _call_with_signal_timeout(seconds: float, func, *args):
    def on_alarm(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return func(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _CheckerProcess:
    """A helper process running :func:`check_answer`, one JSON line in and one out; killed on a timeout.

    A plain ``subprocess`` (not ``multiprocessing``): spawn/forkserver would re-import the user's training script,
    and fork is unsafe in a process with threads.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        """Start the helper and wait until it has imported math-verify, so start-up never eats a sample's budget."""
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        code = "from k15_plugin.rewards.math import _checker_main; _checker_main()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
        )
        self.proc = proc
        if self._read_line(_HELPER_START_SECONDS) != "ready":
            self.close()
            raise RuntimeError("the math-verify helper process did not start")
        return proc

    def _read_line(self, seconds: float) -> str:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=seconds)
        return self.proc.stdout.readline().strip() if ready else ""

    def check(self, completion: str, reference: str, extraction: str, seconds: float) -> float | None:
        """The score, or None on a timeout (the helper is then killed; the next call starts a fresh one)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.proc.stdin.write(json.dumps([completion, reference, extraction]) + "\n")
            self.proc.stdin.flush()
            line = self._read_line(seconds)
            if not line:
                self.close()
                return None
            return float(json.loads(line))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.proc = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


_warmed_up = False  # this process has run _warm_up


def _warm_up() -> None:
    """One untimed check, once per process: importing math-verify and SymPy and building the LaTeX parser happen lazily
    on the first call, and on a loaded machine they take longer than a sample's budget; they are not charged to one."""
    global _warmed_up
    if not _warmed_up:
        check_answer("\\boxed{\\frac{1}{2}}", "0.5", "auto")
        _warmed_up = True


def _checker_main() -> None:
    """Loop of the helper process: ``[completion, reference, extraction]`` lines in, scores out."""
    _warm_up()  # before "ready"
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            completion, reference, extraction = json.loads(line)
            score = check_answer(completion, reference, extraction)
        except Exception:
            score = 0.0
        sys.stdout.write(json.dumps(score) + "\n")
        sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------------------------
# The reward function
# ----------------------------------------------------------------------------------------------------------------------


class MathReward:
    """TRL reward function: 1.0 if the completion's final answer equals the ``answer`` column (math-verify), else 0.0.

    Args:
        extraction: where the final answer is in the completion: ``auto`` (math-verify's own search:
            ``\\boxed{}`` first, several boxes forming one set answer, then the last expression), ``boxed`` (the last
            ``\\boxed{}``), ``gsm8k`` (after the last ``####``) or ``last_number``.
        timeout_seconds: time budget for checking one sample (parsing both answers and comparing them); a sample
            over budget scores 0.0. Must be > 0.
        timeout_backend: ``auto`` (a ``SIGALRM`` interval timer in the main thread, else a helper process) or
            ``process`` (always the helper: a little slower per call, but it also stops a check stuck in C code).
        answer_column: the dataset column holding the reference answer (a bare answer, or a worked solution ending in
            ``\\boxed{}`` or ``#### x``).

    Picklable (holds only its options; the helper process is started lazily in the process that uses it). Called by
    TRL as ``reward(completions, answer=[...], log_metric=..., **other_columns)``: raises TypeError when the answer
    column is missing and ValueError when the lengths differ; bad options raise ValueError at construction.

    Example:
    ```python
    >>> from k15_plugin.rewards.math import MathReward
    >>> reward = MathReward(extraction="gsm8k")
    >>> reward(["48 + 24 = 72\\n#### 72", "#### 70"], answer=["72", "72"])
    [1.0, 0.0]
    >>> chat = [{"role": "assistant", "content": r"The answer is \\boxed{1,000}."}]
    >>> MathReward()([chat], answer=["1000"])
    [1.0]
    >>> MathReward(extraction="latex")
    Traceback (most recent call last):
    ...
    ValueError: extraction must be one of ['auto', 'boxed', 'gsm8k', 'last_number'], got 'latex'

    ```
    """

    def __init__(
        self,
        extraction: str = "auto",
        timeout_seconds: float = 5.0,
        timeout_backend: str = "auto",
        answer_column: str = "answer",
    ):
        if extraction not in EXTRACTIONS:
            raise ValueError(f"extraction must be one of {list(EXTRACTIONS)}, got {extraction!r}")
        if timeout_backend not in TIMEOUT_BACKENDS:
            raise ValueError(f"timeout_backend must be one of {list(TIMEOUT_BACKENDS)}, got {timeout_backend!r}")
        if not (isinstance(timeout_seconds, (int, float)) and math.isfinite(timeout_seconds) and timeout_seconds > 0):
            raise ValueError(f"timeout_seconds must be a number > 0, got {timeout_seconds!r}")
        self.extraction = extraction
        self.timeout_seconds = float(timeout_seconds)
        self.timeout_backend = timeout_backend
        self.answer_column = answer_column
        self.__name__ = "math_verify"
        self._checker: _CheckerProcess | None = None
        self.num_timeouts = 0  # since construction, in this process

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_checker"] = None  # a process handle does not travel
        return state

    def __repr__(self) -> str:
        return (
            f"MathReward(extraction={self.extraction!r}, timeout_seconds={self.timeout_seconds}, "
            f"timeout_backend={self.timeout_backend!r})"
        )

    def score(self, completion: Any, reference: Any) -> float:
        """Reward of one completion against one reference answer; 0.0 on any failure or timeout."""
        text = completion_text(completion)
        if reference is None or not text.strip():
            return 0.0
        reference = str(reference)
        use_signal = self.timeout_backend == "auto" and _signal_timer_usable()
        try:
            if use_signal:
                _warm_up()
                return _call_with_signal_timeout(self.timeout_seconds, check_answer, text, reference, self.extraction)
            if self._checker is None:
                self._checker = _CheckerProcess()
            result = self._checker.check(text, reference, self.extraction, self.timeout_seconds)
            if result is None:
                raise _Timeout
            return result
        except _Timeout:
            self.num_timeouts += 1
            return 0.0
        except Exception:  # a reward must never take training down (RecursionError on deeply nested LaTeX, ...)
            return 0.0

    def __call__(self, completions: Sequence[Any], answer: Sequence[Any] | None = None, **kwargs: Any) -> list[float]:
        references = column_values(
            "MathReward", self.answer_column, "answer", answer, kwargs, completions, "the reference answer per row"
        )
        before = self.num_timeouts
        rewards = [self.score(c, a) for c, a in zip(completions, references, strict=True)]
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            try:
                log_metric("math/timeouts", float(self.num_timeouts - before))
            except Exception:
                pass
        if self.num_timeouts > before:
            # One fixed message, so Python's warning filter shows it once rather than at every step.
            warnings.warn(
                f"MathReward: a sample exceeded timeout_seconds={self.timeout_seconds} and scored 0 (the count per "
                "call is logged as math/timeouts)",
                RuntimeWarning,
                stacklevel=2,
            )
        return rewards
