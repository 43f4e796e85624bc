"""A sandbox for untrusted programs written by the policy (paper section 2.6, "code sandbox" for coding rewards).

k1.5 scores coding problems by running the model's program on test cases in a sandbox. During RL the policy writes
thousands of programs per step, and some of them will fork-bomb, allocate without bound, loop forever, print without
end, poke the network, or look around the file system for the expected answers. This module runs each program so
that none of that reaches the trainer, and many of them in parallel.

**Slots.** ``concurrency`` slots run programs side by side. Each slot is a long-lived *launcher*
(:mod:`k15_plugin.rewards._launcher`, run by path with ``python -I -S``, so it imports nothing but the standard
library) that builds the sandbox once and then runs program after program in it, each in a fresh working directory,
with everything the previous one started killed and every writable file system emptied in between. A slot that
overruns its time budget is killed and rebuilt on its next use. On Linux the launcher

1. joins its own cgroup v2 leaf when the machine delegates the ``memory``, ``pids`` and ``cpu`` controllers
   (``memory.max``, ``pids.max`` and ``cpu.max`` per slot; otherwise the per-process limits below are all there is,
   and the trainer logs that once);
2. enters new mount, network, PID, IPC, UTS and cgroup namespaces (as root; otherwise inside a new user namespace as
   well): the network namespace has only a loopback that is down, so no connection goes anywhere, not even to
   127.0.0.1; the PID namespace makes its first process (*init*, the launcher's child) the reaper of every process
   a program starts, and when init exits the kernel kills whatever is left;
3. ``isolation="allowlist"`` (the default): builds a new root file system on an empty tmpfs from an allow-list and
   ``pivot_root``\\ s into it, so nothing else of the host exists for the program: the interpreter, its standard
   library and the shared libraries they load (found with ``ldd``), ``/etc/ld.so.cache`` and the C.UTF-8 locale,
   all read-only bind mounts, with ``site-packages`` masked empty; a generated ``/etc/passwd``, ``/etc/group`` and
   ``/etc/hosts``; ``/dev/null``, ``/dev/zero``, ``/dev/urandom`` and the ``/dev/std*`` links; a fresh ``/proc``
   of the sandbox's own PID namespace; empty private tmpfs ``/tmp`` and ``/dev/shm``; plus ``allow_paths``,
   read-only. ``isolation="denylist"`` keeps the host's file system, read-only, and hides the trainer's working
   directory, ``$HOME`` and ``hide_paths`` (weaker: everything else world-readable stays readable);
4. for each input: writes the program into a fresh working directory in that tmpfs, forks the program with stdin =
   the input (an in-memory file: the expected outputs are never written anywhere it can see), resource limits
   (``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NPROC``, ``RLIMIT_NOFILE``, ``RLIMIT_FSIZE``, no core files),
   ``no_new_privs``, the first in line for the OOM killer, an environment with nothing but a minimal ``PATH``,
   ``HOME`` = the working directory and a locale, and -- when the trainer is root -- a dedicated unprivileged uid
   per slot (``setgroups([])``, ``setgid``, ``setuid``); it reads stdout up to ``max_output_bytes`` and kills
   everything in the namespace (``kill(-1, SIGKILL)`` from init) on a wall-clock timeout, on overflow, and after
   every run.

The trainer streams one JSON line per input back and kills the slot's process group if a run overruns; that kills
init, and with it the namespace. ``RLIMIT_NPROC`` counts processes per real uid, so each slot of each trainer
process gets its own uid (:func:`uid_base` ``+ slot``) and one fork bomb cannot starve its neighbours, not even
those of another rank of the same job on the same machine.

Nothing falls back silently: ``isolation`` is the isolation the caller gets or an error. Where the allow-list root
cannot be built (no ``CAP_SYS_ADMIN`` and no unprivileged user namespaces, say), the default raises
:class:`SandboxUnavailableError` with one line saying what failed and which setting accepts weaker isolation:
``denylist`` (the read-only host file system) or ``none`` (no namespaces at all: resource limits, a new session, a
scrubbed environment, a temporary working directory and, as root, the unprivileged uid; the network and the host's
file system stay reachable). Both warn once when chosen.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

from k15_plugin.rewards import _launcher
from k15_plugin.rewards._launcher import MINIMAL_PATH, SETUP_FAILED, WORKDIR

ISOLATION = ("allowlist", "denylist", "none")  # strongest first
CGROUP = ("auto", "require", "off")
# Dedicated uids for the sandbox slots when the trainer is root: an unnamed range no account or system service uses,
# so RLIMIT_NPROC counts each slot alone and a leftover process can be told apart from everything else on the host.
DEFAULT_UID_BASE = 2_000_000_000
_UIDS_PER_PROCESS = 256  # slots beyond that share uids (modulo)
# Never hidden even if they are the trainer's working directory or home: the program's interpreter needs them.
_SYSTEM_DIRS = ("/", "/usr", "/bin", "/lib", "/lib64", "/etc", "/proc", "/dev", "/sys", "/tmp", "/var")
# Host paths the allow-list root replaces with its own: nothing may be bound under them.
_OWN_TREES = ("/tmp", "/dev", "/proc")

logger = logging.getLogger(__name__)


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


@dataclass
class _Mode:
    """How this process builds sandboxes, decided once by a probe."""

    isolation: str
    userns: bool
    drop_uid: bool
    uid_base: int | None  # None: the one configured uid for every slot
    python: str
    hide: list[str] = field(default_factory=list)  # denylist mode
    root: dict | None = None  # allowlist mode: {"ops": [...]} without the per-slot /etc files
    cgroup: str | None = None  # the directory holding one leaf cgroup per slot
    notes: dict = field(default_factory=dict)

    @property
    def namespaces(self) -> bool:
        return self.isolation != "none"


def uid_base() -> int:
    """The first of this process's sandbox uids (as root): its own range, so the slots of two trainer processes on
    one machine (the ranks of a DDP job, two pytest workers) never share a uid and its ``RLIMIT_NPROC``."""
    return DEFAULT_UID_BASE + (os.getpid() % (1 << 22)) * _UIDS_PER_PROCESS


def _uid_range_mapped(start: int, count: int) -> bool:
    """Whether uids ``start .. start+count-1`` exist in this user namespace (containers often map only 65536)."""
    try:
        with open("/proc/self/uid_map") as f:
            rows = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except OSError:
        return False
    return any(inside <= start and start + count <= inside + length for inside, _, length in rows)


def _launcher_command() -> list[str]:
    """The launcher as a script: ``-I`` keeps ``PYTHON*`` variables and its directory out, ``-S`` skips site."""
    return [sys.executable, "-I", "-S", os.path.abspath(_launcher.__file__)]


def _python_candidates(config: SandboxConfig) -> list[str]:
    if config.python is not None:
        return [config.python]
    base = getattr(sys, "_base_executable", None) or sys.executable
    found = []
    for path in (os.path.realpath(base), "/usr/local/bin/python3", "/usr/bin/python3"):
        if os.path.isfile(path) and os.access(path, os.X_OK) and os.path.realpath(path) not in found:
            found.append(os.path.realpath(path))
    return found


def _paths_to_hide(config: SandboxConfig, python: str) -> list[str]:
    """The trainer's working directory, ``$HOME`` and ``hide_paths``, minus anything the interpreter lives under."""
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))  # .../bin/python3 -> ...
    hide = []
    for raw in (os.getcwd(), os.path.expanduser("~"), *config.hide_paths):
        path = os.path.realpath(raw)
        if path in _SYSTEM_DIRS or not os.path.exists(path) or path in hide:
            continue
        if _under(prefix, path):
            continue  # hiding it would hide the interpreter
        hide.append(path)
    return hide


