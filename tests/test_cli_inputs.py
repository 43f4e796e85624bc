"""Bad data, model directories and checkpoints fail before Hydra starts the job: one line, exit 2, no run directory.

Every case goes through ``k15_plugin.cli.train.main`` (the ``k15-train`` entry point) in this process, with the job
itself replaced by a failure, so nothing can start; two headline cases also run as real ``k15-train`` processes
(in parallel: each one spends most of its time importing torch, transformers and TRL).
"""

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import assert_one_line, hydra_dirs, main_before_the_job
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from k15_plugin.cli.inputs import check_inputs
from k15_plugin.cli.train import _register, config_dir
from k15_plugin.errors import ConfigError

GOOD = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(40)]
TESTS = [{"input": "1 2\n", "output": "3\n"}]


def _lines(rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _with(i, row, rows=GOOD):
    """``rows`` with row ``i`` (0-based, so file line i + 1) replaced."""
    return [*rows[:i], row, *rows[i + 1 :]]


def _write(directory, files):
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _checkpoint(directory, config=None):
    directory.mkdir(parents=True)
    (directory / "trainer_state.json").write_text('{"global_step": 2}')
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


QWEN = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 24}

JSONL = ["data=jsonl", "data.path={tmp}/train.jsonl"]


def _case(name, train, expected, *overrides, files=()):
    """A JSONL run with ``train`` as train.jsonl (text or bytes); ``{tmp}`` in overrides/expected is the test's dir."""
    return pytest.param({"train.jsonl": train, **dict(files)}, [*JSONL, *overrides], expected, id=name)


