"""The sandbox's allow-list root file system and its cgroups, as the trainer plans them for the launcher.

Which host files a program's root file system holds (the interpreter, its standard library and shared libraries,
``allow_paths``; ``site-packages`` and the trainer's directories masked), which host paths the deny-list mode hides,
which interpreter to try, and the cgroup v2 leaf each slot joins. All of it is decided in the trainer process and
handed to :mod:`~k15_plugin.sandbox.launcher` as plain data, which builds it; :mod:`~k15_plugin.sandbox.runner` calls
these when it probes and starts slots.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from k15_plugin.sandbox.config import _OWN_TREES, SandboxConfig, SandboxUnavailableError, _under
from k15_plugin.sandbox.launcher import MINIMAL_PATH, WORKDIR

# Never hidden even if they are the trainer's working directory or home: the program's interpreter needs them.
_SYSTEM_DIRS = ("/", "/usr", "/bin", "/lib", "/lib64", "/etc", "/proc", "/dev", "/sys", "/tmp", "/var")


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
    """What the allow-list root holds for ``python``; the launcher builds it (see
    :func:`~k15_plugin.sandbox.launcher._build_root`)."""
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
