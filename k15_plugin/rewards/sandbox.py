"""A sandbox for untrusted programs written by the policy (paper section 2.6, "code sandbox" for coding rewards).

k1.5 scores coding problems by running the model's program on test cases in a sandbox. During RL the policy writes
thousands of programs per step, and some of them will fork-bomb, allocate without bound, loop forever, print without
end, poke the network or the file system, or try to read the answers. This module runs each program so that none of
that reaches the trainer, and a batch of them in parallel.

One call runs one program on a list of stdin inputs. It starts a *launcher* (this file, run by path with
``python -I -S``, so it imports nothing but the standard library) in a new session; on Linux the launcher

1. enters new mount, network, PID, IPC and UTS namespaces (as root; otherwise inside a new user namespace as well):
   the network namespace has only a loopback that is down, so no connection goes anywhere, not even to
   127.0.0.1; the PID namespace makes its first process (*init*, the launcher's child) the reaper of every process
   the program starts, and when init exits the kernel kills whatever is left, daemons included;
2. makes every mount read-only (``mount_setattr(AT_RECURSIVE)``, Linux >= 5.12), puts empty private tmpfs over
   ``/tmp``, ``/var/tmp`` and ``/dev/shm``, hides the trainer's working directory, ``$HOME`` and ``hide_paths`` under
   empty read-only tmpfs, and mounts a fresh ``/proc`` that shows only the sandbox's own processes (so not the
   trainer's environment variables either);
3. for each input: writes the program into a fresh working directory inside that tmpfs, forks the program with
   stdin = the input (an in-memory file: the expected outputs are never written anywhere it can see), resource
   limits (``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NPROC``, ``RLIMIT_NOFILE``, ``RLIMIT_FSIZE``, no core files),
   ``no_new_privs``, an environment with nothing but a minimal ``PATH``, ``HOME`` = the working directory and a
   locale, and -- when the trainer is root -- a dedicated unprivileged uid (``setgroups([])``, ``setgid``,
   ``setuid``, after the namespaces were made); it reads stdout up to ``max_output_bytes`` and kills everything in
   the namespace (``kill(-1, SIGKILL)`` from init) on a wall-clock timeout, on overflow, and after every run.

The trainer side streams one JSON line per input back and kills the launcher's process group (``killpg``) if the
whole call overruns; that kills init, and with it the namespace. ``RLIMIT_NPROC`` counts processes per real uid, so
each concurrent slot gets its own uid (``uid_base + slot``) and one fork bomb cannot starve its neighbours.

Where namespaces are not available (no ``CAP_SYS_ADMIN`` and no unprivileged user namespaces), ``network_isolation``
decides: ``require`` (default) raises :class:`SandboxUnavailableError`; ``best_effort`` warns once and runs with the
resource limits, a new session, a scrubbed environment, a temporary working directory and (as root) the
unprivileged uid, but with the network and the file system of the host. It never runs silently without them.
"""

from __future__ import annotations

# The launcher (this file run as a script) needs only these; keep them few, they are paid on every program run.
import ctypes
import json
import os
import resource
import selectors
import signal
import sys
import time

NETWORK_ISOLATION = ("require", "best_effort")
# Dedicated uids for the sandbox slots when the trainer is root: an unnamed range no account or system service uses,
# so RLIMIT_NPROC counts each slot alone and a leftover process can be told apart from everything else on the host.
DEFAULT_UID_BASE = 2_000_000_000
SETUP_FAILED = 120  # launcher exit status: the sandbox could not be built (message on stderr)
_WORKDIR = "/tmp/sandbox"
_PROGRAM = "main.py"
_MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
# Never hidden even if they are the trainer's working directory or home: the program's interpreter needs them.
_SYSTEM_DIRS = ("/", "/usr", "/bin", "/lib", "/lib64", "/etc", "/proc", "/dev", "/sys", "/tmp", "/var")

# Linux constants (include/uapi/linux/sched.h, mount.h, prctl.h).
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, SYS_MOUNT_SETATTR = -100, 0x8000, 0x1, 442
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

# ----------------------------------------------------------------------------------------------------------------------
# Launcher side: runs as `python -I -S sandbox.py`, standard library only
# ----------------------------------------------------------------------------------------------------------------------


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(libc, option: int, value: int) -> None:
    zero = ctypes.c_ulong(0)  # prctl is variadic: unused arguments must be zero as unsigned longs
    _check(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero), f"prctl({option})")


