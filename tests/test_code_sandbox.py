"""The sandboxed code reward (paper sections 2.3 and 2.6): scoring, and a corpus of hostile programs it must contain.

Every hostile program below prints ``PASS`` only if its attack worked, and its test case expects ``PASS``: a reward
of 0 means the attack failed. Each runs next to an innocent program in the same batch, which must still pass (one
program's fork bomb must not starve its neighbours), and the host-side effect is checked separately (canary files,
listener, leftover processes, the secret in the output).
"""

import contextlib
import json
import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from k15_plugin.rewards import CodeReward, Sandbox, SandboxConfig, SandboxUnavailableError, get_code_reward
from k15_plugin.rewards.code import extract_program, normalize_output, parse_tests
from k15_plugin.sandbox.runner import uid_base

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox uses Linux namespaces")

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}, {"input": "0 0", "output": "0"}]
PASS_TEST = [{"input": "", "output": "PASS"}]
INNOCENT = "print('PASS')\n"


def fenced(program: str) -> str:
    return f"Here is my solution.\n```python\n{program}```\n"


@pytest.fixture(scope="module")
def reward() -> CodeReward:
    return get_code_reward(timeout_seconds=2.0, concurrency=2)


def _sandbox_processes(marker: str | None = None) -> list[str]:
    """Processes of this process's sandbox uids, or whose command line carries ``marker``, still alive on the host."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            uid = int((entry / "status").read_text().split("\nUid:")[1].split()[0])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if uid_base() <= uid < uid_base() + 256 or (marker and marker in cmdline):
            found.append(f"{entry.name} uid={uid} {cmdline[:80]}")
    return found


def _score_with_neighbour(reward, hostile: str, tests=PASS_TEST) -> float:
    rewards = reward([fenced(hostile), fenced(INNOCENT)], tests=[tests, PASS_TEST])
    assert rewards[1] == 1.0, "an innocent program in the same batch must still pass"
    return rewards[0]


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


def test_program_extraction():
    assert extract_program("```python\nprint(1)\n```") == "print(1)\n"
    assert extract_program("a\n```\nx=1\n```\nb\n```py\nprint(2)\n```\nthanks") == "print(2)\n"  # the last block
    assert extract_program("print(3)") == "print(3)"  # no fence: the whole completion
    assert extract_program("```python\nprint(4)\n") == "print(4)\n"  # unclosed: ran out of tokens
    assert extract_program("```python\nprint(5)\n```\n```text\noutput\n```") == "print(5)\n"  # other languages skipped
    assert extract_program("```cpp\nint main(){}\n```") is None
    assert extract_program([{"role": "assistant", "content": "```python\nprint(6)\n```"}]) == "print(6)\n"
    assert extract_program("") is None and extract_program(None) is None


def test_output_comparison_and_test_formats():
    assert normalize_output("1 2  \r\n3\n\n\n") == normalize_output("1 2\n3") == "1 2\n3"
    assert normalize_output(" 1") != normalize_output("1")  # leading whitespace counts
    assert parse_tests('[{"input": "1", "output": "2"}]') == [("1", "2")]
    assert parse_tests({"inputs": ["1", "2"], "outputs": ["3", "4"]}) == [("1", "3"), ("2", "4")]
    for bad in ([], "not json", [{"input": 1}], None, 7):
        with pytest.raises((ValueError, TypeError)):
            parse_tests(bad)


def test_correct_incorrect_and_partial_credit(reward):
    completions = [
        fenced(ADD),  # right
        fenced("print(3)\n"),  # right on the first test only
        fenced("a, b = map(int, input().split())\nprint(a - b)\n"),  # right only when b == 0
        "import sys\nprint(sum(map(int, sys.stdin.read().split())))",  # right, unfenced
        [{"role": "assistant", "content": fenced(ADD)}],  # chat completion
        fenced("raise ValueError('boom')\n"),  # crashes
        fenced("print(1 +)\n"),  # does not parse
        None,  # garbage
        "```cpp\nint main() { return 0; }\n```",  # not Python
    ]
    got = reward(completions, tests=[ADD_TESTS] * len(completions))
    assert got == pytest.approx([1.0, 1 / 3, 1 / 3, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    strict = get_code_reward(partial_credit=False, timeout_seconds=2.0)
    assert strict(completions[:3], tests=[ADD_TESTS] * 3) == [1.0, 0.0, 0.0]


def test_exit_status_must_be_zero_and_output_flushed(reward):
    games = [
        "print(3)\nimport sys\nsys.exit(1)\n",  # right output, failing status
        "import sys\nsys.exit(0)\nprint(3)\n",  # exits 0 before printing
        "import os, sys\nsys.stdout.write('3\\n')\nos._exit(0)\n",  # _exit skips the flush of a piped stdout
        "import os\nos.close(1)\n",  # closes stdout, exits 0
        "import os, signal\nprint(3, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n",  # right output, then killed
    ]
    tests = [[{"input": "", "output": "3"}]] * len(games)
    assert reward([fenced(g) for g in games], tests=tests) == [0.0] * len(games)


def test_garbage_tests_score_zero_and_missing_column_raises(reward):
    assert reward([fenced(ADD), fenced(ADD)], tests=["not json", []]) == [0.0, 0.0]
    with pytest.raises(TypeError, match="tests"):
        reward([fenced(ADD)])


def test_pickle_round_trip(reward):
    clone = pickle.loads(pickle.dumps(reward))
    assert clone.__name__ == "code_tests" and clone.sandbox_config == reward.sandbox_config
    assert clone([fenced(ADD)], tests=[ADD_TESTS]) == [1.0]


def test_config_is_validated():
    with pytest.raises(ValueError, match="timeout_seconds"):
        SandboxConfig(timeout_seconds=0)
    with pytest.raises(ValueError, match="isolation"):
        SandboxConfig(isolation="off")
    with pytest.raises(ValueError, match="cgroup"):
        SandboxConfig(cgroup="maybe")
    with pytest.raises(ValueError, match="allow_paths: relative is not an absolute path"):
        SandboxConfig(allow_paths=["relative"])
    with pytest.raises(ValueError, match="allow_paths: /nonexistent/k15 does not exist"):
        SandboxConfig(allow_paths=["/nonexistent/k15"])
    with pytest.raises(ValueError, match="lies under /tmp"):
        SandboxConfig(allow_paths=["/tmp"])
    with pytest.raises(ValueError, match="lists of paths"):
        SandboxConfig(allow_paths="/usr")
    with pytest.raises(ValueError, match="language"):
        CodeReward(language="cobol")


# ----------------------------------------------------------------------------------------------------------------------
# Hostile programs
# ----------------------------------------------------------------------------------------------------------------------


def test_fork_bomb(reward):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert _score_with_neighbour(reward, bomb) == 0.0
    assert _sandbox_processes() == []


def test_memory_bomb(reward):
    grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n"
    at_once = "x = bytearray(10**11)\nprint('PASS')\n"
    assert _score_with_neighbour(reward, grow) == 0.0
    assert _score_with_neighbour(reward, at_once) == 0.0


def test_endless_loop_is_killed_at_the_timeout(reward):
    start = time.monotonic()
    assert _score_with_neighbour(reward, "while True:\n    pass\n") == 0.0
    assert time.monotonic() - start < 10  # 2 s timeout plus start-up, not forever


def test_daemonized_busy_child_does_not_survive_the_call(reward):
    marker = f"k15marker_{secrets.token_hex(6)}"
    daemon = textwrap.dedent(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()  # leave the process group: killpg alone would miss it
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "while True: pass", "{marker}"])
            os._exit(0)
        print("PASS")
    """)
    # The program itself is right (it prints PASS and exits 0); what must not survive is its busy grandchild.
    assert _score_with_neighbour(reward, daemon) == 1.0
    assert _sandbox_processes(marker) == []
    time.sleep(0.3)
    assert _sandbox_processes(marker) == []


