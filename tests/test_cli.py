"""The Hydra entry point: every config option composes, bad values fail in one line, and short runs go through.

Bad values go through ``k15-train``'s ``main`` in this process; the runs are real processes."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from cli_helpers import assert_one_line, main_before_the_job
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from k15_plugin.cli.hosts.trl import check_config
from k15_plugin.cli.train import config_dir
from k15_plugin.errors import ConfigError

CONF = config_dir()
GROUPS = ["algorithm", "reward", "sampler", "rollout", "model", "data", "launcher", "experiment", "host"]
REPO = Path(__file__).resolve().parents[1]


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture
def composer():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides=(): compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()


def test_config_groups_have_the_required_options():
    assert {"kimi_md", "grpo", "dr_grpo", "dapo", "rloo"} <= set(_options("algorithm"))
    assert {"correctness", "length_penalty"} <= set(_options("reward"))
    assert set(_options("sampler")) == {"uniform", "curriculum", "prioritized"}
    assert set(_options("rollout")) == {"full", "partial"}
    assert {"tiny_demo", "qwen2.5_0.5b"} <= set(_options("model"))
    assert {"demo_arithmetic", "gsm8k", "math", "jsonl"} <= set(_options("data"))
    assert {"local", "accelerate_ddp", "accelerate_deepspeed_zero2", "accelerate_deepspeed_zero3"} <= set(
        _options("launcher")
    )


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_checks(composer, group, tmp_path):
    for option in _options(group):
        overrides = [f"{group}={option}"]
        if group == "data" and option == "jsonl":
            path = tmp_path / "train.jsonl"
            path.write_text('{"prompt": "1+1=", "answer": "2"}\n')
            overrides.append(f"data.path={path}")
        if group == "launcher" and option != "local":
            overrides.append("launcher.num_processes=1")  # this test runs as one process
        cfg = composer(overrides)
        if (group, option) == ("algorithm", "ppo"):  # OpenRLHF's; on TRL it is refused with one line
            with pytest.raises(ConfigError, match="algorithm=ppo runs on OpenRLHF only: add host=openrlhf"):
                check_config(cfg)
            continue
        if (group, option) == ("host", "openrlhf"):  # the flags (OpenRLHF's parser: tests/test_openrlhf_adapter.py)
            from k15_plugin.cli.hosts.openrlhf import build_plan

            assert "--algo.advantage.estimator" in build_plan(cfg, tmp_path).argv
            continue
        if (group, option) == ("host", "verl"):  # verl's own validation: tests/test_verl_adapter.py (verl's env)
            from k15_plugin.cli.hosts.verl import derived

            name, tree, sources = derived(cfg, tmp_path)
            assert name == "k15_md" and tree["data"]["train_batch_size"] == 16
            assert sources["data.train_batch_size"] == "trainer.per_device_train_batch_size"
            continue
        if group == "experiment" and cfg.trainer.bf16:  # a GPU recipe: checked on this CPU machine without bf16
            cfg.trainer.use_cpu, cfg.trainer.bf16 = True, False
        check_config(cfg)
        assert cfg[group if group != "experiment" else "trainer"] is not None


def test_an_experiment_sets_the_trainer(composer):
    """An experiment's trainer values win over config.yaml's own (they were silently overridden once), and the
    command line wins over both."""
    cfg = composer(["experiment=gsm8k_qwen0.5b"])
    assert (cfg.trainer.max_completion_length, cfg.trainer.learning_rate, cfg.trainer.bf16) == (512, 1e-6, True)
    cfg = composer(["experiment=long2short_rl", "trainer.max_steps=7"])
    assert (cfg.trainer.max_completion_length, cfg.trainer.max_steps) == (11, 7)
    assert (cfg.model.name, cfg.data.terms, cfg.reward.name) == ("tiny_demo_sum3_long", 3, "length_penalty")


def test_the_chain_experiment_takes_partial_rollouts_as_the_readme_writes_them(composer):
    cfg = composer(["experiment=demo_chain", "rollout=partial", "rollout.segment_tokens=23"])
    args = check_config(cfg).args
    assert (args.max_completion_length, args.rollout_segment_tokens, args.rollout_max_staleness) == (115, 23, 2)


def test_default_config_is_the_demo(composer):
    cfg = composer()
    assert (cfg.algorithm.name, cfg.model.name, cfg.data.name, cfg.sampler.name) == (
        "kimi_md",
        "tiny_demo",
        "demo_arithmetic",
        "uniform",
    )
    assert cfg.algorithm.tau > 0 and cfg.trainer.max_steps >= 1


def test_every_yaml_key_has_a_comment_above_it():
    missing = []
    for path in sorted(CONF.rglob("*.yaml")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith("- ") or ":" not in stripped:
                continue
            key = stripped.split(":", 1)[0]
            if key == "defaults" or key.startswith("override "):
                continue
            previous = lines[i - 1].strip() if i else ""
            opens_block = stripped.endswith(":")  # a block key (e.g. trainer:) is documented by its children
            if not previous.startswith("#") and not opens_block:
                missing.append(f"{path.relative_to(CONF)}:{i + 1}: {key}")
    assert not missing, "keys without a comment above them:\n" + "\n".join(missing)


def test_yaml_keys_are_all_known_to_the_schema(composer):
    # composing each option already rejects unknown keys (struct mode); make sure the YAML files parse as mappings
    for path in CONF.rglob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def _cli(args, cwd, timeout=1800):  # a slow, loaded 2-core machine: minutes of imports
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "k15_plugin.cli.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, key",
    [
        (["algorithm.tau=-1"], "algorithm.tau"),
        (["sampler=nonexistent"], "sampler=nonexistent"),
        (["reward=length_penalty", "reward.length_penalty.weight=-0.5"], "reward.length_penalty.weight"),
        (["trainer.num_generations=1"], "trainer.num_generations"),
        (["trainer.max_step=5"], "trainer.max_step"),
        (["algorithm.tau=abc"], "algorithm.tau"),
        (["-m", "algorithm=kimi_md,grpo", "algorithm.tau=0"], "algorithm.tau"),
        (["trainer.steps_per_generation=0"], "trainer.steps_per_generation"),
        (["model=qwen2.5_0.5b", "model.dtype=bfloat16"], "model.dtype"),
        (["trainer.per_device_train_batch_size=12"], "trainer.num_generations"),
        (["reward=code", "reward.code.isolation=container"], "reward.code.isolation"),
        (["reward=code", "reward.code.allow_paths=[/nonexistent/k15]"], "reward.code.allow_paths: /nonexistent/k15"),
        (
            ["rollout=partial", "rollout.segment_tokens=3"],
            "rollout.segment_tokens: rollout_segment_tokens=3 must divide",
        ),
        (["rollout=partial", "trainer.max_completion_length=6"], "rollout.segment_tokens=null"),
        (["experiment=demo_chain", "rollout=partial"], "set rollout.segment_tokens to a divisor of it such as 23 (5"),
        (["rollout=partial", "rollout.loss_mask=first"], "rollout.loss_mask"),
        (["rollout=partial", "rollout.repeat.min_count=1"], "rollout.repeat.min_count: repeat_min_count must be"),
        (["rollout=partial", "algorithm=rloo", "rollout.loss_mask=latest"], "rollout.loss_mask"),
        (["rollout=partial", "rollout.correction=clip"], "rollout.correction"),
        (["rollout=partial", "rollout.is_cap=1"], "rollout.is_cap: rollout_is_cap must be a number > 1"),
        (["rollout.correction=token_is"], "rollout.correction: rollout_correction='token_is' corrects tokens"),
        (["rollout=partial", "rollout.emit_order=newest"], "rollout.emit_order"),
        (["rollout=partial", "rollout.stale_action=truncate"], "rollout.stale_action"),
        (["rollout.max_staleness=2"], "rollout.max_staleness: rollout_max_staleness=2 acts on groups carried over"),
        (
            ["rollout=partial", "algorithm=rloo", "rollout.max_staleness=2", "rollout.stale_action=mask"],
            "rollout_stale_action='mask' is not supported by RLOO",
        ),
        (["algorithm=ppo"], "algorithm=ppo runs on OpenRLHF only"),
        (["host.dry_run=true"], "host.dry_run: only host=openrlhf"),
        (["host=openrlhf", "algorithm=dapo"], "algorithm=dapo runs on host=trl only"),
        (["host=openrlhf", "trainer.learning_rate=0"], "trainer.learning_rate"),
        (["experiment=demo_vision", "rollout=partial"], "rollout=partial with data.source=demo_vision"),
        (["experiment=demo_vision", "trainer.use_vllm=true"], "trainer.use_vllm=true with data.source=demo_vision"),
        (["data=demo_vision"], "model.name=tiny_demo is a text-only model (llama) and data.source=demo_vision"),
        (["experiment=demo_vision", "data=demo_chain"], "model.name=tiny_demo_vision is a vision-language model"),
    ],
)
def test_bad_values_fail_in_one_line_before_loading(tmp_path, monkeypatch, capsys, args, key):
    code, stderr = main_before_the_job(args, tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, key, tmp_path)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["+foo=1"], "foo: Key 'foo' not in 'K15TrainConfig' (an unknown key; +key=value adds new keys only under"),
        (["++foo=1"], "foo: Key 'foo' not in 'K15TrainConfig'"),
        (["+trainer.foo=1"], "trainer.foo: Key 'foo' not in 'Trainer'"),
        (["+algorithm.foo=1"], "algorithm.foo: Key 'foo' not in 'KimiMDAlgorithm'"),  # `Any` in the top schema
        (["sampler=prioritized", "+sampler.flor=0.1"], "sampler.flor: Key 'flor' not in 'PrioritizedSampler'"),
        (["+rollout.repeat.foo=1"], "rollout.repeat.foo: Key 'foo' not in 'Repeat'"),
        (["+host.foo=1"], "host.foo: Key 'foo' not in 'Host'"),
        (["+foo=1", "+model.bar=2"], "model.bar, foo: unknown keys (not in Model, K15TrainConfig)"),
        (["-m", "algorithm=kimi_md,grpo", "+algorithm.foo=1"], "algorithm.foo: Key 'foo' not in 'KimiMDAlgorithm'"),
    ],
)
def test_unknown_keys_added_with_plus_fail_in_one_line(tmp_path, monkeypatch, capsys, args, expected):
    """``+key=value`` lifts struct mode for the key it adds: without the schema walk the run went on silently."""
    code, stderr = main_before_the_job(args, tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, expected, tmp_path)


def test_plus_still_adds_hydra_keys_and_openrlhf_flags(composer):
    from k15_plugin.cli.schema import unknown_keys
    from k15_plugin.cli.train import check_overrides

    cfg = composer(["host=openrlhf", "+host.flags.actor.foo=1", "+host.flags.bar=x"])
    assert cfg.host.flags.actor.foo == 1 and unknown_keys(cfg) == []
    assert unknown_keys(composer(["+trainer.foo=1", "+host.flags.bar=x"])) == [("trainer.foo", "Trainer")]
    check_overrides(["+host.flags.foo=1", "+hydra.job.env_set.K15_TEST=1"])  # no error (it resets Hydra: last)


def test_host_openrlhf_without_openrlhf_says_so_once(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openrlhf" else find_spec(name, *a)
    )
    code, stderr = main_before_the_job(["host=openrlhf"], tmp_path, monkeypatch, capsys)
    expected = "OpenRLHF is not installed: pip install 'k15-plugin[openrlhf]' (README: OpenRLHF)"
    assert_one_line(code, stderr, expected, tmp_path)
    assert stderr.strip() == f"k15-train: error: {expected}"  # once: it was "OpenRLHF OpenRLHF is not installed"


@pytest.mark.skipif(importlib.util.find_spec("verl") is not None, reason="verl is installed here")
def test_host_verl_without_verl_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    code, stderr = main_before_the_job(["host=verl"], tmp_path, monkeypatch, capsys)
    expected = "verl is not installed: pip install 'k15-plugin[verl]' (README: verl)"
    assert_one_line(code, stderr, expected, tmp_path)
    assert stderr.strip() == f"k15-train: error: {expected}"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _progress_of_a_run(stream, run_dir, monkeypatch, steps=4, logging_steps=2):
    """What the run-files callback writes to standard error (``stream``) over a run of ``steps`` steps."""
    from types import SimpleNamespace

    from k15_plugin.cli.run_files import RunFilesCallback

    monkeypatch.setattr(sys, "stderr", stream)
    evaluate = lambda limit: {"accuracy": 0.5, "mean_completion_tokens": 3.0}  # noqa: E731
    callback = RunFilesCallback(run_dir, evaluate, eval_steps=0, eval_size=1, is_main=True)
    args, state = SimpleNamespace(logging_steps=logging_steps), SimpleNamespace(max_steps=steps, global_step=0)
    callback.on_train_begin(args, state, None)
    for step in range(1, steps + 1):
        state.global_step = step
        callback.on_step_end(args, state, None)
        if step % logging_steps == 0:  # the trainer logs after the step's callbacks
            callback.on_log(args, state, None, logs={"reward": step / 8, "completions/mean_length": 3.0})
    callback.on_train_end(args, state, None)
    return callback, stream.getvalue()


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    """In a log file (> train.log, nohup, CI) the bar's carriage-return redraws made one endless line."""
    _, written = _progress_of_a_run(io.StringIO(), tmp_path, monkeypatch)
    assert "\r" not in written
    lines = written.splitlines()
    assert lines[0].startswith("k15: step 0/4 (0%), 00:00 elapsed")
    assert [line.split(",")[0] for line in lines] == [
        "k15: step 0/4 (0%)",
        "k15: step 2/4 (50%)",
        "k15: step 4/4 (100%)",
    ]
    assert lines[1].endswith("reward=0.25, len=3") and " left, " in lines[1]  # the figures of the step's own log
    assert lines[2].endswith("reward=0.5, len=3")