def _setup_failed(message: str) -> None:
    os.write(2, f"k15 sandbox setup failed: {message}\n".encode())
    os._exit(SETUP_FAILED)


def _launcher_main() -> None:
    spec = json.loads(sys.stdin.buffer.read())
    os.close(0)
    if not spec["namespaces"]:
        _init_main(spec, None)
        return
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    try:
        if spec["userns"]:
            _check(libc.unshare(CLONE_NEWUSER | flags), "unshare(user, mount, net, pid, ipc, uts namespaces)")
            # Map the trainer's uid to 1000, not 0: the program's execve then drops every capability, while this
            # process (the namespace's creator) keeps them until then to set up the mounts.
            for name, text in (("uid_map", f"1000 {uid} 1"), ("setgroups", "deny"), ("gid_map", f"1000 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        else:
            _check(libc.unshare(flags), "unshare(mount, net, pid, ipc, uts namespaces)")
    except OSError as err:
        _setup_failed(str(err))
    pid = os.fork()
    if pid == 0:
        _init_main(spec, libc)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _mount(libc, source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    encoded_fstype = fstype.encode() if fstype else None
    encoded_data = data.encode() if data else None
    result = libc.mount(source.encode(), target.encode(), encoded_fstype, ctypes.c_ulong(flags), encoded_data)
    _check(result, f"mount {fstype or source} on {target}")


def _setup_mounts(spec: dict, libc) -> dict:
    """Inside the new namespaces, before any program runs; returns notes on what could not be done."""
    notes: dict = {}
    _mount(libc, "none", "/", None, MS_REC | MS_PRIVATE, None)  # nothing we mount may propagate to the host
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)  # struct mount_attr: attr_set, attr_clr, ...
    # syscall() is variadic: every argument gets its exact C type, or the kernel may read garbage in the upper bits.
    args = (ctypes.c_int(AT_FDCWD), b"/", ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(32))
    if libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), *args) != 0:
        notes["read_only_root"] = f"mount_setattr failed ({os.strerror(ctypes.get_errno())}); host mounts stay writable"
    for path in spec["hide"]:
        if os.path.isdir(path):
            _mount(libc, "tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
        else:
            _mount(libc, "/dev/null", path, None, MS_BIND, None)
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            _mount(libc, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['tmpfs_mb']}m,mode=1777")
    try:
        _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    except OSError as err:  # e.g. a container's masked /proc inside a user namespace: hide /proc rather than leak it
        _mount(libc, "tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
        notes["proc"] = f"fresh /proc not mountable ({err.strerror}); /proc is empty in the sandbox"
    return notes


def _fresh_workdir(spec: dict, workdir: str, uid: int | None) -> None:
    if spec["namespaces"]:  # wipe everything a previous run left in the private tmpfs mounts
        for root in ("/tmp", "/var/tmp", "/dev/shm"):
            if os.path.isdir(root):
                for name in os.listdir(root):
                    _remove(os.path.join(root, name))
    elif os.path.exists(workdir):
        _remove(workdir)
    os.mkdir(workdir, 0o700)
    path = os.path.join(workdir, _PROGRAM)
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(spec["program"])
    os.chmod(path, 0o644)
    if uid is not None:
        os.chown(workdir, uid, uid)


def _remove(path: str) -> None:
    """``rm -rf path`` without shutil: after the mounts, the launcher's own standard library may be hidden."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            with os.scandir(path) as entries:
                for entry in entries:
                    _remove(entry.path)
            os.rmdir(path)
        else:
            os.unlink(path)
    except OSError:
        pass


def _init_main(spec: dict, libc) -> None:
    """Init of the PID namespace (or, without namespaces, the launcher itself): runs the program once per input."""
    libc = libc or _libc()
    uid = spec["uid"]
    notes: dict = {}
    try:
        if spec["namespaces"]:
            notes = _setup_mounts(spec, libc)
            workdir = _WORKDIR
        else:
            import tempfile

            workdir = tempfile.mkdtemp(prefix="k15_sandbox_")
            os.rmdir(workdir)
    except OSError as err:
        _setup_failed(str(err))
    out = os.fdopen(1, "wb", buffering=0)
    out.write(json.dumps({"setup": notes}).encode() + b"\n")
    try:
        for text in spec["inputs"]:
            _fresh_workdir(spec, workdir, uid)
            record = _run_program(spec, workdir, text.encode(errors="surrogatepass"), libc)
            _kill_leftovers(spec, record.pop("pid"))
            out.write(json.dumps(record).encode() + b"\n")
    finally:
        if not spec["namespaces"]:
            _remove(workdir)


def _run_program(spec: dict, workdir: str, stdin: bytes, libc) -> dict:
    memfd = os.memfd_create("k15-stdin", 0)  # stdin as an in-memory file: no writer thread, no pipe deadlock
    view = memoryview(stdin)
    while view:
        view = view[os.write(memfd, view) :]
    os.lseek(memfd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _exec_program(spec, workdir, memfd, out_w, err_w, libc)
    for fd in (memfd, out_w, err_w):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ, "out")
    sel.register(err_r, selectors.EVENT_READ, "err")
    sel.register(pidfd, selectors.EVENT_READ, "exit")
    stdout, stderr = bytearray(), bytearray()
    timed_out = overflow = exited = False
    deadline = start + spec["timeout"]
    limit = spec["max_output"]
    while not exited:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        for key, _ in sel.select(timeout=remaining):
            if key.data == "exit":
                exited = True
                continue
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                sel.unregister(key.fd)
                continue
            if key.data == "out":
                stdout += chunk
            else:
                stderr = (stderr + chunk)[-2048:]
        if len(stdout) > limit:
            overflow = True
            break
    if exited:  # what the program wrote before it exited is in the pipe now; a daemon may still hold it open
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            try:
                while chunk := os.read(fd, 1 << 16):
                    if fd == out_r:
                        stdout += chunk
                        if len(stdout) > limit:
                            overflow = True
                            break
                    else:
                        stderr = (stderr + chunk)[-2048:]
            except BlockingIOError:
                pass
    sel.close()
    for fd in (out_r, err_r, pidfd):
        os.close(fd)
    if not exited:
        _kill_program(spec, pid)
    _, status = os.waitpid(pid, 0)
    return {
        "pid": pid,
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "timed_out": timed_out,
        "overflow": overflow,
        "stdout": bytes(stdout[:limit]).decode("latin-1"),
        "stderr": bytes(stderr).decode(errors="replace"),
        "seconds": round(time.monotonic() - start, 4),
    }


def _exec_program(spec: dict, workdir: str, memfd: int, out_w: int, err_w: int, libc) -> None:
    """In the forked child: wire stdio, set limits, drop privileges, exec the interpreter. Never returns."""
    try:
        os.dup2(memfd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 1 << 16)
        os.setpgid(0, 0)  # its own process group, so the fallback without namespaces can killpg it
        os.chdir(workdir)
        cpu = spec["cpu"]
        for limit, value in (
            (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at the soft limit, SIGKILL one second later
            (resource.RLIMIT_AS, (spec["memory"],) * 2),
            (resource.RLIMIT_NPROC, (spec["nproc"],) * 2),
            (resource.RLIMIT_NOFILE, (spec["nofile"],) * 2),
            (resource.RLIMIT_FSIZE, (spec["fsize"],) * 2),
            (resource.RLIMIT_CORE, (0, 0)),
        ):
            resource.setrlimit(limit, value)
        _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary can give privileges back
        uid = spec["uid"]
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        env = {"PATH": _MINIMAL_PATH, "HOME": workdir, "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
        python = spec["python"]
        os.execve(python[0], [*python, _PROGRAM], env)
    except BaseException as err:  # report anything, then leave without running the launcher's cleanup
        try:
            os.write(2, f"k15 sandbox: cannot start the program: {err!r}\n".encode())
        finally:
            os._exit(127)


def _kill_all_in_namespace() -> None:
    try:
        os.kill(-1, signal.SIGKILL)  # from init of a PID namespace: every process in it except init itself
    except ProcessLookupError:  # nothing left
        pass


def _kill_program(spec: dict, pid: int) -> None:
    if spec["namespaces"]:
        _kill_all_in_namespace()
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_leftovers(spec: dict, pid: int) -> None:
    """After each run: nothing the program started may outlive it (daemons, processes that left its group)."""
    if spec["namespaces"]:
        _kill_all_in_namespace()
        while True:  # orphans were reparented to us (init): reap them all
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if spec["uid"] is not None and spec["uid_is_dedicated"]:
        killer = os.fork()  # "kill -9 -1" as the slot's own uid reaches exactly its processes
        if killer == 0:
            try:
                os.setgid(spec["uid"])
                os.setuid(spec["uid"])
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os._exit(0)
        os.waitpid(killer, 0)


if __name__ == "__main__":
    _launcher_main()
    sys.exit(0)

# ----------------------------------------------------------------------------------------------------------------------
# Trainer side (the launcher never gets here: importing what follows would double its start-up time)
# ----------------------------------------------------------------------------------------------------------------------

import math  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402


class SandboxUnavailableError(RuntimeError):
    """The sandbox cannot give the isolation the configuration requires (e.g. no network namespace)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of one program run. Every field has a default; ``Sandbox(SandboxConfig(...))``.

    Attributes:
        timeout_seconds: wall-clock limit per input (the program is killed, the run fails).
        cpu_seconds: ``RLIMIT_CPU`` per process; None: ``ceil(timeout_seconds) + 1``.
        memory_mb: ``RLIMIT_AS`` (address space) per process, in MiB. Per process, not per sandbox: without cgroups
            a program's worst case is ``max_processes * memory_mb`` (16 GiB at the defaults) per concurrent slot.
        max_processes: ``RLIMIT_NPROC``: processes and threads of the sandbox uid (the program counts as one).
        max_open_files: ``RLIMIT_NOFILE``.
        max_file_mb: ``RLIMIT_FSIZE``: largest file the program may write, in MiB.
        tmpfs_mb: size of each private tmpfs (``/tmp``, ``/var/tmp``, ``/dev/shm``), in MiB.
        max_output_bytes: stdout kept per run; a program that prints more is killed and fails.
        concurrency: programs run at once by :meth:`Sandbox.run_many`; 0: ``os.cpu_count()``.
        network_isolation: ``require`` (raise when the sandbox cannot cut the network) or ``best_effort`` (warn
            once and run without namespaces).
        uid: the uid every slot runs as when the trainer is root; None: ``DEFAULT_UID_BASE + slot`` (one uid per
            slot; falls back to 65534 = nobody if that range is not mapped in this user namespace).
        python: the interpreter that runs programs; None: the first of the trainer's base interpreter,
            ``/usr/local/bin/python3`` and ``/usr/bin/python3`` that works inside the sandbox (found by a probe).
        python_args: interpreter flags (``-I``: isolated mode, ignores ``PYTHON*`` variables and user site-packages).
        hide_paths: more host paths to hide (besides the trainer's working directory and ``$HOME``), e.g. the
            directory of the dataset with the test answers.
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
    network_isolation: str = "require"
    uid: int | None = None
    python: str | None = None
    python_args: tuple[str, ...] = ("-I",)
    hide_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        positive = ("timeout_seconds", "memory_mb", "max_processes", "max_open_files", "max_file_mb", "tmpfs_mb",
                    "max_output_bytes")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if self.cpu_seconds is not None and self.cpu_seconds < 1:
            raise ValueError(f"cpu_seconds must be None or an integer >= 1, got {self.cpu_seconds!r}")
        if self.concurrency < 0:
            raise ValueError(f"concurrency must be >= 0 (0: os.cpu_count()), got {self.concurrency!r}")
        if self.network_isolation not in NETWORK_ISOLATION:
            raise ValueError(
                f"network_isolation must be one of {list(NETWORK_ISOLATION)}, got {self.network_isolation!r}"
            )
        object.__setattr__(self, "python_args", tuple(self.python_args))
        object.__setattr__(self, "hide_paths", tuple(str(p) for p in self.hide_paths))

    @property
    def workers(self) -> int:
        return self.concurrency or os.cpu_count() or 1


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

    namespaces: bool
    userns: bool
    drop_uid: bool
    uid_base: int | None  # None: the one configured uid for every slot
    python: str
    hide: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


_MODES: dict[tuple, _Mode] = {}
_MODES_LOCK = threading.Lock()


def _uid_range_mapped(start: int, count: int) -> bool:
    """Whether uids ``start .. start+count-1`` exist in this user namespace (containers often map only 65536)."""
    try:
        with open("/proc/self/uid_map") as f:
            rows = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except OSError:
        return False
    return any(inside <= start and start + count <= inside + length for inside, _, length in rows)


def _launcher_command() -> list[str]:
    """This file as a script: ``-I`` keeps ``PYTHON*`` variables and the script's directory out, ``-S`` skips site."""
    return [sys.executable, "-I", "-S", os.path.abspath(__file__)]


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
        if prefix == path or prefix.startswith(path.rstrip("/") + "/"):
            continue  # hiding it would hide the interpreter
        hide.append(path)
    return hide


class Sandbox:
    """Runs programs under :class:`SandboxConfig`. Picklable; the isolation mode is probed once per process."""

    def __init__(self, config: SandboxConfig | None = None, **overrides) -> None:
        if config is not None and overrides:
            raise TypeError("pass either a SandboxConfig or keyword overrides, not both")
        self.config = config if config is not None else SandboxConfig(**overrides)

    # -- mode ---------------------------------------------------------------------------------------------------
    def mode(self) -> _Mode:
        """The isolation this process uses (probes on first call; raises :class:`SandboxUnavailableError`)."""
        key = (os.getpid(), json.dumps(asdict(self.config), sort_keys=True, default=str))
        with _MODES_LOCK:
            if key not in _MODES:
                _MODES[key] = self._probe()
            return _MODES[key]

    def _probe(self) -> _Mode:
        cfg = self.config
        is_root = os.geteuid() == 0
        if cfg.uid is not None:
            uid_base, note = None, None
        elif _uid_range_mapped(DEFAULT_UID_BASE, cfg.workers):
            uid_base, note = DEFAULT_UID_BASE, None
        else:
            uid_base, note = None, "uid range not mapped; every slot runs as 65534"
        attempts = [(True, not is_root)]  # (namespaces, user namespace)
        if cfg.network_isolation == "best_effort":
            attempts.append((False, False))
        errors, setup_failed = [], False
        for namespaces, userns in attempts:
            for python in _python_candidates(cfg):
                mode = _Mode(namespaces=namespaces, userns=userns, drop_uid=is_root, uid_base=uid_base,
                             python=python, hide=_paths_to_hide(cfg, python) if namespaces else [])  # fmt: skip
                try:
                    results, notes = self._launch(mode, 0, "import sys\nprint(sum(map(int, sys.stdin.read().split())))",
                                                  ["2 3\n"], None)  # fmt: skip
                except SandboxUnavailableError as err:
                    errors.append(str(err))
                    setup_failed = True
                    break  # the namespaces themselves failed: another interpreter will not help
                if results and results[0].ok and results[0].stdout.strip() == "5":
                    mode.notes = dict(notes)
                    if note:
                        mode.notes["uid"] = note
                    self._warn_about(mode)
                    return mode
                tail = results[0].stderr_tail.strip().splitlines()[-1:] if results else ["no result"]
                errors.append(f"{python}: {results[0].error if results and results[0].error else ' '.join(tail)}")
        if setup_failed and cfg.network_isolation == "require":
            advice = (". Run as root or enable unprivileged user namespaces, or set network_isolation=best_effort to "
                      "run without namespaces (no network or file-system isolation)")  # fmt: skip
        else:
            advice = ". Set `python` to an interpreter the sandbox user can run"
        raise SandboxUnavailableError("no working code sandbox: " + "; ".join(errors) + advice)

    @staticmethod
    def _warn_about(mode: _Mode) -> None:
        if not mode.namespaces:
            warnings.warn(
                "code sandbox: namespaces are unavailable; programs run WITHOUT network and file-system isolation "
                "(network_isolation=best_effort)",
                RuntimeWarning,
                stacklevel=4,
            )
        elif mode.userns:
            warnings.warn(
                "code sandbox: not root, so programs run as the trainer's own uid inside a user namespace (no "
                "network, read-only file system, but they can read files the trainer can read that are not hidden)",
                RuntimeWarning,
                stacklevel=4,
            )
        for key, value in mode.notes.items():
            if value is not True:
                warnings.warn(f"code sandbox: {key}: {value}", RuntimeWarning, stacklevel=4)

    # -- running ------------------------------------------------------------------------------------------------
    def run(self, program: str, inputs: Sequence[str], keep_going: Callable[[int, RunResult], bool] | None = None,
            slot: int = 0) -> list[RunResult]:  # fmt: skip
        """Run ``program`` once per input (each in a fresh working directory); one result per input run.

        ``keep_going(i, result)`` is called as each result arrives; returning False stops the call (the remaining
        inputs are not run and get no result). Sandbox failures become results with ``error`` set.
        """
        mode = self.mode()
        if not inputs:
            return []
        try:
            return self._launch(mode, slot, program, list(inputs), keep_going)[0]
        except SandboxUnavailableError as err:  # a setup failure after a successful probe: report, do not raise
            return [RunResult(exit_code=None, stdout="", error=str(err))]

    def run_many(self, jobs: Sequence[tuple[str, Sequence[str]]],
                 keep_going: Callable[[int, int, RunResult], bool] | None = None) -> list[list[RunResult]]:  # fmt: skip
        """:meth:`run` for each ``(program, inputs)`` job, ``concurrency`` at a time; ``keep_going(job, i, result)``."""
        self.mode()  # probe once, before the threads
        slots: list[int] = list(range(self.config.workers))
        lock = threading.Lock()

        def one(j: int) -> list[RunResult]:
            with lock:
                slot = slots.pop()
            try:
                program, inputs = jobs[j]
                stop = None if keep_going is None else (lambda i, r: keep_going(j, i, r))
                return self.run(program, inputs, stop, slot)
            finally:
                with lock:
                    slots.append(slot)

        with ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="k15-sandbox") as pool:
            return list(pool.map(one, range(len(jobs))))

    def _uid(self, mode: _Mode, slot: int) -> int | None:
        if not mode.drop_uid:
            return None
        if self.config.uid is not None:
            return self.config.uid
        return mode.uid_base + slot if mode.uid_base is not None else 65534

    def _launch(self, mode: _Mode, slot: int, program: str, inputs: list[str],
                keep_going: Callable[[int, RunResult], bool] | None) -> tuple[list[RunResult], dict]:  # fmt: skip
        cfg = self.config
        uid = self._uid(mode, slot)
        spec = {
            "program": program,
            "inputs": inputs,
            "namespaces": mode.namespaces,
            "userns": mode.userns,
            "uid": uid,
            # a dedicated uid may be cleaned up by "kill every process of this uid" (no PID namespace to do it)
            "uid_is_dedicated": uid is not None and self.config.uid is None and mode.uid_base is not None,
            "python": [mode.python, *cfg.python_args],
            "hide": mode.hide,
            "timeout": cfg.timeout_seconds,
            "cpu": cfg.cpu_seconds or math.ceil(cfg.timeout_seconds) + 1,
            "memory": cfg.memory_mb << 20,
            "nproc": cfg.max_processes,
            "nofile": cfg.max_open_files,
            "fsize": cfg.max_file_mb << 20,
            "tmpfs_mb": cfg.tmpfs_mb,
            "max_output": cfg.max_output_bytes,
        }
        payload = json.dumps(spec).encode()
        env = {"PATH": _MINIMAL_PATH, "LANG": "C.UTF-8"}  # the launcher itself sees no trainer secrets either
        proc = subprocess.Popen(
            _launcher_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, env=env, close_fds=True, cwd="/",
        )  # fmt: skip
        results: list[RunResult] = []
        notes: dict = {}
        # The launcher reads the whole spec before it writes anything, so writing first cannot deadlock.
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        deadline = time.monotonic() + 15.0 + len(inputs) * (cfg.timeout_seconds + 2.0)
        buffer = b""
        stderr = b""
        stopped = False
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        try:
            while sel.get_map() and not stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in sel.select(timeout=remaining):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    if key.data == "err":
                        stderr = (stderr + chunk)[-(1 << 14) :]
                        continue
                    buffer += chunk
                    while b"\n" in buffer and not stopped:
                        line, buffer = buffer.split(b"\n", 1)
                        try:
                            record = json.loads(line)
                        except ValueError:
                            stderr += b"\nunreadable launcher output: " + line[:200]
                            continue
                        if "setup" in record:
                            notes = record["setup"]
                            continue
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
                        if keep_going is not None and not keep_going(len(results) - 1, result):
                            stopped = True
        finally:
            sel.close()
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and init: the kernel then empties the namespace
                except ProcessLookupError:
                    pass
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                stream.close()
        message = stderr.decode(errors="replace").strip()
        if proc.returncode == SETUP_FAILED:
            raise SandboxUnavailableError(message.splitlines()[-1] if message else "sandbox setup failed")
        if len(results) < len(inputs) and not stopped:
            why = "overran its time budget" if time.monotonic() >= deadline else f"exited with {proc.returncode}"
            results.append(RunResult(exit_code=None, stdout="", error=f"sandbox {why}: {message[-500:]}"))
        return results, notes