def test_huge_output_is_cut_off(reward):
    start = time.monotonic()
    assert _score_with_neighbour(reward, "while True:\n    print('PASS' * 10000)\n") == 0.0
    assert _score_with_neighbour(reward, "import sys\nsys.stdout.write('x' * 10**8)\n") == 0.0
    assert time.monotonic() - start < 10  # killed on overflow, not at the timeout


def test_files_outside_the_working_directory_are_untouched(reward, tmp_path):
    token = secrets.token_hex(6)
    # A world-writable directory without the sticky bit: even an unprivileged uid could delete the canary in it.
    open_dir = Path(tempfile.mkdtemp(prefix="k15_canary_", dir="/var/tmp"))
    try:
        open_dir.chmod(0o777)
        canaries = [open_dir / "canary", Path("/tmp") / f"k15_canary_{token}"]
        for canary in canaries:
            canary.write_text("alive")
            canary.chmod(0o666)
        targets = [
            f"/tmp/k15_pwned_{token}",
            f"/var/tmp/k15_pwned_{token}",
            f"/dev/shm/k15_pwned_{token}",
            f"{os.getcwd()}/k15_pwned_{token}",
            f"{open_dir}/k15_pwned_{token}",
        ]
        attack = textwrap.dedent(f"""
            import os
            won = False
            for path in {[str(c) for c in canaries]!r}:
                try:
                    seen = open(path).read() == "alive"  # the host's canary, not a file of its own
                    open(path, "w").write("pwned"); won = seen
                    os.remove(path); won = seen
                except OSError:
                    pass
            for path in {targets!r}:  # may "succeed" in the sandbox's private tmpfs; checked on the host below
                try:
                    open(path, "w").write("pwned")
                except OSError:
                    pass
            print("PASS" if won else "contained")
        """)
        assert _score_with_neighbour(reward, attack) == 0.0
        for canary in canaries:
            assert canary.read_text() == "alive"
        assert not any(Path(t).exists() for t in targets)
    finally:
        for path in [*open_dir.iterdir(), Path("/tmp") / f"k15_canary_{token}"]:
            path.unlink(missing_ok=True)
        open_dir.rmdir()