# -- the allow-list root ------------------------------------------------------------------------------------------

_ENV = {"PATH": MINIMAL_PATH, "LANG": "C.UTF-8"}  # for the helper processes: no trainer secrets, no LD_* variables
_INTERPRETER_PROBE = (
    "import json, site, sys; print(json.dumps({'path': sys.path, 'sites': site.getsitepackages() "
    "+ [site.getusersitepackages()]}))"
)
_LOCALES = ("/usr/lib/locale/C.utf8", "/usr/lib/locale/C.UTF-8")


def _interpreter_files(python: str) -> tuple[list[str], list[str]]:
    """``(paths to bind, site directories to mask)`` for ``python``: itself, its standard library (``sys.path`` of
    ``-I -S``), and every shared library the interpreter and its extension modules load (``ldd``)."""
    try:
        out = subprocess.run(
            [python, "-I", "-S", "-c", _INTERPRETER_PROBE],
            capture_output=True,
            text=True,
            timeout=120,
            env=_ENV,
            cwd="/",
            check=True,
        )
        info = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        raise SandboxUnavailableError(f"{python}: cannot list its standard library ({err})") from None
    stdlib = [os.path.realpath(p) for p in info["path"] if p and os.path.exists(p)]
    elves = [os.path.realpath(python)]
    for directory in stdlib:
        if os.path.isdir(directory):
            elves += sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".so"))
    ldd = shutil.which("ldd", path=MINIMAL_PATH)
    if ldd is None:
        raise SandboxUnavailableError(
            "ldd not found: the allow-list root needs it to list the interpreter's shared "
            "libraries (install libc-bin), or set isolation=denylist"
        )
    try:  # exits 1 when a file is not dynamic (a static interpreter): what it printed is still right
        listing = subprocess.run([ldd, *elves], capture_output=True, text=True, timeout=120, env=_ENV, cwd="/").stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise SandboxUnavailableError(f"ldd {python}: {err}") from None
    libraries = set()
    for line in listing.splitlines():
        if line[:1].isspace():  # "\tlibc.so.6 => /lib/.../libc.so.6 (0x...)", "\t/lib64/ld-linux-x86-64.so.2 (0x...)"
            libraries.update(token for token in line.split() if token.startswith("/"))
    return [python, *stdlib, *sorted(libraries)], [os.path.realpath(p) for p in info["sites"]]


