"""The sandboxed code reward (paper sections 2.3 and 2.6): scoring, and a corpus of hostile programs it must contain.

Every hostile program below prints ``PASS`` only if its attack worked, and its test case expects ``PASS``: a reward
of 0 means the attack failed. Each runs next to an innocent program in the same batch, which must still pass (one
program's fork bomb must not starve its neighbours), and the host-side effect is checked separately (canary files,
listener, leftover processes, the secret in the output).
"""

import os
import pickle
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from k15_plugin.rewards import CodeReward, Sandbox, SandboxConfig, SandboxUnavailableError, get_code_reward
from k15_plugin.rewards.code import extract_program, normalize_output, parse_tests
from k15_plugin.rewards.sandbox import DEFAULT_UID_BASE, _Mode

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
    """Processes of the sandbox uids, or whose command line carries ``marker``, still alive on the host."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            uid = int((entry / "status").read_text().split("\nUid:")[1].split()[0])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if DEFAULT_UID_BASE <= uid < DEFAULT_UID_BASE + 1024 or (marker and marker in cmdline):
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
    with pytest.raises(ValueError, match="network_isolation"):
        SandboxConfig(network_isolation="off")
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
        targets = [f"/tmp/k15_pwned_{token}", f"/var/tmp/k15_pwned_{token}", f"/dev/shm/k15_pwned_{token}",
                   f"{os.getcwd()}/k15_pwned_{token}", f"{open_dir}/k15_pwned_{token}"]  # fmt: skip
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


def test_no_network_even_to_localhost(reward):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    connections = []
    done = threading.Event()

    def accept():
        while not done.is_set():
            try:
                connections.append(server.accept()[0])
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
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
    try:
        assert _score_with_neighbour(reward, attack) == 0.0
    finally:
        done.set()
        thread.join()
        server.close()
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


# ----------------------------------------------------------------------------------------------------------------------
# Modes and throughput
# ----------------------------------------------------------------------------------------------------------------------


def test_required_isolation_refuses_rather_than_running_unisolated(monkeypatch):
    import k15_plugin.rewards.sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "_python_candidates", lambda config: ["/nonexistent/python3"])
    with pytest.raises(SandboxUnavailableError, match="interpreter"):
        Sandbox(timeout_seconds=1.0, memory_mb=100).mode()  # a config no other test probed
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return
    # Root without CAP_SYS_ADMIN (a default Docker container): no namespaces can be made.
    launcher = sandbox_module._launcher_command()
    no_caps = ["setpriv", "--bounding-set=-sys_admin", *launcher]
    monkeypatch.setattr(sandbox_module, "_launcher_command", lambda: no_caps)
    monkeypatch.setattr(sandbox_module, "_python_candidates", lambda config: ["/usr/bin/python3"])
    with pytest.raises(SandboxUnavailableError, match="network_isolation=best_effort"):
        Sandbox(timeout_seconds=1.0, memory_mb=101).mode()
    with pytest.warns(RuntimeWarning, match="WITHOUT network"):
        mode = Sandbox(timeout_seconds=1.0, memory_mb=102, network_isolation="best_effort").mode()
    assert not mode.namespaces


def test_best_effort_fallback_still_limits_and_warns():
    sandbox = Sandbox(timeout_seconds=2.0, network_isolation="best_effort")
    real = sandbox.mode()
    plain = _Mode(namespaces=False, userns=False, drop_uid=real.drop_uid, uid_base=real.uid_base, python=real.python)
    with pytest.warns(RuntimeWarning, match="WITHOUT network"):
        Sandbox._warn_about(plain)
    results, _ = sandbox._launch(plain, 0, "import os\nprint(os.getuid(), sorted(os.environ))\n", ["", ""], None)
    assert [r.ok for r in results] == [True, True]
    if os.geteuid() == 0:
        assert results[0].stdout.split()[0] == str(DEFAULT_UID_BASE)  # still the unprivileged uid
    assert "K15" not in results[0].stdout and "HOME" in results[0].stdout
    results, _ = sandbox._launch(plain, 0, "while True:\n    pass\n", [""], None)
    assert results[0].timed_out


def test_throughput_smoke(capsys):
    """Programs per second for trivial programs (printed, not asserted: the machine is shared)."""
    jobs = [("print(int(input()) + 1)\n", [f"{i}\n"]) for i in range(16)]
    for concurrency in (1, 2):
        sandbox = Sandbox(timeout_seconds=5.0, concurrency=concurrency)
        sandbox.mode()
        start = time.perf_counter()
        results = sandbox.run_many(jobs)
        seconds = time.perf_counter() - start
        assert [r[0].stdout.strip() for r in results] == [str(i + 1) for i in range(16)]
        with capsys.disabled():
            print(f"\n[sandbox] {len(jobs) / seconds:.1f} programs/s at concurrency {concurrency}", end="")


def test_reward_code_config_builds_the_code_reward(tmp_path):
    import json

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from k15_plugin.cli.build import check_config
    from k15_plugin.cli.train import _register, config_dir
    from k15_plugin.data.arithmetic import build_tokenizer
    from k15_plugin.data.tasks import load_task

    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Add two numbers ({i}).", "tests": ADD_TESTS}) + "\n"
                            for i in range(10)))  # fmt: skip
    _register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", ["reward=code", "data=jsonl", f"data.path={rows}", "reward.code.partial_credit=false",
                                 "reward.code.timeout_seconds=2", "reward.code.concurrency=2"])  # fmt: skip
        demo = compose("config", ["reward=code"])
    GlobalHydra.instance().clear()
    check_config(cfg)
    task = load_task(cfg.data, build_tokenizer(), 0, 8, cfg.reward)
    (reward,) = task.reward_funcs
    assert isinstance(reward, CodeReward) and not reward.partial_credit
    assert reward.sandbox_config.timeout_seconds == 2.0 and reward.sandbox_config.network_isolation == "require"
    assert "tests" in task.train.column_names and "tests" in task.heldout.column_names
    row = task.train[0]
    assert reward([fenced(ADD), fenced("print(3)")], tests=[row["tests"]] * 2) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"reward\.verifier=code reads a `tests` column"):
        load_task(demo.data, build_tokenizer(), 0, 4, demo.reward)