@contextlib.contextmanager
def _accepting(servers):
    """Accept connections on the listening ``servers`` in threads; yields the list of accepted ones."""
    connections = []
    done = threading.Event()

    def accept(server):
        server.settimeout(0.2)
        while not done.is_set():
            try:
                connections.append(server.accept()[0])
            except (TimeoutError, OSError):
                continue

    threads = [threading.Thread(target=accept, args=(server,), daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    try:
        yield connections
    finally:
        done.set()
        for thread in threads:
            thread.join()
        for server in servers:
            server.close()


def test_no_network_even_to_localhost(reward):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    attack = textwrap.dedent(f"""
        import socket
        won = False
        for host in ("127.0.0.1", "localhost", "::1", "8.8.8.8", "{socket.gethostname()}"):
            try:
                socket.create_connection((host, {port}), timeout=1).close(); won = True
            except OSError:
                pass
        print("PASS" if won else "contained")
    """)
    with _accepting([server]) as connections:
        assert _score_with_neighbour(reward, attack) == 0.0
    assert connections == []


def test_trainer_environment_is_invisible(monkeypatch):
    secret = f"k15secret_{secrets.token_hex(8)}"
    monkeypatch.setenv("K15_TEST_SECRET", secret)
    snoop = textwrap.dedent(f"""
        import os
        seen = dict(os.environ)
        for pid in os.listdir("/proc"):
            try:
                seen[pid] = open(f"/proc/{{pid}}/environ", "rb").read().decode(errors="replace")
            except OSError:
                pass
        for pid in ({os.getpid()}, {os.getppid()}, 1):  # the trainer's pid, given away in the source
            try:
                seen[str(pid)] = open(f"/proc/{{pid}}/environ", "rb").read().decode(errors="replace")
            except OSError:
                pass
        print(seen)
        print("PASS" if "{secret[:9]}" in str(seen) else "contained")
    """)
    results = Sandbox(timeout_seconds=2.0).run(snoop, [""])
    assert results[0].ok and "contained" in results[0].stdout
    assert secret not in results[0].stdout and "K15_TEST_SECRET" not in results[0].stdout
    reward = get_code_reward(timeout_seconds=2.0)
    assert reward([fenced(snoop)], tests=[PASS_TEST]) == [0.0]


def test_signals_cannot_reach_the_trainer(reward):
    attack = textwrap.dedent(f"""
        import os, signal
        for pid in (os.getppid(), {os.getpid()}, 1):  # its parent, the trainer (pid given away), init
            for sig in (signal.SIGKILL, signal.SIGTERM):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        try:
            os.setuid(0)
        except OSError:
            pass
        try:
            os.kill(-1, signal.SIGKILL)  # kill -9 -1: everything it may signal (itself included)
        except OSError:
            pass
        print("PASS")
    """)
    before = signal.getsignal(signal.SIGTERM)
    # Linux spares the caller of kill(-1), so the program may well print PASS; what matters is who else got hit.
    assert _score_with_neighbour(reward, attack) in (0.0, 1.0)  # the neighbour in the batch survived too
    assert signal.getsignal(signal.SIGTERM) == before  # and we are still here to check
    assert _sandbox_processes() == []


def test_the_program_runs_unprivileged():
    probe = textwrap.dedent("""
        import os
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        print(os.getuid(), os.getgid(), os.getgroups(), status["NoNewPrivs"].strip(), status["CapEff"].strip())
    """)
    (result,) = Sandbox(timeout_seconds=2.0).run(probe, [""])
    uid, gid, groups, no_new_privs, capabilities = result.stdout.split(maxsplit=4)
    assert uid != "0" and gid != "0" and groups == "[]"
    assert no_new_privs == "1" and int(capabilities, 16) == 0


def test_test_answers_are_not_readable_from_disk(reward, monkeypatch):
    # The answers in a world-readable file in the trainer's working directory and in /var/tmp, paths given away.
    answers_dir = Path(tempfile.mkdtemp(prefix="k15_answers_", dir="/var/tmp"))
    try:
        answers_dir.chmod(0o755)
        answers = answers_dir / "answers.txt"
        answers.write_text("PASS\n")
        answers.chmod(0o644)
        monkeypatch.chdir(answers_dir)
        cheat = textwrap.dedent(f"""
            import glob, os
            for path in ({str(answers)!r}, "answers.txt", *glob.glob("/var/tmp/*/answers.txt")):
                try:
                    print(open(path).read().strip()); break
                except OSError:
                    pass
            else:
                print("contained")
        """)
        assert _score_with_neighbour(reward, cheat) == 0.0
    finally:
        answers.unlink(missing_ok=True)
        answers_dir.rmdir()


def _world_readable_dir(prefix: str) -> Path:
    """A world-readable directory outside the trainer's working directory and $HOME (/srv where we may write)."""
    for parent in ("/srv", "/opt", "/var/tmp"):
        if os.access(parent, os.W_OK):
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            path.chmod(0o755)
            return path
    pytest.skip("no writable directory outside /tmp for the world-readable file")


def test_a_file_outside_the_allow_list_cannot_be_read_and_one_inside_can():
    """The issue's case: a dataset's test cases in a world-readable JSONL under /srv. Listed in allow_paths, the same
    file becomes readable: the check can fail."""
    data_dir = _world_readable_dir("k15_dataset_")
    try:
        rows = data_dir / "tests.jsonl"
        rows.write_text(json.dumps({"input": "", "output": "PASS"}) + "\n")
        rows.chmod(0o644)
        cheat = textwrap.dedent(f"""
            import glob, json, os
            try:
                print(json.loads(open({str(rows)!r}).readline())["output"])
            except OSError:
                print("contained", os.path.exists({str(data_dir)!r}), glob.glob("/srv/*") + glob.glob("/opt/*"))
        """)
        (blocked,) = Sandbox(timeout_seconds=2.0).run(cheat, [""])
        assert blocked.ok and blocked.stdout.split() == ["contained", "False", "[]"], blocked
        (allowed,) = Sandbox(timeout_seconds=2.0, allow_paths=[str(data_dir)]).run(cheat, [""])
        assert allowed.ok and allowed.stdout.strip() == "PASS", allowed
    finally:
        rows.unlink(missing_ok=True)
        data_dir.rmdir()


def test_an_allowed_site_packages_is_importable():
    """site-packages stays out of the root unless listed in allow_paths; listed, its packages import."""
    box = Sandbox(timeout_seconds=5.0)
    python = box.mode().python
    site_dir = subprocess.run(
        [python, "-I", "-S", "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not os.path.isfile(os.path.join(site_dir, "pip", "__init__.py")):
        pytest.skip(f"no pip in {site_dir} to import")
    probe = "try:\n    import pip\n    print(pip.__file__)\nexcept ImportError:\n    print('no pip')\n"
    (without,) = box.run(probe, [""])
    assert without.stdout.strip() == "no pip", without
    (allowed,) = Sandbox(timeout_seconds=5.0, allow_paths=[site_dir]).run(probe, [""])
    assert allowed.stdout.strip() == os.path.join(site_dir, "pip", "__init__.py"), allowed


def test_the_root_holds_the_allow_list_and_nothing_else():
    """Every path the program can see (outside its own /proc, /dev and /tmp) is one the plan put there."""
    box = Sandbox(timeout_seconds=20.0, max_output_bytes=16 << 20)
    plan = box.mode().root["ops"]
    walk = textwrap.dedent("""
        import os
        for top, dirs, files in os.walk("/"):
            if top == "/":
                dirs[:] = [d for d in dirs if d not in ("proc", "dev", "tmp")]
            for name in dirs + files:
                print(os.path.join(top, name))
    """)
    (result,) = box.run(walk, [""])
    assert result.ok, result
    seen = result.stdout.splitlines()
    binds = [op[1] for op in plan if op[0] == "bind"]
    made = {op[1] for op in plan if op[0] in ("dir", "symlink", "mask")} | {"/dev", "/proc", "/tmp"}
    made |= {"/etc/passwd", "/etc/group", "/etc/hosts", "/etc/hostname", "/etc"}
    stray = [p for p in seen if p not in made and not any(p == b or p.startswith(b + "/") for b in binds)]
    assert stray == [] and len(seen) > 100, stray[:20]
    assert not any("site-packages/" in p for p in seen)  # masked: the interpreter's packages stay out
    assert not any(p.startswith(("/work", "/home", "/srv", "/opt", "/var", "/mnt", "/run", "/sys")) for p in seen)


def test_reads_of_host_secrets_are_contained(reward):
    """/etc/shadow-like files, the host's /etc, other processes through /proc, the package's own files."""
    import k15_plugin

    package = Path(k15_plugin.__file__).resolve().parent
    host_users = [line.split(":")[0] for line in Path("/etc/passwd").read_text().splitlines() if ":" in line]
    host_only = [u for u in host_users if u not in ("root", "sandbox")][:5]
    targets = [
        "/etc/shadow",
        "/etc/gshadow",
        "/etc/sudoers",
        "/root/.ssh/id_rsa",
        "/root/.bash_history",
        "/etc/machine-id",
        "/proc/1/environ",
        f"/proc/{os.getpid()}/environ",
        f"/proc/{os.getpid()}/cmdline",
        str(package / "rewards" / "code.py"),
        str(package / "__init__.py"),
        sys.prefix + "/pyvenv.cfg",
        str(Path(json.__file__)),
    ]
    snoop = textwrap.dedent(f"""
        import os
        leaked = []
        for path in {targets!r}:
            try:
                if open(path, "rb").read(64):
                    leaked.append(path)
            except OSError:
                pass
        passwd = open("/etc/passwd").read()
        leaked += [u for u in {host_only!r} if u + ":" in passwd]
        others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
        for pid in others:
            try:
                if "k15_plugin" in open(f"/proc/{{pid}}/cmdline").read():
                    leaked.append(f"/proc/{{pid}}/cmdline")
            except OSError:
                pass
        for path in {[str(package), str(package.parent), sys.prefix]!r}:
            if os.path.exists(path):
                leaked.append(path)
        print(leaked)
        print("PASS" if leaked else "contained")
    """)
    # json's own file is the one target the program may read (the standard library): the probe works
    (result,) = Sandbox(timeout_seconds=2.0).run(snoop, [""])
    assert result.ok and result.stdout.splitlines()[0] == repr([str(Path(json.__file__))]), result
    assert _score_with_neighbour(reward, snoop.replace(repr(str(Path(json.__file__))), "'/nonexistent'")) == 0.0


def test_sockets_on_the_host_are_unreachable(reward):
    """A unix socket in /run (or another host directory) and an abstract one: neither is in the sandbox's world."""
    directory = "/run" if os.access("/run", os.W_OK) else str(_world_readable_dir("k15_run_"))
    token = secrets.token_hex(6)
    path = os.path.join(directory, f"k15-{token}.sock")
    servers = []
    for address in (path, f"\0k15-{token}"):
        server = socket.socket(socket.AF_UNIX)
        server.bind(address)
        if address == path:
            os.chmod(path, 0o777)
        server.listen(8)
        servers.append(server)
    attack = textwrap.dedent(f"""
        import glob, socket
        won = []
        for address in ({path!r}, "\\0k15-{token}", *glob.glob("/run/*.sock"), *glob.glob("/var/run/*/*.sock")):
            try:
                s = socket.socket(socket.AF_UNIX); s.settimeout(1); s.connect(address); won.append(address)
            except OSError:
                pass
        print("PASS" if won else "contained")
    """)
    try:
        with _accepting(servers) as connections:
            assert _score_with_neighbour(reward, attack) == 0.0
    finally:
        os.unlink(path)
        if directory != "/run":
            os.rmdir(directory)
    assert connections == []


def test_nothing_carries_over_from_one_program_to_the_next():
    """A slot runs program after program: files, shared memory and processes of one are gone for the next."""
    marker = f"k15marker_{secrets.token_hex(6)}"
    box = Sandbox(timeout_seconds=2.0, concurrency=1)
    first = textwrap.dedent(f"""
        import os, subprocess, sys
        for path in ("/tmp/{marker}", "/dev/shm/{marker}", "{marker}"):
            open(path, "w").write("left behind")
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "{marker}"], start_new_session=True)
        print("ok")
    """)
    second = textwrap.dedent(f"""
        import os
        left = [p for p in ("/tmp/{marker}", "/dev/shm/{marker}", "{marker}") if os.path.exists(p)]
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if "{marker}" in open(f"/proc/{{pid}}/cmdline").read():
                    left.append(pid)
            except OSError:
                pass
        print(left)
    """)
    assert box.run(first, [""])[0].stdout.strip() == "ok"
    assert box.run(second, [""])[0].stdout.strip() == "[]"
    assert _sandbox_processes(marker) == []


def test_a_dead_slot_is_rebuilt_on_its_next_use():
    import k15_plugin.sandbox.runner as sandbox_module

    box = Sandbox(timeout_seconds=2.0, concurrency=1, memory_mb=120)
    assert box.run("print(1)", [""])[0].stdout.strip() == "1"
    (slot,) = box._pool().slots.values()
    os.killpg(slot.proc.pid, signal.SIGKILL)
    slot.proc.wait()
    assert box.run("print(2)", [""])[0].stdout.strip() == "2"
    assert box._pool().slots[0] is not slot
    box.close()
    assert not slot.alive and isinstance(box._pool(), sandbox_module._Pool)


def test_concurrent_callers_share_the_slots():
    box = Sandbox(timeout_seconds=5.0, concurrency=2)
    box.mode()
    jobs = [(f"print(int(input()) * {k})\n", [f"{i}\n" for i in range(3)]) for k in range(6)]
    outcomes = []

    def call():
        outcomes.append(box.run_many(jobs))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    want = [[str(i * k) for i in range(3)] for k in range(6)]
    assert len(outcomes) == 3
    for results in outcomes:
        assert [[r.stdout.strip() for r in runs] for runs in results] == want


# ----------------------------------------------------------------------------------------------------------------------
# Modes, cgroups, configuration
# ----------------------------------------------------------------------------------------------------------------------


def test_required_isolation_refuses_rather_than_running_unisolated(monkeypatch):
    import k15_plugin.sandbox.runner as sandbox_module

    monkeypatch.setattr(sandbox_module, "_python_candidates", lambda config: ["/nonexistent/python3"])
    with pytest.raises(SandboxUnavailableError, match="interpreter"):
        Sandbox(timeout_seconds=1.0, memory_mb=100).mode()  # a config no other test probed
    monkeypatch.undo()
    _without_cap_sys_admin(monkeypatch)
    with pytest.raises(
        SandboxUnavailableError,
        match=r"^no working code sandbox \(isolation=allowlist\): .*unshare.*"
        r"set isolation=denylist",
    ) as refused:
        Sandbox(timeout_seconds=1.0, memory_mb=101).mode()
    assert "\n" not in str(refused.value)
    with pytest.raises(SandboxUnavailableError, match="set isolation=none"):
        Sandbox(timeout_seconds=1.0, memory_mb=102, isolation="denylist").mode()


def test_probe_does_not_use_the_per_input_time_limit():
    """A loaded machine may take longer than a short per-input limit to start Python: the probe still passes, and the
    programs themselves keep the short limit."""
    box = Sandbox(timeout_seconds=0.05, memory_mb=103)  # a config no other test probed
    assert box.mode().python
    (result,) = box.run("import time\ntime.sleep(5)\n", [""])
    assert result.timed_out


def test_a_failed_probe_says_what_the_program_did():
    from k15_plugin.sandbox import RunResult
    from k15_plugin.sandbox.runner import _why_probe_failed

    assert _why_probe_failed([]) == "no result"
    assert _why_probe_failed([RunResult(exit_code=None, stdout="", error="sandbox failed (EOFError): x")]) == (
        "sandbox failed (EOFError): x"
    )
    timed_out = RunResult(exit_code=None, stdout="", signal=9, timed_out=True, seconds=30.02)
    assert _why_probe_failed([timed_out]) == "timed out after 30.0 s"
    killed = RunResult(exit_code=None, stdout="", signal=9, stderr_tail="Traceback\nMemoryError\n")
    assert _why_probe_failed([killed]) == "killed by signal 9: MemoryError"
    assert _why_probe_failed([RunResult(exit_code=1, stdout="", stderr_tail="ImportError: x")]) == (
        "exited with 1: ImportError: x"
    )
    assert _why_probe_failed([RunResult(exit_code=0, stdout="4\n")]) == "printed '4' instead of 5"


def _without_cap_sys_admin(monkeypatch) -> None:
    """Start the launchers as root without CAP_SYS_ADMIN (a default Docker container): no namespaces."""
    import k15_plugin.sandbox.runner as sandbox_module

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to take CAP_SYS_ADMIN away")
    launcher = sandbox_module._launcher_command()
    no_caps = ["setpriv", "--bounding-set=-sys_admin", *launcher]
    monkeypatch.setattr(sandbox_module, "_launcher_command", lambda: no_caps)


def test_k15_train_stops_before_the_model_loads_when_the_sandbox_cannot_be_built(tmp_path, monkeypatch, capsys):
    from tests.cli_helpers import assert_one_line, main_before_the_job

    _without_cap_sys_admin(monkeypatch)
    rows = tmp_path / "code.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": f"Add two numbers ({i}).", "tests": ADD_TESTS}) + "\n" for i in range(300))
    )
    args = ["data=jsonl", f"data.path={rows}", "reward=code", "reward.code.memory_mb=130"]
    code, stderr = main_before_the_job(args, tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, "reward.code.isolation=allowlist: no working code sandbox", tmp_path)
    assert "Operation not permitted" in stderr and "set isolation=denylist" in stderr


