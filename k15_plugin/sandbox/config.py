"""The sandbox's configuration and results: :class:`SandboxConfig`, :class:`RunResult` and the errors.

What a caller of :class:`~k15_plugin.sandbox.Sandbox` passes in (the limits and isolation, validated here) and gets
back (one result per input run, or the error saying which isolation the machine cannot give). It is kept apart from
the machinery that runs programs and imports nothing but the standard library, so that the other sandbox modules
(:mod:`~k15_plugin.sandbox.root`, :mod:`~k15_plugin.sandbox.runner`) build on it without an import cycle.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

ISOLATION = ("allowlist", "denylist", "none")  # strongest first
# What ``SandboxConfig.cgroup`` accepts.
CGROUP = ("auto", "require", "off")
# Host paths the allow-list root replaces with its own: nothing may be bound under them.
_OWN_TREES = ("/tmp", "/dev", "/proc")


class SandboxUnavailableError(RuntimeError):
    """The sandbox cannot give the isolation the configuration requires (e.g. no mount or network namespace)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of one program run. Every field has a default; ``Sandbox(SandboxConfig(...))``.

    Attributes:
        timeout_seconds: wall-clock limit per input (the program is killed, the run fails).
        cpu_seconds: ``RLIMIT_CPU`` per process; None: ``ceil(timeout_seconds) + 1``.
        memory_mb: ``RLIMIT_AS`` (address space) per process, in MiB, and, where cgroup v2 is delegated, the
            slot's ``memory.max`` (all its processes and its tmpfs files together). Without cgroups a program's
            worst case is ``max_processes * memory_mb`` per slot.
        max_processes: ``RLIMIT_NPROC``: processes and threads of the slot's uid (the program counts as one); with
            cgroups also the slot's ``pids.max`` (plus the slot's own two).
        max_open_files: ``RLIMIT_NOFILE``.
        max_file_mb: ``RLIMIT_FSIZE``: largest file the program may write, in MiB.
        tmpfs_mb: size of each private tmpfs (``/tmp``, ``/dev/shm``), in MiB.
        max_output_bytes: stdout kept per run; a program that prints more is killed and fails.
        concurrency: slots, i.e. programs run at once; 0: ``os.cpu_count()``.
        isolation: ``allowlist``: a root file system of the interpreter, its libraries and ``allow_paths`` only;
            ``denylist``: the host's file system read-only, without the trainer's working directory, ``$HOME`` and
            ``hide_paths``; ``none``: no namespaces (no network or file-system isolation). Where the machine cannot
            give it, :class:`SandboxUnavailableError` says so; the two weaker ones warn once.
        allow_paths: host files or directories the program may read (read-only, at the same path), e.g. a
            ``site-packages`` with numpy. Absolute, existing, not under ``/tmp``, ``/dev`` or ``/proc``.
        hide_paths: host paths to hide: in ``denylist`` mode besides the trainer's working directory and ``$HOME``;
            in ``allowlist`` mode, parts of ``allow_paths`` to leave out.
        cgroup: ``auto``: a cgroup v2 leaf per slot where the machine delegates the memory, pids and cpu
            controllers (logged once when it does not); ``require``: raise when it does not; ``off``.
        cpus: the slot's ``cpu.max`` quota, in CPUs (cgroup only).
        uid: the uid every slot runs as when the trainer is root; None: ``uid_base() + slot`` (one uid per slot
            and trainer process; falls back to 65534 = nobody if that range is not mapped in this user namespace).
        python: the interpreter that runs programs; None: the first of the trainer's base interpreter,
            ``/usr/local/bin/python3`` and ``/usr/bin/python3`` that works inside the sandbox (found by a probe).
        python_args: interpreter flags (``-I``: isolated mode, ignores ``PYTHON*`` variables and user site-packages).
    """

    timeout_seconds: float = 5.0
    cpu_seconds: int | None = None
    memory_mb: int = 512
    max_processes: int = 32
    max_open_files: int = 64
    max_file_mb: int = 16
    tmpfs_mb: int = 64
    max_output_bytes: int = 1 << 20
    concurrency: int = 0
    isolation: str = "allowlist"
    allow_paths: tuple[str, ...] = ()
    hide_paths: tuple[str, ...] = ()
    cgroup: str = "auto"
    cpus: float = 1.0
    uid: int | None = None
    python: str | None = None
    python_args: tuple[str, ...] = ("-I",)

    def __post_init__(self) -> None:
        positive = (
            "timeout_seconds",
            "memory_mb",
            "max_processes",
            "max_open_files",
            "max_file_mb",
            "tmpfs_mb",
            "max_output_bytes",
            "cpus",
        )
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if self.cpu_seconds is not None and self.cpu_seconds < 1:
            raise ValueError(f"cpu_seconds must be None or an integer >= 1, got {self.cpu_seconds!r}")
        if self.concurrency < 0:
            raise ValueError(f"concurrency must be >= 0 (0: os.cpu_count()), got {self.concurrency!r}")
        if self.isolation not in ISOLATION:
            raise ValueError(f"isolation must be one of {list(ISOLATION)}, got {self.isolation!r}")
        if self.cgroup not in CGROUP:
            raise ValueError(f"cgroup must be one of {list(CGROUP)}, got {self.cgroup!r}")
        if isinstance(self.allow_paths, str) or isinstance(self.hide_paths, str):
            raise ValueError("allow_paths and hide_paths are lists of paths, not one string")
        object.__setattr__(self, "python_args", tuple(self.python_args))
        object.__setattr__(self, "hide_paths", tuple(str(p) for p in self.hide_paths))
        object.__setattr__(self, "allow_paths", tuple(str(p) for p in self.allow_paths))
        for path in self.allow_paths:
            if not os.path.isabs(path):
                raise ValueError(f"allow_paths: {path} is not an absolute path")
            if not os.path.exists(path):
                raise ValueError(f"allow_paths: {path} does not exist")
            real = os.path.realpath(path)
            if real == "/" or any(_under(real, tree) for tree in _OWN_TREES):
                raise ValueError(
                    f"allow_paths: {path} is the root or lies under /tmp, /dev or /proc, which the "
                    "sandbox replaces with its own"
                )

    @property
    def workers(self) -> int:
        """The number of slots: ``concurrency``, or ``os.cpu_count()`` when it is 0."""
        return self.concurrency or os.cpu_count() or 1


def _under(path: str, tree: str) -> bool:
    """Whether ``path`` is ``tree`` or lies inside it (both normalized absolute paths)."""
    return path == tree or path.startswith(tree.rstrip("/") + "/")


@dataclass
class RunResult:
    """One program run on one input."""

    exit_code: int | None  # None when killed by a signal (then ``signal`` is set)
    stdout: str
    signal: int | None = None
    timed_out: bool = False
    output_overflow: bool = False
    stderr_tail: str = ""
    seconds: float = 0.0
    error: str | None = None  # the sandbox itself failed (not the program)

    @property
    def ok(self) -> bool:
        """Exited by itself with status 0, within the limits."""
        return self.exit_code == 0 and not (self.timed_out or self.output_overflow or self.error)