CASES = [
    _case(
        "bad_json",
        _lines(_with(6, '{"prompt": "1+1=" "answer": "2"}')),
        "data.path={tmp}/train.jsonl:7: not valid JSON (Expecting ',' delimiter at column 19)",
    ),
    _case(
        "no_prompt_column",
        _lines(_with(2, {"question": "1+1=", "answer": "2"})),
        'train.jsonl:3: no "prompt" field (data.prompt_column=prompt); the row has "question", "answer"',
    ),
    _case("empty_file", "", "data.path={tmp}/train.jsonl: no rows (the file is empty)"),
    _case("only_blank_lines", "\n  \n\n", "train.jsonl: no rows (the file has only blank lines)"),
    _case(
        "code_without_tests",
        _lines(GOOD),
        'train.jsonl:1: no "tests" field, which reward.verifier=code runs',
        "reward=code",
    ),
    _case(
        "invalid_utf8",
        _lines(GOOD[:4]).encode() + b'{"prompt": "caf\xe9", "answer": "1"}\n',
        "train.jsonl:5: not valid UTF-8 (byte 0xe9 at byte 16 of the line)",
    ),
    _case("array_line", _lines(_with(1, ["1+1=", "2"])), "train.jsonl:2: the line is an array, expected one JSON"),
    _case(
        "number_prompt",
        _lines(_with(3, {"prompt": 42, "answer": "2"})),
        'train.jsonl:4: "prompt" is a number (42), expected a non-empty string',
    ),
    _case("null_prompt", _lines(_with(0, {"prompt": None, "answer": "2"})), 'train.jsonl:1: "prompt" is null'),
    _case(
        "empty_prompt", _lines(_with(5, {"prompt": "  ", "answer": "2"})), 'train.jsonl:6: "prompt" is an empty string'
    ),
    _case(
        "chat_list_prompt",
        _lines(_with(0, {"prompt": [{"role": "user", "content": "hi"}], "answer": "2"})),
        'train.jsonl:1: "prompt" is a list; expected a string',
    ),
    _case(
        "missing_answer",
        _lines(_with(9, {"prompt": "1+1="})),
        'train.jsonl:10: no "answer" field (data.answer_column=answer); the row has "prompt"',
    ),
    _case("list_answer", _lines(_with(1, {"prompt": "1+1=", "answer": [2]})), 'train.jsonl:2: "answer" is a list'),
    _case(
        "nan_difficulty",
        _lines(GOOD[:2]) + '{"prompt": "x", "answer": "1", "difficulty": NaN}\n',
        'train.jsonl:3: "difficulty" is NaN, expected a finite number',
    ),
    _case(
        "string_difficulty",
        _lines(_with(0, {"prompt": "x", "answer": "1", "difficulty": "hard"})),
        'train.jsonl:1: "difficulty" is a string ("hard"), expected a finite number',
    ),
    _case(
        "curriculum_missing_difficulty",
        _lines([*[{**r, "difficulty": 0.5} for r in GOOD[:3]], *GOOD[3:]]),
        'train.jsonl:4: no "difficulty" field, which sampler=curriculum reads from every row',
        "sampler=curriculum",
    ),
    _case(
        "malformed_tests",
        _lines([*[{"prompt": f"p{i}", "tests": TESTS} for i in range(3)], {"prompt": "p", "tests": [{"input": "1"}]}]),
        'train.jsonl:4: "tests" item 1 has no "output"',
        "reward=code",
    ),
    _case(
        "too_few_rows",
        _lines(GOOD[:10]),
        "data.path={tmp}/train.jsonl: 8 training prompts (10 rows, 2 held out: data.heldout_size=200, at most a "
        "fifth of the rows), but one generation batch needs",
        "trainer.per_device_train_batch_size=128",
        "trainer.num_generations=8",
    ),
    _case("num_train_too_small", _lines(GOOD), "data.num_train=5: 5 training prompts", "data.num_train=5"),
    _case(
        "heldout_file_bad_line",
        _lines(GOOD),
        "data.heldout_split={tmp}/held.jsonl:2: not valid JSON",
        "data.heldout_split={tmp}/held.jsonl",
        files={"held.jsonl": _lines(GOOD[:1]) + "{oops\n"}.items(),
    ),
    _case("heldout_not_a_file", _lines(GOOD), "data.heldout_split='test' is not a file", "data.heldout_split=test"),
    _case(
        "bad_prompt_template",
        _lines(GOOD),
        "data.prompt_template='Q: {{x}}': unknown field {{x}}",
        "data.prompt_template='Q: {{x}}'",
    ),
    _case("multirun_bad_line", _lines(_with(6, "{")), "train.jsonl:7: not valid JSON", "-m", "algorithm=kimi_md,grpo"),
    pytest.param(
        {"model/weights.bin": ""},
        ["model.path={tmp}/model"],
        "model.path='{tmp}/model' has no config.json",
        id="model_path_without_config",
    ),
    pytest.param(  # was a traceback after the model loaded, leaving a run directory
        {},
        ["reward=code"],
        "reward.verifier=code reads a `tests` column ([{{'input': str, 'output': str}}, ...] per row), but "
        "data=demo_arithmetic has only ['prompt', 'answer', 'difficulty']",
        id="code_reward_on_demo_data",
    ),
    pytest.param(
        {},
        ["data=demo_sum3", "reward=code"],
        "reward.verifier=code reads a `tests` column ([{{'input': str, 'output': str}}, ...] per row), but "
        "data=demo_sum3 has only ['prompt', 'answer']",
        id="code_reward_on_demo_sum3_data",
    ),
]


@pytest.mark.parametrize("files, args, expected", CASES)
def test_bad_input_fails_in_one_line_before_hydra(tmp_path, monkeypatch, capsys, files, args, expected):
    _write(tmp_path, files)
    code, stderr = main_before_the_job([a.format(tmp=tmp_path) for a in args], tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, expected.format(tmp=tmp_path), tmp_path)


HEADLINE = ["bad_json", "code_without_tests"]  # each was a traceback and exit 1 before