def test_no_namespaces_fallback_still_limits_and_warns(monkeypatch):
    _without_cap_sys_admin(monkeypatch)
    box = Sandbox(timeout_seconds=2.0, memory_mb=103, isolation="none")
    with pytest.warns(RuntimeWarning, match="WITHOUT network"):
        mode = box.mode()
    assert mode.isolation == "none" and not mode.namespaces
    results = box.run("import os\nprint(os.getuid(), sorted(os.environ))\n", ["", ""])
    assert [r.ok for r in results] == [True, True]
    assert results[0].stdout.split()[0] == str(uid_base())  # still the unprivileged uid
    assert "K15" not in results[0].stdout and "HOME" in results[0].stdout
    assert box.run("while True:\n    pass\n", [""])[0].timed_out
    box.close()


def test_denylist_mode_hides_the_trainers_directories_but_not_the_rest(monkeypatch):
    """The weaker mode, as documented: the host's file system read-only, minus cwd, $HOME and hide_paths."""
    import k15_plugin.sandbox.runner as sandbox_module

    def no_root(config, python):
        raise SandboxUnavailableError("simulated: no allow-list root")

    monkeypatch.setattr(sandbox_module, "_root_plan", no_root)
    hidden = Path(tempfile.mkdtemp(prefix="k15_hidden_", dir="/var/tmp"))
    try:
        hidden.chmod(0o755)
        (hidden / "answers.txt").write_text("secret")
        (hidden / "answers.txt").chmod(0o644)
        with pytest.raises(SandboxUnavailableError, match="simulated: no allow-list root"):  # not a fallback
            Sandbox(timeout_seconds=2.0, hide_paths=[str(hidden)]).mode()
        box = Sandbox(timeout_seconds=2.0, hide_paths=[str(hidden)], isolation="denylist")  # what it takes instead
        with pytest.warns(RuntimeWarning, match="isolation=denylist"):
            assert box.mode().isolation == "denylist"
        probe = (
            f"import os\nprint(os.path.exists({str(hidden / 'answers.txt')!r}), os.path.isdir('/var'), "
            f"os.path.exists({os.getcwd()!r} + '/pyproject.toml'))\n"
        )
        (result,) = box.run(probe, [""])
        box.close()
        assert result.ok, result.stderr_tail
        assert result.stdout.split() == ["False", "True", "False"], result.stdout
    finally:
        (hidden / "answers.txt").unlink()
        hidden.rmdir()


