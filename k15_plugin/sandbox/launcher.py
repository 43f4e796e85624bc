"""The sandbox's launcher: one slot's process, run as ``python -I -S launcher.py`` (standard library only).

It reads the slot's spec, joins the slot's cgroup, enters the namespaces, builds the file system, then runs the
programs the trainer sends, one after another, each in a fresh working directory (see :mod:`k15_plugin.sandbox` for
the whole design). Nothing here may import more than the standard library's few modules below: they are paid on
every slot start, and after ``pivot_root`` nothing else is importable.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import selectors
import signal
import sys
import time

SETUP_FAILED = 120  # exit status: the sandbox could not be built (message on stderr)
WORKDIR = "/tmp/sandbox"  # the program's working directory (and $HOME) inside the sandbox
MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
_PROGRAM = "main.py"
# Where the allow-list root is assembled before pivot_root (the host's /tmp is covered only in our mount namespace).
_STAGE = "/tmp"
_DEVICES = ("null", "zero", "urandom")

# Linux constants (include/uapi/linux/sched.h, mount.h, prctl.h; arch/*/unistd tables for pivot_root).
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    8192,
    16384,
    1 << 18,
)
MNT_DETACH = 2
AT_FDCWD, AT_RECURSIVE, SYS_MOUNT_SETATTR = -100, 0x8000, 442
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

# ----------------------------------------------------------------------------------------------------------------------
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


def _read_exact(size: int) -> bytes:
    """``size`` bytes of stdin (unbuffered: the launcher and init share fd 0); EOFError when the trainer is gone."""
    data = bytearray()
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def _read_message():
    """One message from the trainer: an 8-byte little-endian length, then that much JSON."""
    return json.loads(_read_exact(int.from_bytes(_read_exact(8), "little")))


def _launcher_main() -> None:
    try:
        spec = _read_message()
    except EOFError:
        os._exit(0)
    if spec["cgroup"]:
        try:
            with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as f:
                f.write("0")  # this process; everything it starts stays in the slot's cgroup
        except OSError as err:
            _setup_failed(f"cannot join cgroup {spec['cgroup']}: {err.strerror}")
    if spec["isolation"] == "none":
        _init_main(spec, None)
        return
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    try:
        if spec["userns"]:
            _check(libc.unshare(CLONE_NEWUSER | flags), "unshare(user, mount, net, pid, ipc, uts, cgroup namespaces)")
            # Map the trainer's uid to 1000, not 0: the program's execve then drops every capability, while this
            # process (the namespace's creator) keeps them until then to set up the mounts.
            for name, text in (("uid_map", f"1000 {uid} 1"), ("setgroups", "deny"), ("gid_map", f"1000 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        else:
            _check(libc.unshare(flags), "unshare(mount, net, pid, ipc, uts, cgroup namespaces)")
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


def _mount_setattr(libc, path: str, attributes: int, recursive: bool) -> int:
    """``mount_setattr(2)`` (Linux >= 5.12): add ``attributes`` to the mount at ``path``; 0 or an errno."""
    attr = (ctypes.c_uint64 * 4)(attributes, 0, 0, 0)  # struct mount_attr: attr_set, attr_clr, propagation, userns
    # syscall() is variadic: every argument gets its exact C type, or the kernel may read garbage in the upper bits.
    args = (
        ctypes.c_int(AT_FDCWD),
        path.encode(),
        ctypes.c_uint(AT_RECURSIVE if recursive else 0),
        ctypes.byref(attr),
        ctypes.c_size_t(32),
    )
    return 0 if libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), *args) == 0 else ctypes.get_errno()


def _read_only(libc, path: str, recursive: bool = True) -> None:
    """Make the mount at ``path`` read-only, nosuid, nodev; raises when the kernel cannot (never left writable)."""
    errno = _mount_setattr(libc, path, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive)
    if errno == 0:
        return
    # Older kernels: a bind remount (fails with EPERM where the mount has flags locked by a user namespace).
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    if libc.mount(b"none", path.encode(), None, ctypes.c_ulong(flags), None) != 0:
        raise OSError(
            errno,
            f"cannot make {path} read-only: mount_setattr: {os.strerror(errno)}, "
            f"remount: {os.strerror(ctypes.get_errno())}",
        )


def _pivot_root(libc, new_root: str) -> None:
    """Make ``new_root`` the root of this mount namespace and detach the host's root from it."""
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    os.chdir(new_root)
    if number is not None:
        _check(libc.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")  # the old root now sits on top of "."
        _check(libc.umount2(b".", ctypes.c_int(MNT_DETACH)), "umount the host root")
    else:  # no syscall number known: move the new root over "/" and chroot into it (what switch_root does)
        _check(libc.mount(b".", b"/", None, ctypes.c_ulong(MS_MOVE), None), "move the new root to /")
        _check(libc.chroot(b"."), "chroot")
    os.chdir("/")


def _build_root(spec: dict, libc) -> dict:
    """``isolation="allowlist"``: a new root from the trainer's plan; the host's root is gone afterwards."""
    notes: dict = {}
    plan = spec["root"]
    _mount(libc, "none", "/", None, MS_REC | MS_PRIVATE, None)  # nothing we mount may propagate to the host
    new = _STAGE
    _mount(libc, "tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for op in plan["ops"]:
        kind, path = op[0], new + op[1]
        if kind == "dir":
            os.makedirs(path, 0o755, exist_ok=True)
        elif kind == "symlink":
            os.symlink(op[2], path)
        elif kind == "bind":
            _mount_point(path, op[2])
            _mount(libc, op[1], path, None, MS_BIND | MS_REC, None)
            _read_only(libc, path)
        elif kind == "mask":  # an allowed directory's part that stays out (site-packages, the trainer's files)
            _mount(libc, "tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
        elif kind == "file":
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            with open(path, "w") as f:
                f.write(op[2])
            os.chmod(path, 0o644)
    os.makedirs(new + "/dev/shm", 0o755)
    for name in _DEVICES:
        _mount_point(new + "/dev/" + name, False)
        _mount(libc, "/dev/" + name, new + "/dev/" + name, None, MS_BIND, None)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{new}/dev/{name}")
    for path in ("/tmp", "/dev/shm"):
        os.makedirs(new + path, 0o755, exist_ok=True)
        _mount(libc, "tmpfs", new + path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['tmpfs_mb']}m,mode=1777")
    os.mkdir(new + "/proc", 0o555)
    try:  # before pivot_root: the kernel lets a user namespace mount proc only while a full proc is visible
        _mount_proc(libc, new + "/proc")
    except OSError as err:  # e.g. a container's masked /proc inside a user namespace: an empty /proc, not the host's
        notes["proc"] = f"fresh /proc not mountable ({err.strerror}); /proc is empty in the sandbox"
    _pivot_root(libc, new)
    _read_only(libc, "/", recursive=False)  # the root tmpfs; /tmp and /dev/shm are mounts of their own
    return notes


def _mount_proc(libc, target: str) -> None:
    """A /proc of this PID namespace that, where the kernel can (>= 5.8), shows the program only its own uid's
    processes (as root, not init's command line either)."""
    for options in ("hidepid=invisible", "hidepid=2", None):
        try:
            _mount(libc, "proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, options)
            return
        except OSError:
            if options is None:
                raise


def _mount_point(path: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(path, 0o755, exist_ok=True)
    elif not os.path.exists(path):
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def _setup_mounts(spec: dict, libc) -> dict:
    """``isolation="denylist"``: the host's file system, read-only, minus the hidden paths."""
    notes: dict = {}
    _mount(libc, "none", "/", None, MS_REC | MS_PRIVATE, None)  # nothing we mount may propagate to the host
    errno = _mount_setattr(libc, "/", MOUNT_ATTR_RDONLY, recursive=True)
    if errno:
        notes["read_only_root"] = f"mount_setattr failed ({os.strerror(errno)}); host mounts stay writable"
    for path in spec["hide"]:
        if os.path.isdir(path):
            _mount(libc, "tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
        else:
            _mount(libc, "/dev/null", path, None, MS_BIND, None)
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            _mount(libc, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['tmpfs_mb']}m,mode=1777")
    try:
        _mount_proc(libc, "/proc")
    except OSError as err:  # e.g. a container's masked /proc inside a user namespace: hide /proc rather than leak it
        _mount(libc, "tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
        notes["proc"] = f"fresh /proc not mountable ({err.strerror}); /proc is empty in the sandbox"
    return notes


def _fresh_workdir(spec: dict, program: str, workdir: str, uid: int | None) -> None:
    if spec["isolation"] != "none":  # wipe everything a previous run left in the private tmpfs mounts
        for root in ("/tmp", "/var/tmp", "/dev/shm"):
            if os.path.isdir(root):
                for name in os.listdir(root):
                    _remove(os.path.join(root, name))
    elif os.path.exists(workdir):
        _remove(workdir)
    os.mkdir(workdir, 0o700)
    path = os.path.join(workdir, _PROGRAM)
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(program)
    os.chmod(path, 0o644)
    if uid is not None:
        os.chown(workdir, uid, uid)


def _remove(path: str) -> None:
    """``rm -rf path`` without shutil: after the mounts, the launcher's own standard library may be gone."""
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
    """Init of the PID namespace (or, without namespaces, the launcher itself): runs jobs until stdin closes.

    A job is ``{"program", "inputs"}``; after each input's result but the last, one byte from the trainer says
    whether to go on (``n``) or stop the job (``s``).
    """
    libc = libc or _libc()
    uid = spec["uid"]
    notes: dict = {}
    try:
        if spec["isolation"] == "allowlist":
            notes = _build_root(spec, libc)
        elif spec["isolation"] == "denylist":
            notes = _setup_mounts(spec, libc)
        if spec["isolation"] == "none":
            import tempfile

            workdir = tempfile.mkdtemp(prefix="k15_sandbox_")
            os.rmdir(workdir)
        else:
            workdir = WORKDIR
            _check(libc.sethostname(b"sandbox", ctypes.c_size_t(7)), "sethostname")  # not the host's name
    except OSError as err:
        _setup_failed(str(err))
    out = os.fdopen(1, "wb", buffering=0)
    out.write(json.dumps({"setup": notes}).encode() + b"\n")
    try:
        while True:
            job = _read_message()
            inputs = job["inputs"]
            for i, text in enumerate(inputs):
                _fresh_workdir(spec, job["program"], workdir, uid)
                record = _run_program(spec, workdir, text.encode(errors="surrogatepass"), libc)
                _kill_leftovers(spec, record.pop("pid"))
                out.write(json.dumps(record).encode() + b"\n")
                if i + 1 < len(inputs) and _read_exact(1) != b"n":
                    break
    except EOFError:  # the trainer closed the slot (or died)
        pass
    finally:
        if spec["isolation"] == "none":
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
        try:  # the first the OOM killer picks when the slot's cgroup runs out of memory, not the slot's init
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary can give privileges back
        uid = spec["uid"]
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        env = {"PATH": MINIMAL_PATH, "HOME": workdir, "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
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
    if spec["isolation"] != "none":
        _kill_all_in_namespace()
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_leftovers(spec: dict, pid: int) -> None:
    """After each run: nothing the program started may outlive it (daemons, processes that left its group)."""
    if spec["isolation"] != "none":
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
