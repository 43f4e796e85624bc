"""The sandbox's runner: the :class:`Sandbox` facade, the probe that picks the mode, and the pool of slots.

Each slot is one launcher process (:mod:`~k15_plugin.sandbox.launcher`, started by path with ``python -I -S``) that
this module feeds programs and inputs and reads results from; :class:`Sandbox` probes once per process and
configuration which isolation works (with the root and cgroups of :mod:`~k15_plugin.sandbox.root`), then hands jobs
to a pool of those slots. The design as a whole is described in :mod:`k15_plugin.sandbox`.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

from k15_plugin.sandbox import launcher
from k15_plugin.sandbox.config import RunResult, SandboxConfig, SandboxUnavailableError
from k15_plugin.sandbox.launcher import SETUP_FAILED
from k15_plugin.sandbox.root import (
    _CGROUP_LOGGED,
    _ENV,
    _cgroup_parent,
    _etc_files,
    _paths_to_hide,
    _python_candidates,
    _remove_cgroup,
    _root_plan,
    _slot_cgroup,
)

# Dedicated uids for the sandbox slots when the trainer is root: an unnamed range no account or system service uses,
# so RLIMIT_NPROC counts each slot alone and a leftover process can be told apart from everything else on the host.
DEFAULT_UID_BASE = 2_000_000_000
_UIDS_PER_PROCESS = 256  # slots beyond that share uids (modulo)

logger = logging.getLogger(__name__)


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
    return [sys.executable, "-I", "-S", os.path.abspath(launcher.__file__)]


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