def test_unprivileged_trainer_builds_the_root_in_a_user_namespace(tmp_path):
    """Not root: the same allow-list root inside a user namespace (run here as nobody with the system Python)."""
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(python):
        pytest.skip("needs root (to become nobody), setpriv and /usr/bin/python3")
    module = Path(sys.modules[Sandbox.__module__].__file__)
    if not os.stat(module).st_mode & 0o004 or any(not os.stat(p).st_mode & 0o001 for p in module.parents):
        pytest.skip(f"{module} is not readable by nobody")
    script = textwrap.dedent(f"""
        import json, sys, types, warnings
        # the sandbox's modules alone (the system Python has none of the package's dependencies)
        packages = {{"k15_plugin": {str(module.parent.parent)!r}, "k15_plugin.sandbox": {str(module.parent)!r}}}
        for name, path in packages.items():
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__path__ = [path]
        import k15_plugin.sandbox.runner as sandbox
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            box = sandbox.Sandbox(timeout_seconds=5.0, concurrency=1)
            mode = box.mode()
        (result,) = box.run("import os\\nprint(os.getuid(), sorted(os.listdir('/')), os.path.exists('/work'))", [""])
        print(json.dumps({{"isolation": mode.isolation, "userns": mode.userns, "stdout": result.stdout,
                          "error": result.error, "warnings": [str(w.message) for w in caught]}}))
    """)
    run = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    if "unshare" in run.stdout + run.stderr and "Operation not permitted" in run.stdout + run.stderr:
        pytest.skip("unprivileged user namespaces are disabled here")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["isolation"] == "allowlist" and report["userns"], report
    uid, *listing = report["stdout"].split(maxsplit=1)
    assert uid == "1000"  # mapped, not root
    assert "'work'" not in listing[0] and report["stdout"].split()[-1] == "False", report