def test_progress_line_every_30_seconds_between_logging_steps():
    from k15_plugin.cli.progress import LineProgress

    now = [0.0]
    stream = io.StringIO()
    progress = LineProgress(100, 0, 50, stream, clock=lambda: now[0])
    for _ in range(3):
        now[0] += 20
        progress.update(1)
    progress.close()
    steps = [line.split(",")[0] for line in stream.getvalue().splitlines()]
    assert steps == ["k15: step 0/100 (0%)", "k15: step 2/100 (2%)", "k15: step 3/100 (3%)"]  # at 40 s, then the end
    assert "00:40 elapsed, 32:40 left" in stream.getvalue().splitlines()[1]


def test_progress_bar_stays_on_a_terminal(tmp_path, monkeypatch):
    from tqdm.auto import tqdm

    callback, written = _progress_of_a_run(_Terminal(), tmp_path, monkeypatch)
    assert isinstance(callback.bar, tqdm)
    assert "\r" in written and "4/4" in written and "reward=0.5" in written


def test_plots_are_skipped_in_one_line_without_matplotlib(tmp_path, monkeypatch, capsys):
    """The offline GPU check's machine has no matplotlib (bench/gpu_wheels.sh leaves it out): the run still ends."""
    from k15_plugin.cli.run_files import write_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    figures = {"accuracy": 0.5}
    assert write_plots(tmp_path, figures, figures, 4) is None
    assert capsys.readouterr().err == "k15-train: curves.png not written: matplotlib is not installed\n"
    assert not (tmp_path / "curves.png").exists()


