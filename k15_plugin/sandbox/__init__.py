"""A sandbox for untrusted programs written by the policy (paper section 2.6, "code sandbox" for coding rewards).

k1.5 scores coding problems by running the model's program on test cases in a sandbox. During RL the policy writes
thousands of programs per step, and some of them will fork-bomb, allocate without bound, loop forever, print without
end, poke the network, or look around the file system for the expected answers. This package runs each program so
that none of that reaches the trainer, and many of them in parallel.

**Slots.** ``concurrency`` slots run programs side by side. Each slot is a long-lived *launcher*
(:mod:`k15_plugin.sandbox.launcher`, run by path with ``python -I -S``, so it imports nothing but the standard
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
process gets its own uid (:func:`~k15_plugin.sandbox.runner.uid_base` ``+ slot``) and one fork bomb cannot starve
its neighbours, not even those of another rank of the same job on the same machine.

Nothing falls back silently: ``isolation`` is the isolation the caller gets or an error. Where the allow-list root
cannot be built (no ``CAP_SYS_ADMIN`` and no unprivileged user namespaces, say), the default raises
:class:`SandboxUnavailableError` with one line saying what failed and which setting accepts weaker isolation:
``denylist`` (the read-only host file system) or ``none`` (no namespaces at all: resource limits, a new session, a
scrubbed environment, a temporary working directory and, as root, the unprivileged uid; the network and the host's
file system stay reachable). Both warn once when chosen.

The package: :mod:`~k15_plugin.sandbox.config` (:class:`SandboxConfig`, :class:`RunResult`, the errors),
:mod:`~k15_plugin.sandbox.root` (the allow-list root's plan and the cgroups, decided in the trainer),
:mod:`~k15_plugin.sandbox.runner` (:class:`Sandbox`, the probe, the slots) and :mod:`~k15_plugin.sandbox.launcher`
(the standard-library-only script each slot runs).
"""

from k15_plugin.sandbox.config import RunResult, SandboxConfig, SandboxUnavailableError
from k15_plugin.sandbox.runner import Sandbox

__all__ = ["RunResult", "Sandbox", "SandboxConfig", "SandboxUnavailableError"]