def test_cgroup_is_required_only_when_asked(caplog):
    import k15_plugin.sandbox.runner as sandbox_module

    parent, _ = sandbox_module._cgroup_parent(SandboxConfig())
    if parent is not None:
        sandbox_module._remove_cgroup(parent)
        pytest.skip("this machine delegates cgroup v2: see test_cgroup_limits_the_whole_slot")
    with pytest.raises(SandboxUnavailableError, match=r"no per-sandbox cgroup: .*set cgroup=auto"):
        Sandbox(timeout_seconds=1.0, memory_mb=110, cgroup="require").mode()
    sandbox_module._CGROUP_LOGGED.clear()
    with caplog.at_level("WARNING", logger=sandbox_module.__name__):
        Sandbox(timeout_seconds=1.0, memory_mb=111).mode()
        Sandbox(timeout_seconds=1.0, memory_mb=112).mode()
    logged = [r.getMessage() for r in caplog.records if "cgroup" in r.getMessage()]
    assert len(logged) == 1 and "per-process limits" in logged[0], logged  # said once, not per configuration


def test_cgroup_files_of_each_slot(tmp_path, monkeypatch):
    """The cgroup v2 plumbing against a stand-in hierarchy: the limits each slot's leaf gets, and the launcher joins
    its leaf before it starts anything. (Enforcement needs a delegated hierarchy: next test.)"""
    import k15_plugin.sandbox.root as sandbox_module

    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("\n")
    monkeypatch.setattr(sandbox_module, "_cgroup_v2_base", lambda: str(tmp_path))
    box = Sandbox(timeout_seconds=2.0, memory_mb=300, max_processes=20, cpus=0.5, concurrency=1, cgroup="require")
    try:
        mode = box.mode()
        assert mode.cgroup and Path(mode.cgroup).parent == tmp_path
        assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
        assert box.run("print(6 * 7)", [""])[0].stdout.strip() == "42"
        leaf = Path(mode.cgroup) / "slot0"
        assert (leaf / "memory.max").read_text() == str(300 << 20)
        assert (leaf / "pids.max").read_text() == "22"
        assert (leaf / "cpu.max").read_text() == "50000 100000"
        assert (leaf / "cgroup.procs").read_text() == "0"  # written by the launcher itself: "move me"
    finally:
        box.close()