def _add_path(ops: list, seen: dict, path: str, depth: int = 0) -> None:
    """Ops that make ``path`` exist in the new root as on the host: its directories, every symlink on the way
    (so ``/lib -> usr/lib`` and ``libz.so.1 -> libz.so.1.2.13`` resolve as they do on the host), and a read-only
    bind of what it finally names. Paths under a directory already bound are covered."""
    if depth > 40:
        raise SandboxUnavailableError(f"too many symlinks resolving {path}")
    parts = [p for p in os.path.normpath(path).split("/") if p]
    current = ""
    for i, part in enumerate(parts):
        current += "/" + part
        if seen.get(current) == "bind":
            return
        if os.path.islink(current):
            target = os.readlink(current)
            if current not in seen:
                ops.append(("symlink", current, target))
                seen[current] = "symlink"
            resolved = os.path.normpath(os.path.join(os.path.dirname(current), target))
            _add_path(ops, seen, "/".join([resolved, *parts[i + 1 :]]), depth + 1)
            return
        if i + 1 < len(parts) and current not in seen:
            ops.append(("dir", current))
            seen[current] = "dir"
    if current and current not in seen:
        ops.append(("bind", current, os.path.isdir(current)))
        seen[current] = "bind"


def _root_plan(config: SandboxConfig, python: str) -> dict:
    """What the allow-list root holds for ``python``; the launcher builds it (see :func:`_build_root`)."""
    files, sites = _interpreter_files(python)
    for path in (python, *files):
        if any(_under(os.path.realpath(path), tree) for tree in _OWN_TREES):
            raise SandboxUnavailableError(
                f"{path} (the interpreter's) lies under /tmp, /dev or /proc, which the sandbox replaces; set `python` "
                "to an interpreter installed elsewhere"
            )
    extra = ["/etc/ld.so.cache", *(p for p in _LOCALES if os.path.isdir(p)), *config.allow_paths]
    ops: list = []
    seen: dict = {}
    for path in sorted({p for p in [*files, *extra] if os.path.exists(p)}, key=lambda p: (p.count("/"), p)):
        _add_path(ops, seen, path)
    binds = [op[1] for op in ops if op[0] == "bind"]
    allowed = [os.path.realpath(p) for p in config.allow_paths]
    # site-packages stays out unless the user allowed it on purpose (numpy, say); the trainer's directories always
    sites = [p for p in sites if not any(_under(p, a) for a in allowed)]
    masks = []
    for path in (*sites, *_paths_to_hide(config, python)):
        if os.path.isdir(path) and path not in masks and any(_under(path, b) for b in binds):
            masks.append(path)
    ops += [("mask", path) for path in masks]
    return {"ops": ops}