@pytest.fixture(scope="module")
def headline_runs(tmp_path_factory):
    """The headline cases as real ``k15-train`` processes, started together; case id -> (dir, process, stderr)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    started = {}
    for case in (c for c in CASES if c.id in HEADLINE):
        files, args, expected = case.values
        directory = tmp_path_factory.mktemp(case.id)
        _write(directory, files)
        command = [
            sys.executable,
            "-m",
            "k15_plugin.cli.train",
            *[a.format(tmp=directory) for a in args],
            *hydra_dirs(directory),
        ]
        started[case.id] = (
            directory,
            expected.format(tmp=directory),
            subprocess.Popen(
                command, cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
        )
    done = {}
    try:
        for case_id, (directory, expected, process) in started.items():
            stdout, stderr = process.communicate(timeout=900)  # a loaded 2-core machine: minutes of imports each
            done[case_id] = directory, expected, process.returncode, stdout, stderr
    finally:
        for _, _, process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return done


@pytest.mark.xdist_group("cli_headline")  # one worker starts the processes once
@pytest.mark.parametrize("case_id", HEADLINE)
def test_headline_cases_as_a_real_process(headline_runs, case_id):
    directory, expected, code, stdout, stderr = headline_runs[case_id]
    assert_one_line(code, stderr, expected, directory)
    assert "Traceback" not in stdout


def test_resume_from_a_checkpoint_of_another_model_fails(tmp_path, monkeypatch, capsys):
    ckpt = _checkpoint(tmp_path / "checkpoint-2", QWEN)
    code, stderr = main_before_the_job([f"trainer.resume_from_checkpoint={ckpt}"], tmp_path, monkeypatch, capsys)
    expected = (
        f"trainer.resume_from_checkpoint='{ckpt}' is a checkpoint of another model (model_type=qwen2, "
        "vocab_size=151936, hidden_size=896, num_hidden_layers=24) than model.name=tiny_demo (model_type=llama, "
        "vocab_size=16, hidden_size=128, num_hidden_layers=2)"
    )
    assert_one_line(code, stderr, expected, tmp_path)


def test_resume_from_a_directory_that_is_not_a_checkpoint_fails(tmp_path, monkeypatch, capsys):
    run = tmp_path / "outputs" / "old"
    for step in (2, 10):
        _checkpoint(run / f"checkpoint-{step}")
    expected = f"has no trainer_state.json, so it is not a trainer checkpoint; did you mean {run}/checkpoint-10?"
    code, stderr = main_before_the_job([f"trainer.resume_from_checkpoint={run}"], tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, expected, tmp_path)


def test_duplicates_warn_once_per_multirun_and_a_later_variant_still_fails(tmp_path, monkeypatch, capsys):
    # 20 distinct prompts; rows 21-23 repeat rows 1, 2, 1. Variant 1 (8 completions = 1 prompt per batch) passes with
    # the warning; variant 2 (800 completions = 100 prompts) fails on the 16 training prompts left. The file is read
    # once, so the warning comes once.
    (tmp_path / "train.jsonl").write_text(_lines([*GOOD[:20], GOOD[0], GOOD[1], GOOD[0]]))
    args = ["-m", *[a.format(tmp=tmp_path) for a in JSONL], "trainer.per_device_train_batch_size=8,800"]
    code, stderr = main_before_the_job(args, tmp_path, monkeypatch, capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 2, stderr
    assert lines[0] == (
        f"k15-train: warning: data.path={tmp_path}/train.jsonl: dropped 3 row(s) repeating an earlier prompt "
        "(first at lines 21, 22)"
    )
    assert lines[1].startswith(f"k15-train: error: data.path={tmp_path}/train.jsonl: 16 training prompts (20 rows")
    assert not (tmp_path / "sweep").exists()


# ------------------------------------------------------------------------------------------------ in-process
@pytest.fixture
def composer():
    _register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield lambda *overrides: compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()


def test_check_inputs_directly(tmp_path, composer):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(_lines([{**r, "answer": int(r["answer"]), "difficulty": i} for i, r in enumerate(GOOD)]))
    check_inputs(composer("data=jsonl", f"data.path={good}", "sampler=curriculum"))  # number answers are fine
    check_inputs(composer())  # the demo needs no file
    bad.write_text(_lines(_with(1, {"prompt": "x", "answer": "1", "difficulty": float("inf")})))
    with pytest.raises(ConfigError, match=r'bad\.jsonl:2: "difficulty" is Infinity'):
        check_inputs(composer("data=jsonl", f"data.path={bad}"))
    with pytest.raises(ConfigError, match=r"sampler\.difficulty_column='level' is not supported"):
        check_inputs(composer("sampler=curriculum", "sampler.difficulty_column=level"))
    with pytest.raises(ConfigError, match=r"data\.num_train=3: one generation batch needs 16 distinct prompts"):
        check_inputs(composer("data.num_train=3"))
    lora = _checkpoint(tmp_path / "lora" / "checkpoint-1")  # no config.json (an adapter): nothing to compare
    check_inputs(composer(f"trainer.resume_from_checkpoint={lora}"))
    hub = _checkpoint(tmp_path / "hub" / "checkpoint-1", QWEN)  # a Hub model not on disk: no comparison, no error
    check_inputs(
        composer("model=qwen2.5_0.5b", "model.name=k15-test/not-downloaded", f"trainer.resume_from_checkpoint={hub}")
    )


def test_math_reward_on_demo_data_passes_the_check_and_loads(composer):
    """reward=math scores the demo's number answers (reward=code has no test cases there and is refused)."""
    from k15_plugin.data.tasks import load_task

    cfg = composer("reward=math")
    check_inputs(cfg)
    task = load_task(cfg.data, None, 0, 4, cfg.reward)
    assert task.reward_funcs[0](["46"], answer=["46"]) == [1.0]


