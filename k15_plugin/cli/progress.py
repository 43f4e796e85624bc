"""Training progress on standard error: tqdm's bar on a terminal, plain lines everywhere else.

A bar redraws itself with a carriage return at every step; in a log file (``> train.log``, ``nohup``, CI) that is one
ever-growing line. Where standard error is not a terminal, :class:`LineProgress` instead writes one line every
:data:`LINE_SECONDS` seconds or every ``trainer.logging_steps`` steps, whichever comes first (as transformers' own
logging does), plus one at the start and one at the end::

    k15: step 50/1200 (4%), 01:23 elapsed, 31:50 left, reward=0.141, acc=0.52, len=3.34
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm.auto import tqdm

LINE_SECONDS = 30.0


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and closed streams)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(total: int, initial: int, every_steps: int, stream: TextIO | None = None):
    """tqdm's bar where ``stream`` (standard error) is a terminal, else a :class:`LineProgress`.

    Both take ``update(steps)``, ``set_postfix(dict, refresh=False)``, ``close()`` and have ``n``, the step shown."""
    stream = sys.stderr if stream is None else stream
    if is_terminal(stream):
        return tqdm(total=total, initial=initial, desc="k15", unit="step", dynamic_ncols=True, file=stream)
    return LineProgress(total, initial, every_steps, stream)


class LineProgress:
    """One plain line every ``interval`` seconds or ``every_steps`` steps; no carriage returns."""

    def __init__(
        self,
        total: int,
        initial: int,
        every_steps: int,
        stream: TextIO,
        interval: float = LINE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.n, self.initial = total, initial, initial
        self.every_steps, self.stream, self.interval, self.clock = max(1, every_steps), stream, interval, clock
        self.postfix: dict[str, str] = {}
        self.start = self.clock()
        self.written_at, self.written_step = self.start, initial
        self.due = False  # a step count was reached: written with the figures of the log that follows it
        self._write()

    def update(self, steps: int = 1) -> None:
        """Advance by ``steps``; a line is written once the interval has passed, or marked due at a step count."""
        self.n += steps
        if self.due or self.clock() - self.written_at >= self.interval:  # a due line whose log never came: now
            self._write()
        elif self.n - self.written_step >= self.every_steps:
            self.due = True

    def set_postfix(self, postfix: dict[str, str], refresh: bool = False) -> None:
        """The latest figures (reward, accuracy, length); a due line is written now, with them."""
        self.postfix = dict(postfix)
        if self.due:
            self._write()

    def close(self) -> None:
        """Write the last step's line, unless it was written already."""
        if self.written_step != self.n:
            self._write()

    def line(self) -> str:
        """The progress line: step/total, elapsed and remaining time, and the latest figures."""
        elapsed = self.clock() - self.start
        parts = [f"k15: step {self.n}/{self.total} ({100 * self.n // max(1, self.total)}%)"]
        parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
        done = self.n - self.initial
        if 0 < done and self.n < self.total:
            parts.append(f"{tqdm.format_interval(elapsed / done * (self.total - self.n))} left")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        return ", ".join(parts)

    def _write(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self.written_at, self.written_step, self.due = self.clock(), self.n, False