def _etc_files(uid: int, gid: int) -> list:
    """The allow-list root's ``/etc``: what ``getpass``, ``pwd`` and name lookups of localhost need, nothing else."""
    nologin = "/usr/sbin/nologin"
    return [
        ("file", "/etc/passwd", f"root:x:0:0::/:{nologin}\nsandbox:x:{uid}:{gid}::{WORKDIR}:{nologin}\n"),
        ("file", "/etc/group", f"root:x:0:\nsandbox:x:{gid}:\n"),
        ("file", "/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
        ("file", "/etc/hostname", "sandbox\n"),
    ]


# -- cgroup v2 ------------------------------------------------------------------------------------------------------

_CONTROLLERS = ("memory", "pids", "cpu")
_CGROUP_LOGGED: set = set()


def _cgroup_v2_base() -> str:
    """This process's cgroup v2 directory (raises OSError/StopIteration without a cgroup v2 hierarchy)."""
    with open("/proc/self/cgroup") as f:
        relative = next(line[3:].strip() for line in f if line.startswith("0::"))
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return os.path.join(fields[4], relative.lstrip("/"))
    raise StopIteration


def _cgroup_parent(config: SandboxConfig) -> tuple[str | None, str | None]:
    """``(directory for the slots' leaf cgroups, None)`` where the machine delegates cgroup v2, else ``(None, why)``."""
    if config.cgroup == "off":
        return None, None
    try:
        base = _cgroup_v2_base()
        with open(os.path.join(base, "cgroup.controllers")) as f:
            available = f.read().split()
    except (OSError, StopIteration):
        return None, "no cgroup v2 hierarchy for this process"
    missing = [c for c in _CONTROLLERS if c not in available]
    if missing:
        return None, f"cgroup v2 controllers {missing} are not delegated to {base}"
    parent = os.path.join(base, f"k15-sandbox-{os.getpid()}-{threading.get_ident() % 100000}-{time.monotonic_ns()}")
    try:
        with open(os.path.join(base, "cgroup.subtree_control")) as f:
            enabled = f.read().split()
        todo = [c for c in _CONTROLLERS if c not in enabled]
        if todo:  # fails with EBUSY where this process's own cgroup holds processes (and is not the root)
            with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                f.write(" ".join("+" + c for c in todo))
        os.mkdir(parent)
        with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
            f.write(" ".join("+" + c for c in _CONTROLLERS))
    except OSError as err:
        _remove_cgroup(parent)
        return None, f"cannot create the sandbox's cgroups under {base}: {err.strerror}"
    atexit.register(_remove_cgroup, parent)
    return parent, None


def _slot_cgroup(parent: str, slot: int, config: SandboxConfig) -> str:
    leaf = os.path.join(parent, f"slot{slot}")
    os.makedirs(leaf, exist_ok=True)
    limits = {
        "memory.max": str(config.memory_mb << 20),
        "memory.swap.max": "0",
        "pids.max": str(config.max_processes + 2),  # + the slot's launcher and init
        "cpu.max": f"{max(1000, round(config.cpus * 100_000))} 100000",
    }
    for name, value in limits.items():
        path = os.path.join(leaf, name)
        if name == "memory.swap.max" and not os.path.exists(path):
            continue  # no swap accounting on this kernel
        with open(path, "w") as f:
            f.write(value)
    return leaf


def _remove_cgroup(path: str) -> None:
    """rmdir the leaves, then the parent (a leaf whose processes are still exiting gets a moment)."""
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        leaf = os.path.join(path, name)
        if os.path.isdir(leaf):
            for _ in range(50):
                try:
                    os.rmdir(leaf)
                    break
                except OSError:
                    time.sleep(0.02)
    try:
        os.rmdir(path)
    except OSError:
        pass


# -- slots ----------------------------------------------------------------------------------------------------------


class _Slot:
    """One launcher process and its sandbox; runs one job at a time, programs one after another."""

    def __init__(self, config: SandboxConfig, mode: _Mode, index: int) -> None:
        self.config = config
        uid = _slot_uid(config, mode, index)
        spec = {
            "isolation": mode.isolation,
            "userns": mode.userns,
            "uid": uid,
            # a dedicated uid may be cleaned up by "kill every process of this uid" (no PID namespace to do it)
            "uid_is_dedicated": uid is not None and config.uid is None and mode.uid_base is not None,
            "python": [mode.python, *config.python_args],
            "hide": mode.hide,
            "root": None,
            "cgroup": _slot_cgroup(mode.cgroup, index, config) if mode.cgroup else None,
            "timeout": config.timeout_seconds,
            "cpu": config.cpu_seconds or math.ceil(config.timeout_seconds) + 1,
            "memory": config.memory_mb << 20,
            "nproc": config.max_processes,
            "nofile": config.max_open_files,
            "fsize": config.max_file_mb << 20,
            "tmpfs_mb": config.tmpfs_mb,
            "max_output": config.max_output_bytes,
        }
        if mode.root is not None:
            inside = (1000, 1000) if mode.userns else (uid, uid) if uid is not None else (os.getuid(), os.getgid())
            spec["root"] = {"ops": [*mode.root["ops"], *_etc_files(*inside)]}
        self.proc = subprocess.Popen(
            _launcher_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=_ENV,
            close_fds=True,
            cwd="/",
        )
        self.stderr = b""
        self.buffer = b""
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
        self.sel.register(self.proc.stderr, selectors.EVENT_READ, "err")
        self.notes: dict = {}
        try:
            self._send(spec)
            record = self._next_record(time.monotonic() + 60.0)
        except (OSError, EOFError, TimeoutError):
            record = None
        if record is None or "setup" not in record:
            self.close()
            message = self.stderr.decode(errors="replace").strip()
            if self.proc.returncode == SETUP_FAILED:
                raise SandboxUnavailableError(message.splitlines()[-1] if message else "sandbox setup failed")
            raise SandboxUnavailableError(f"sandbox launcher exited with {self.proc.returncode}: {message[-300:]}")
        self.notes = record["setup"]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _send(self, message) -> None:
        payload = json.dumps(message).encode()
        self.proc.stdin.write(len(payload).to_bytes(8, "little") + payload)
        self.proc.stdin.flush()

    def _next_record(self, deadline: float) -> dict:
        """The launcher's next JSON line; TimeoutError after ``deadline``, EOFError when it exited."""
        while b"\n" not in self.buffer:
            if not self.sel.get_map():
                raise EOFError
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._read_once(remaining)
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def _read_once(self, timeout: float) -> bool:
        """Read what the launcher has written within ``timeout`` (stdout to the buffer, the tail of stderr kept);
        False if it wrote nothing."""
        ready = self.sel.select(timeout=timeout)
        for key, _ in ready:
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                self.sel.unregister(key.fileobj)
            elif key.data == "err":
                self.stderr = (self.stderr + chunk)[-(1 << 14) :]
            else:
                self.buffer += chunk
        return bool(ready)

    def run(
        self, program: str, inputs: list[str], keep_going: Callable[[int, RunResult], bool] | None
    ) -> list[RunResult]:
        results: list[RunResult] = []
        try:
            self._send({"program": program, "inputs": inputs})
            for i in range(len(inputs)):
                record = self._next_record(time.monotonic() + self.config.timeout_seconds + 5.0)
                result = RunResult(
                    exit_code=record["exit"],
                    stdout=record["stdout"].encode("latin-1").decode(errors="replace"),  # bytes, then UTF-8
                    signal=record["signal"],
                    timed_out=record["timed_out"],
                    output_overflow=record["overflow"],
                    stderr_tail=record["stderr"],
                    seconds=record["seconds"],
                )
                results.append(result)
                try:
                    more = keep_going is None or keep_going(i, result)
                except BaseException:
                    self.close()  # it waits for a go-on byte that will not come: start afresh next time
                    raise
                if i + 1 < len(inputs):
                    self.proc.stdin.write(b"n" if more else b"s")
                    self.proc.stdin.flush()
                if not more:
                    break
        except (OSError, EOFError, TimeoutError, ValueError, KeyError) as err:
            why = "overran its time budget" if isinstance(err, TimeoutError) else f"failed ({type(err).__name__})"
            self.close()
            message = self.stderr.decode(errors="replace").strip()
            results.append(RunResult(exit_code=None, stdout="", error=f"sandbox {why}: {message[-500:]}"))
        return results

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher and init: the kernel then empties the namespace
            except ProcessLookupError:
                pass
        self.proc.wait()
        try:  # what it said before it died
            while self.sel.get_map() and self._read_once(1.0):
                pass
        except OSError:
            pass
        self.sel.close()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


def _why_probe_failed(results: list[RunResult]) -> str:
    """One phrase for a failed probe run: the sandbox's own error, else what the program did."""
    if not results:
        return "no result"
    result = results[0]
    if result.error:
        return result.error
    tail = " ".join(result.stderr_tail.strip().splitlines()[-1:])
    if result.timed_out:
        what = f"timed out after {result.seconds:.1f} s"
    elif result.output_overflow:
        what = "wrote too much output"
    elif result.signal is not None:
        what = f"killed by signal {result.signal}"
    elif result.exit_code != 0:
        what = f"exited with {result.exit_code}"
    else:
        what = f"printed {result.stdout.strip()[:80]!r} instead of 5"
    return f"{what}: {tail}" if tail else what


def _slot_uid(config: SandboxConfig, mode: _Mode, slot: int) -> int | None:
    if not mode.drop_uid:
        return None
    if config.uid is not None:
        return config.uid
    return mode.uid_base + slot % _UIDS_PER_PROCESS if mode.uid_base is not None else 65534


class _Pool:
    """The slots of one configuration in one process: started on first use, reused until the process exits."""

    def __init__(self, config: SandboxConfig, mode: _Mode) -> None:
        self.config, self.mode = config, mode
        self.free: queue.Queue[int] = queue.Queue()
        for index in range(config.workers):
            self.free.put(index)
        self.slots: dict[int, _Slot] = {}

    def run(self, program: str, inputs: list[str], keep_going) -> list[RunResult]:
        index = self.free.get()
        try:
            slot = self.slots.get(index)
            if slot is None or not slot.alive:
                try:
                    slot = self.slots[index] = _Slot(self.config, self.mode, index)
                except SandboxUnavailableError as err:  # a setup failure after a successful probe: report
                    return [RunResult(exit_code=None, stdout="", error=str(err))]
            return slot.run(program, inputs, keep_going)
        finally:
            self.free.put(index)

    def close(self) -> None:
        for slot in self.slots.values():
            slot.close()
        self.slots.clear()


_POOLS: dict[tuple, _Pool] = {}
_POOLS_LOCK = threading.Lock()


@atexit.register
def _close_pools() -> None:
    with _POOLS_LOCK:  # only this process's: a forked child that exits must not stop its parent's slots
        for key in [key for key in _POOLS if key[0] == os.getpid()]:
            _POOLS.pop(key).close()


class Sandbox:
    """Runs programs under :class:`SandboxConfig`. Picklable; each process probes and starts its own slots once."""

    def __init__(self, config: SandboxConfig | None = None, **overrides) -> None:
        if config is not None and overrides:
            raise TypeError("pass either a SandboxConfig or keyword overrides, not both")
        self.config = config if config is not None else SandboxConfig(**overrides)

    # -- mode ---------------------------------------------------------------------------------------------------
    def mode(self) -> _Mode:
        """The isolation this process uses (probes on first call; raises :class:`SandboxUnavailableError`)."""
        return self._pool().mode

    def _key(self) -> tuple:
        """This process's pool for this configuration."""
        return os.getpid(), json.dumps(asdict(self.config), sort_keys=True, default=str)

    def _pool(self) -> _Pool:
        key = self._key()
        with _POOLS_LOCK:
            if key not in _POOLS:
                _POOLS[key] = _Pool(self.config, self._probe())
            return _POOLS[key]

    # What competitive programs import, so that a library missing from the allow-list root shows at the probe.
    _PROBE_PROGRAM = (
        "import sys, json, math, re, collections, heapq, bisect, itertools, functools, decimal, fractions, random, "
        "string, array, datetime\nprint(sum(map(int, sys.stdin.read().split())))\n"
    )

    def _probe(self) -> _Mode:
        cfg = self.config
        is_root = os.geteuid() == 0
        if cfg.uid is not None:
            first_uid, uid_note = None, None
        elif _uid_range_mapped(uid_base(), _UIDS_PER_PROCESS):
            first_uid, uid_note = uid_base(), None
        else:
            first_uid, uid_note = None, "uid range not mapped; every slot runs as 65534"
        cgroup, cgroup_note = _cgroup_parent(cfg)
        if cgroup is None and cgroup_note and cfg.cgroup == "require":
            raise SandboxUnavailableError(
                f"no per-sandbox cgroup: {cgroup_note}; set cgroup=auto to run with the per-process limits only"
            )
        isolation = cfg.isolation
        errors = []
        setup_failed = False
        # The probe checks that the sandbox works, not the user's per-input time limit: a loaded machine may take
        # more than a short timeout to start Python (the memory and other limits stay, so a too-small one shows).
        probe_cfg = replace(
            cfg,
            timeout_seconds=max(cfg.timeout_seconds, 30.0),
            cpu_seconds=None if cfg.cpu_seconds is None else max(cfg.cpu_seconds, 31),
        )
        for python in _python_candidates(cfg):
            try:
                mode = _Mode(
                    isolation=isolation,
                    userns=not is_root and isolation != "none",
                    drop_uid=is_root,
                    uid_base=first_uid,
                    python=python,
                    cgroup=cgroup,
                    hide=_paths_to_hide(cfg, python) if isolation == "denylist" else [],
                    root=_root_plan(cfg, python) if isolation == "allowlist" else None,
                )
            except SandboxUnavailableError as err:  # this interpreter's files: another one may do
                errors.append(str(err))
                continue
            try:
                slot = _Slot(probe_cfg, mode, 0)
            except SandboxUnavailableError as err:
                errors.append(str(err))
                setup_failed = True
                break  # the namespaces or the root themselves failed: another interpreter will not help
            try:
                results = slot.run(self._PROBE_PROGRAM, ["2 3\n"], None)
            finally:
                slot.close()
            if results and results[0].ok and results[0].stdout.strip() == "5":
                mode.notes = dict(slot.notes)
                if uid_note:
                    mode.notes["uid"] = uid_note
                self._warn_about(mode, cgroup_note)
                return mode
            errors.append(f"{python}: {_why_probe_failed(results)}")
        if cgroup:
            _remove_cgroup(cgroup)
        if setup_failed and isolation != "none":
            weaker = {
                "allowlist": "denylist to use the host's file system, read-only, minus the trainer's directories",
                "denylist": "none to run without namespaces (no network or file-system isolation)",
            }[isolation]
            advice = f". Run as root or enable unprivileged user namespaces, or set isolation={weaker}"
        else:
            advice = ". Set `python` to an interpreter the sandbox user can run"
        raise SandboxUnavailableError(f"no working code sandbox (isolation={isolation}): " + "; ".join(errors) + advice)

    @staticmethod
    def _warn_about(mode: _Mode, cgroup_note: str | None = None) -> None:
        if mode.isolation == "none":
            warnings.warn(
                "code sandbox: programs run WITHOUT network and file-system isolation (isolation=none)",
                RuntimeWarning,
                stacklevel=4,
            )
        elif mode.isolation == "denylist":
            warnings.warn(
                "code sandbox: programs see the host's file system read-only, minus the trainer's working directory, "
                "$HOME and hide_paths, not an allow-list root (isolation=denylist)",
                RuntimeWarning,
                stacklevel=4,
            )
        if mode.userns and mode.isolation == "denylist":
            warnings.warn(
                "code sandbox: not root, so programs run as the trainer's own uid inside a user namespace and can read "
                "any file the trainer can read that is not hidden",
                RuntimeWarning,
                stacklevel=4,
            )
        for key, value in mode.notes.items():
            if value is not True:
                warnings.warn(f"code sandbox: {key}: {value}", RuntimeWarning, stacklevel=4)
        if cgroup_note and cgroup_note not in _CGROUP_LOGGED:
            _CGROUP_LOGGED.add(cgroup_note)
            logger.warning(
                "code sandbox: %s; each program keeps its per-process limits (RLIMIT_AS, RLIMIT_NPROC, "
                "RLIMIT_CPU) but its slot has no memory.max, pids.max or cpu.max",
                cgroup_note,
            )

    # -- running ------------------------------------------------------------------------------------------------
    def run(
        self, program: str, inputs: Sequence[str], keep_going: Callable[[int, RunResult], bool] | None = None
    ) -> list[RunResult]:
        """Run ``program`` once per input (each in a fresh working directory); one result per input run.

        ``keep_going(i, result)`` is called as each result arrives; returning False stops the call (the remaining
        inputs are not run and get no result). Sandbox failures become results with ``error`` set.
        """
        pool = self._pool()
        if not inputs:
            return []
        return pool.run(program, list(inputs), keep_going)

    def run_many(
        self, jobs: Sequence[tuple[str, Sequence[str]]], keep_going: Callable[[int, int, RunResult], bool] | None = None
    ) -> list[list[RunResult]]:
        """:meth:`run` for each ``(program, inputs)`` job, ``concurrency`` at a time; ``keep_going(job, i, result)``."""
        self._pool()  # probe once, before the threads

        def one(j: int) -> list[RunResult]:
            program, inputs = jobs[j]
            stop = None if keep_going is None else (lambda i, r: keep_going(j, i, r))
            return self.run(program, inputs, stop)

        with ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="k15-sandbox") as pool:
            return list(pool.map(one, range(len(jobs))))

    def close(self) -> None:
        """Stop this process's slots for this configuration (they restart on the next run)."""
        with _POOLS_LOCK:
            pool = _POOLS.get(self._key())
        if pool is not None:
            pool.close()