# ------------------------------------------------------------------------------------------------ model and dataset
GSM8K = ["experiment=gsm8k_qwen0.5b", "trainer.bf16=false", "trainer.use_vllm=false"]


def _no_hub(monkeypatch, tmp_path, offline=False):
    """An empty HF_HOME in ``tmp_path``; the Hub unreachable (a closed local port) or HF_HUB_OFFLINE=1."""
    import datasets.config
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)  # and restored after the test, also where the check sets them
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once, on any machine
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the offline switches a cached run turns on
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tiny_model(directory):
    from k15_plugin.data.build.warm_start import build_tokenizer, tiny_test_model

    tokenizer = build_tokenizer()
    tiny_test_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("offline", [False, True], ids=["hub_unreachable", "hf_hub_offline"])
def test_a_hub_model_neither_cached_nor_reachable_fails_fast(tmp_path, monkeypatch, capsys, offline):
    """Loading retried for a minute, then an OSError traceback and a run directory were left."""
    import time

    _no_hub(monkeypatch, tmp_path, offline)
    start = time.monotonic()
    code, stderr = main_before_the_job(GSM8K, tmp_path, monkeypatch, capsys)
    seconds = time.monotonic() - start
    expected = f"model.name=Qwen/Qwen2.5-0.5B-Instruct: not a local path, not in the local cache ({tmp_path}/hf/hub)"
    assert_one_line(code, stderr, expected, tmp_path)
    assert "set model.path to a directory written by save_pretrained" in stderr and "HF_HUB_OFFLINE=1" in stderr
    assert ("HF_HUB_OFFLINE=1 keeps the Hugging Face Hub out" if offline else "Hub cannot be reached") in stderr
    assert seconds < 20, seconds  # composing and checking only: no retries

    model = _tiny_model(tmp_path / "model")  # the model on disk: the dataset is next
    code, stderr = main_before_the_job([*GSM8K, f"model.path={model}"], tmp_path, monkeypatch, capsys)
    expected = f"data.path=openai/gsm8k: not a local path, not in the local cache ({tmp_path}/hf/datasets)"
    assert_one_line(code, stderr, expected, tmp_path)
    assert "use data=jsonl data.path=<file>" in stderr