def test_cgroup_limits_the_whole_slot():
    """Where cgroup v2 is delegated: processes that each stay under RLIMIT_AS but together exceed memory.max die."""
    import k15_plugin.sandbox.root as sandbox_module

    parent, why = sandbox_module._cgroup_parent(SandboxConfig())
    if parent is None:
        pytest.skip(f"no delegated cgroup v2 here ({why})")
    sandbox_module._remove_cgroup(parent)
    hog = textwrap.dedent("""
        import os, time
        children = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                block = bytearray(150 * 2**20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                time.sleep(3)
                os._exit(0)
            children.append(pid)
        print("PASS" if all(os.waitpid(p, 0)[1] == 0 for p in children) else "contained")
    """)
    (result,) = Sandbox(timeout_seconds=10.0, memory_mb=256, cgroup="require").run(hog, [""])
    assert "PASS" not in result.stdout, result


def test_reward_code_config_builds_the_code_reward(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from k15_plugin.cli.hosts.trl import check_config
    from k15_plugin.cli.train import _register, config_dir
    from k15_plugin.data.build.warm_start import build_tokenizer
    from k15_plugin.data.tasks import load_task

    rows = tmp_path / "train.jsonl"
    rows.write_text(
        "".join(json.dumps({"prompt": f"Add two numbers ({i}).", "tests": ADD_TESTS}) + "\n" for i in range(10))
    )
    _register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            [
                "reward=code",
                "data=jsonl",
                f"data.path={rows}",
                "reward.code.partial_credit=false",
                "reward.code.timeout_seconds=2",
                "reward.code.concurrency=2",
            ],
        )
        demo = compose("config", ["reward=code"])
    GlobalHydra.instance().clear()
    check_config(cfg)
    task = load_task(cfg.data, build_tokenizer(), 0, 8, cfg.reward)
    (reward,) = task.reward_funcs
    assert isinstance(reward, CodeReward) and not reward.partial_credit
    assert reward.sandbox_config.timeout_seconds == 2.0 and reward.sandbox_config.isolation == "allowlist"
    assert "tests" in task.train.column_names and "tests" in task.heldout.column_names
    row = task.train[0]
    assert reward([fenced(ADD), fenced("print(3)")], tests=[row["tests"]] * 2) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"reward\.verifier=code reads a `tests` column"):
        load_task(demo.data, build_tokenizer(), 0, 4, demo.reward)