def test_multirun_demo_writes_a_run_directory_per_algorithm(tmp_path):
    """A real ``k15-train -m`` process: kimi_md and GRPO side by side, each with its own complete run directory."""
    sweep = tmp_path / "sweep"
    result = _cli(
        [
            "-m",
            "algorithm=kimi_md,grpo",
            "trainer.max_steps=4",
            "trainer.eval_steps=2",
            "trainer.logging_steps=1",
            "trainer.eval_size=50",
            "data.heldout_size=100",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = {json.loads(p.read_text())["algorithm"]: p.parent for p in sweep.glob("*/summary.json")}
    assert sorted(run_dirs) == ["grpo", "kimi_md"]
    for algorithm, run_dir in run_dirs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        for key in (
            "eval_accuracy_before",
            "eval_accuracy_after",
            "mean_completion_tokens_before",
            "mean_completion_tokens_after",
            "train_samples",
            "wall_seconds",
        ):
            assert key in summary, (algorithm, key)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert any("heldout/accuracy" in r for r in records), algorithm
        assert (run_dir / "curves.png").stat().st_size > 1000
        assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert str(run_dir) in result.stdout
        final = run_dir / "final_model"  # the trained model, loadable as model.path of a later run
        assert summary["final_model"] == str(final) and not (run_dir / "final_model.tmp").exists()
        from k15_plugin.data.arithmetic import evaluate_greedy, load_demo_checkpoint, make_datasets

        model, tokenizer = load_demo_checkpoint(final)
        heldout = make_datasets(seed=0, heldout_size=100)[1]  # the run's held-out rows
        assert evaluate_greedy(model, tokenizer, heldout)["accuracy"] == summary["eval_accuracy_after"]
        if algorithm == "grpo":  # one step per rollout batch of 128
            assert summary["train_samples"] == 4 * 128
            continue
        # kimi_md's default: 2 passes over each rollout batch of 128, so 4 steps are 2 rollout batches
        assert summary["train_samples"] == 2 * 128
        assert [r["step"] for r in records if "k15/policy_loss" in r] == [1, 2, 3, 4]
        # the squared term works on the second step of each rollout batch (pi_theta has moved away from pi_i)
        assert [r["k15/l2_loss"] > 0 for r in records if "k15/l2_loss" in r] == [False, True, False, True]
    assert result.stdout.count("held-out accuracy") == 2


def test_wheel_ships_the_configs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("k15_plugin-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in CONF.rglob("*.yaml"):
        assert f"k15_plugin/conf/{path.relative_to(CONF).as_posix()}" in names, path
    assert "k15_plugin/data/demo_checkpoint/config.json" in names


def test_distributed_launch_shares_one_run_directory(tmp_path):
    """Two CPU processes under torchrun (gloo; `accelerate launch` starts GPU processes the same way): one run
    directory, written by the main process only."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "k15_plugin.cli.train",
            "launcher=accelerate_ddp",
            "launcher.num_processes=2",
            "trainer.max_steps=2",
            "trainer.eval_steps=0",
            "trainer.per_device_train_batch_size=64",
            "trainer.save_steps=2",
            "data.heldout_size=100",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").iterdir()  # both processes resolved the same directory
    summary = json.loads((run_dir / "summary.json").read_text())
    # 2 processes x 64 completions per rollout batch, 2 steps on it (kimi_md's num_iterations)
    assert summary["train_samples"] == 128 and summary["steps"] == 2
    # the held-out evaluation ran sharded over both processes and gathered: the same figure as one process's
    from k15_plugin.data.arithmetic import evaluate_greedy, load_demo_checkpoint, make_datasets

    model, tokenizer = load_demo_checkpoint()
    _, heldout = make_datasets(seed=0, heldout_size=100)
    assert summary["eval_accuracy_before"] == pytest.approx(evaluate_greedy(model, tokenizer, heldout)["accuracy"])
    assert (run_dir / "checkpoint-2").is_dir()
    assert result.stdout.count("held-out accuracy") == 1  # the final line comes from the main process only


def test_use_cpu_under_a_deepspeed_launch_is_refused(tmp_path, monkeypatch, capsys):
    """accelerate's cpu=True skips DeepSpeed: the run would be plain CPU DDP under a DeepSpeed config."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    code, stderr = main_before_the_job(["launcher=accelerate_deepspeed_zero3"], tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, "trainer.use_cpu=true turns DeepSpeed off", tmp_path)


def test_deepspeed_without_a_gpu_runs_over_gloo(composer, monkeypatch):
    """accelerate 1.16 has no default backend for the CPU and would count one process; DeepSpeed's CPU accelerator
    uses gloo (tests/test_deepspeed_cpu.py runs it)."""
    import torch

    from k15_plugin.cli.hosts.trl import training_spec

    cfg = composer(["launcher=accelerate_deepspeed_zero3", "trainer.use_cpu=false"])
    assert "ddp_backend" not in training_spec(cfg, "unused").kwargs  # not launched with DeepSpeed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    expected = "gloo" if torch.accelerator.current_accelerator() is None else None
    assert training_spec(cfg, "unused").kwargs.get("ddp_backend") == expected


def test_demo_vision_trains_end_to_end(tmp_path):
    """A real ``k15-train experiment=demo_vision`` process on image prompts, with the curriculum sampler (it reads the
    clutter level as the difficulty column): the LLaVA model and its processor load, the held-out pictures are scored
    before and after, and the run directory is complete."""
    run_dir = tmp_path / "run"
    result = _cli(
        [
            "experiment=demo_vision",
            "sampler=curriculum",
            "trainer.max_steps=4",
            "trainer.eval_steps=2",
            "trainer.logging_steps=1",
            "trainer.eval_size=30",
            "data.num_train=200",
            "data.heldout_size=60",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["heldout_size"] == 60
    assert 0 < summary["eval_accuracy_before"] < 1 and summary["mean_completion_tokens_before"] > 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("heldout/accuracy" in r for r in records)
    assert (run_dir / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("host", ["verl", "openrlhf"])
def test_image_tasks_are_refused_on_the_ray_hosts(composer, host):
    """Both Ray doors write text rows only: an image task stops in one line (check_ranges runs in both doors)."""
    from k15_plugin.cli.build import check_image_task, check_ranges

    cfg = composer(["experiment=demo_vision", f"host={host}"])
    for check in (check_image_task, check_ranges):
        with pytest.raises(ConfigError, match=f"host={host} with data.source=demo_vision .image prompts.: k15-train"):
            check(cfg)