def test_a_local_or_cached_model_and_dataset_need_no_network(tmp_path, monkeypatch, capsys, composer):
    from transformers import AutoConfig

    from k15_plugin.cli.resolve import check_dataset_source, check_model_source, hub_cache

    _no_hub(monkeypatch, tmp_path)
    model = _tiny_model(tmp_path / "model")
    cfg = composer(*GSM8K, f"model.path={model}")
    check_inputs(cfg)
    assert check_model_source(cfg.model) == "path"
    assert check_model_source(composer(*GSM8K, f"model.name={model}").model) == "local"
    assert check_model_source(composer().model) == "demo"
    assert check_dataset_source(composer().data) == "demo"

    # a filled cache: the model as the Hub cache keeps it, the dataset as `datasets` prepares it
    repo = tmp_path / "hf" / "hub" / "models--k15-test--tiny"
    _tiny_model(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (tmp_path / "hf" / "datasets" / "openai___gsm8k" / "main" / "0.0.0" / ("1" * 40)).mkdir(parents=True)
    cached = composer(*GSM8K, "model.name=k15-test/tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()  # save_pretrained's progress bars
    assert check_model_source(cached.model) == "cache" and check_dataset_source(cached.data) == "cache"
    assert capsys.readouterr().err == ""

    monkeypatch.delenv("HF_HUB_OFFLINE")  # the Hub unreachable, no HF_HUB_OFFLINE: the cache, in offline mode
    assert check_model_source(cached.model) == "cache"
    assert "the Hugging Face Hub cannot be reached" in capsys.readouterr().err
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # so the loaders read the cache without retrying
    assert AutoConfig.from_pretrained("k15-test/tiny", cache_dir=hub_cache()).hidden_size == 64


def test_loader_loads_what_the_check_accepts(tmp_path, composer, capsys):
    from k15_plugin.data.tasks import load_task

    rows = [{"prompt": f"q{i}", "answer": i, "difficulty": i / 10} for i in range(30)]
    train = tmp_path / "train.jsonl"
    # blank lines, a byte-order mark, CRLF endings, number answers, duplicates (lines 33, 34 repeat q0, q1)
    train.write_bytes(
        b"\xef\xbb\xbf"
        + _lines(rows[:10]).replace("\n", "\r\n").encode()
        + b"\n\n"
        + _lines([*rows[10:], rows[0], {"prompt": "q1", "answer": "other"}]).encode()
    )
    cfg = composer("data=jsonl", f"data.path={train}", "data.heldout_size=4", "data.chat=false")
    check_inputs(cfg)
    assert "dropped 2 row(s) repeating an earlier prompt (first at lines 33, 34)" in capsys.readouterr().err
    task = load_task(cfg.data, None, 0, 8, cfg.reward)
    assert len(task.train) + len(task.heldout) == 30 and len(task.heldout) == 4
    assert not set(task.train["prompt"]) & set(task.heldout["prompt"])
    assert {p: a for p, a in zip(task.train["prompt"], task.train["answer"], strict=True)}["q12"] == "12"
    assert "difficulty" in task.train.column_names

    held = tmp_path / "held.jsonl"  # a second file: its prompts are dropped from training
    held.write_text(_lines([{"prompt": "q3", "answer": 3}, {"prompt": "new", "answer": 7}]))
    cfg = composer("data=jsonl", f"data.path={train}", f"data.heldout_split={held}", "data.chat=false")
    check_inputs(cfg)
    assert "dropped 1 row(s) whose prompt is in data.heldout_split (line 4)" in capsys.readouterr().err
    task = load_task(cfg.data, None, 0, 8, cfg.reward)
    assert sorted(task.heldout["prompt"]) == ["new", "q3"]
    assert len(task.train) == 29 and "q3" not in task.train["prompt"]

    partial = tmp_path / "partial.jsonl"  # difficulty in some rows only: accepted, and not passed on
    partial.write_text(_lines([{"prompt": "a", "answer": 1, "difficulty": 1}, *GOOD]))
    cfg = composer("data=jsonl", f"data.path={partial}")
    check_inputs(cfg)
    assert "difficulty" not in load_task(cfg.data, None, 0, 8, cfg.reward).train.column_names

    bad = tmp_path / "bad.jsonl"
    bad.write_text(_lines(_with(4, "[1]")))
    with pytest.raises(ConfigError, match=r"bad\.jsonl:5: the line is an array"):
        load_task(composer("data=jsonl", f"data.path={bad}").data, None, 0, 8, None)
