"""``k15-curate`` (paper section 2.1): each command end to end on the demo model, resuming, the curriculum hand-off."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import k15_plugin.curate as curate_module
import k15_plugin.jobs as jobs
from k15_plugin.curate import CurationError, curate, main, question_type
from k15_plugin.data.arithmetic import make_datasets
from k15_plugin.data.build.warm_start import build_tokenizer, tiny_test_model
from k15_plugin.jobs import Sidecar

torch.set_num_threads(1)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def arithmetic_jsonl(tmp_path):
    train, _ = make_datasets(num_train=6, seed=3)
    return _write(tmp_path / "prompts.jsonl", [{**row, "source": "demo"} for row in train])


def _difficulty(inp, out, *extra):
    return [
        "difficulty",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--model",
        "tiny_demo",
        "--n",
        "2",
        "--quiet",
        "--batch-size",
        "2",
        *extra,
    ]


# ----------------------------------------------------------------------------------------------------------------------
# difficulty
# ----------------------------------------------------------------------------------------------------------------------


def test_difficulty_end_to_end(arithmetic_jsonl, tmp_path):
    out = tmp_path / "rated.jsonl"
    summary = curate(_difficulty(arithmetic_jsonl, out, "--n", "4"))
    assert summary["complete"] and summary["processed"] == 6 and summary["resumed"] == 0
    assert summary["backend"] == "transformers"  # auto: the demo model never goes to vLLM without --backend vllm
    rows = _read(out)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in _read(arithmetic_jsonl)]  # order and columns kept
    for row in rows:
        assert row["source"] == "demo"
        assert row["pass_rate"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 samples
        assert row["difficulty"] == pytest.approx(1.0 - row["pass_rate"])
    assert not (tmp_path / "rated.jsonl.partial.jsonl").exists()  # the sidecar goes once the output is written


@pytest.mark.xdist_group("vllm_cpu")  # with the other vLLM engines, on one pytest-xdist worker
def test_difficulty_through_vllm_cpu(tmp_path):
    """``--backend vllm`` on vLLM's CPU build, the shipped demo checkpoint, 16 prompts x 8 samples. Two identical runs,
    each in its own process as the command runs (both at once), give the same labels: the samples are seeded per
    chunk, which resuming relies on. The labels are sane: multiples of 1/8, difficulty = 1 - pass_rate, and a mean
    pass rate within 0.15 of the transformers backend's on the same prompts (the same model and sampling; vLLM
    computes in bf16, and the two draw different samples). Fails, not skips, when vLLM is missing."""
    train, _ = make_datasets(num_train=16, seed=3)
    inp = _write(tmp_path / "prompts.jsonl", list(train))
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    options = ("--n", "8", "--batch-size", "64")
    outs = [tmp_path / "vllm_a.jsonl", tmp_path / "vllm_b.jsonl"]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "k15_plugin.curate", *_difficulty(inp, out, *options, "--backend", "vllm")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    try:
        reference = curate(_difficulty(inp, tmp_path / "hf.jsonl", *options, "--backend", "transformers"))
        results = [run.communicate(timeout=1200) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    for run, (stdout, stderr) in zip(runs, results, strict=True):
        assert run.returncode == 0, stderr[-4000:]
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["backend"] == "vllm" and summary["complete"] and summary["processed"] == 16, summary
    first, second = (_read(out) for out in outs)
    assert first == second  # seeded
    assert [r["prompt"] for r in first] == [r["prompt"] for r in train]
    for row in first:
        assert row["pass_rate"] * 8 == int(row["pass_rate"] * 8)
        assert row["difficulty"] == pytest.approx(1.0 - row["pass_rate"])
    mean = sum(r["pass_rate"] for r in first) / 16
    assert reference["backend"] == "transformers"
    assert 0 < mean < 1 and abs(mean - reference["mean_pass_rate"]) <= 0.15, (mean, reference)


def test_difficulty_with_the_math_reward(arithmetic_jsonl, tmp_path):
    out = tmp_path / "rated.jsonl"
    summary = curate(_difficulty(arithmetic_jsonl, out, "--reward", "math", "--extraction", "last_number"))
    assert summary["complete"] and len(_read(out)) == 6


def test_stop_and_resume_processes_only_the_rest(arithmetic_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "rated.jsonl"
    first = curate(_difficulty(arithmetic_jsonl, out, "--stop-after", "3"))
    assert not first["complete"] and first["processed"] == 3 and not out.exists()
    sidecar = tmp_path / "rated.jsonl.partial.jsonl"
    lines = sidecar.read_text().splitlines()
    assert len(lines) == 1 + 3 and "k15_curate_job" in lines[0]
    done_before = {json.loads(line)["index"]: json.loads(line)["pass_rate"] for line in lines[1:]}

    seen = []
    real_sample = jobs.Generator.sample

    def spy(self, prompts, n, seed):
        seen.extend(prompts)
        return real_sample(self, prompts, n, seed)

    monkeypatch.setattr(jobs.Generator, "sample", spy)
    second = curate(_difficulty(arithmetic_jsonl, out))
    assert second["complete"] and second["resumed"] == 3 and second["processed"] == 3
    prompts = [r["prompt"] for r in _read(arithmetic_jsonl)]
    assert sorted(seen) == sorted(prompts[3:])  # only the unfinished prompts were generated for
    rows = _read(out)
    assert len(rows) == 6 and all("difficulty" in r for r in rows)
    assert {i: rows[i]["pass_rate"] for i in done_before} == done_before  # finished work reused as it was


def test_crash_mid_run_then_resume(arithmetic_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "rated.jsonl"
    real_sample = jobs.Generator.sample
    calls = {"n": 0}

    def crash_on_third_batch(self, prompts, n, seed):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C (or the job was killed) mid-run
        return real_sample(self, prompts, n, seed)

    monkeypatch.setattr(jobs.Generator, "sample", crash_on_third_batch)
    with pytest.raises(SystemExit) as exit_info:
        main(_difficulty(arithmetic_jsonl, out))  # batch-size 2 / n 2 = one prompt per batch
    assert exit_info.value.code == 130 and not out.exists()
    sidecar = tmp_path / "rated.jsonl.partial.jsonl"
    with open(sidecar, "a") as f:
        f.write('{"index": 5, "pass_')  # a torn line, as a kill during a write leaves it
    monkeypatch.setattr(jobs.Generator, "sample", real_sample)
    summary = curate(_difficulty(arithmetic_jsonl, out))
    assert summary["resumed"] == 2 and summary["processed"] == 4 and len(_read(out)) == 6


def test_a_sidecar_from_another_job_is_refused(arithmetic_jsonl, tmp_path):
    out = tmp_path / "rated.jsonl"
    curate(_difficulty(arithmetic_jsonl, out, "--stop-after", "1"))
    with pytest.raises(CurationError, match="different job"):
        curate(_difficulty(arithmetic_jsonl, out, "--n", "3"))
    summary = curate(_difficulty(arithmetic_jsonl, out, "--n", "3", "--restart"))
    assert summary["complete"] and summary["resumed"] == 0


def test_stop_after_exit_status(arithmetic_jsonl, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_difficulty(arithmetic_jsonl, tmp_path / "o.jsonl", "--stop-after", "0"))
    assert exit_info.value.code == jobs.EXIT_INCOMPLETE
    assert json.loads(capsys.readouterr().out)["complete"] is False


def test_difficulty_feeds_the_curriculum_sampler(arithmetic_jsonl, tmp_path):
    from k15_plugin.trl import K15GRPOConfig, K15GRPOTrainer
    from k15_plugin.trl.samplers import CurriculumSampler

    out = tmp_path / "rated.jsonl"
    curate(_difficulty(arithmetic_jsonl, out))
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["answer"], "difficulty": r["difficulty"]} for r in _read(out)]
    )
    tokenizer = build_tokenizer()
    args = K15GRPOConfig(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        max_steps=1,
        sampler_type="curriculum",
        curriculum_switch_step=0,
        curriculum_hard_fraction=0.5,
    )
    trainer = K15GRPOTrainer(
        model=tiny_test_model(tokenizer),
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, CurriculumSampler)
    assert sampler.difficulty.tolist() == pytest.approx(dataset["difficulty"])
    hardest = set(torch.sort(sampler.difficulty, stable=True).indices[-3:].tolist())
    assert set(list(sampler)) <= hardest  # from the switch step on: only the hardest half


# ----------------------------------------------------------------------------------------------------------------------
# easy-to-hack
# ----------------------------------------------------------------------------------------------------------------------


def test_easy_to_hack_end_to_end(arithmetic_jsonl, tmp_path):
    out = tmp_path / "kept.jsonl"
    argv = [
        "easy-to-hack",
        "--input",
        str(arithmetic_jsonl),
        "--output",
        str(out),
        "--model",
        "tiny_demo",
        "--tries",
        "2",
        "--quiet",
    ]
    summary = curate(argv)
    kept = _read(out)
    assert summary["kept"] == len(kept) and summary["kept"] + summary["dropped_easy_to_hack"] == 6
    assert all(row in _read(arithmetic_jsonl) for row in kept)


def test_easy_to_hack_drops_exactly_the_guessed_prompts(arithmetic_jsonl, tmp_path, monkeypatch):
    rows = _read(arithmetic_jsonl)
    guessable = {rows[1]["answer"], rows[4]["answer"]}

    def fake_scorer(kind, tokenizer, extraction):
        # Right on the last of the 8 guesses for two answers: "within N attempts" means any of them.
        return lambda samples, answer: [0.0] * (len(samples) - 1) + [float(answer in guessable)]

    monkeypatch.setattr(curate_module, "make_scorer", fake_scorer)
    out = tmp_path / "kept.jsonl"
    summary = curate(
        ["easy-to-hack", "--input", str(arithmetic_jsonl), "--output", str(out), "--model", "tiny_demo", "--quiet"]
    )
    assert summary["dropped_easy_to_hack"] == 2
    assert _read(out) == [r for i, r in enumerate(rows) if i not in (1, 4)]


# ----------------------------------------------------------------------------------------------------------------------
# filter
# ----------------------------------------------------------------------------------------------------------------------

FILTER_CASES = [
    ("What is 17 * 3?", "51", None),
    ("Find the remainder when $2^{100}$ is divided by 7.", "2", None),
    ("Which is larger, 3^4 or 4^3? Give the larger value.", "81", None),
    ("What is 2+2?\n(A) 3\n(B) 4\n(C) 5\n(D) 6", "B", "multiple_choice"),
    ("$x^2=$ $\\textbf{(A)}\\ 2 \\qquad \\textbf{(B)}\\ 4 \\qquad \\textbf{(C)}\\ 8$", "4", "multiple_choice"),
    ("Which of the following numbers is prime: 4, 6, 7, 9?", "7", "multiple_choice"),
    ("Pick the answer.", "(C)", "multiple_choice"),
    ("True or false: every prime is odd.", "False", "true_false"),
    ("Is 91 a prime number?", "no", "true_false"),
    ("Prove that there are infinitely many primes.", "", "proof"),
    ("Show that $n^2 + n$ is even for every integer $n$.", "", "proof"),
]


@pytest.mark.parametrize("prompt, answer, reason", FILTER_CASES)
def test_question_type_rules(prompt, answer, reason):
    assert question_type(prompt, answer) == reason


def test_filter_end_to_end_with_counts(tmp_path):
    inp = _write(tmp_path / "raw.jsonl", [{"prompt": p, "answer": a} for p, a, _ in FILTER_CASES])
    out = tmp_path / "clean.jsonl"
    summary = curate(["filter", "--input", str(inp), "--output", str(out), "--quiet"])
    assert summary["kept"] == 3 and [r["prompt"] for r in _read(out)] == [p for p, _, r in FILTER_CASES if r is None]
    assert summary["dropped"] == {"multiple_choice": 4, "true_false": 2, "proof": 2}


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    inp = _write(tmp_path / "raw.jsonl", [{"question": "What is 1+1?", "answer": "2"}])
    with pytest.raises(SystemExit) as exit_info:
        main(["filter", "--input", str(inp), "--output", str(tmp_path / "o.jsonl")])
    assert exit_info.value.code == 2
    assert "--prompt-column" in capsys.readouterr().err
    summary = curate(
        ["filter", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--prompt-column", "question", "--quiet"]
    )
    assert summary["kept"] == 1


def test_sidecar_keeps_finished_records_across_reopen(tmp_path):
    job = {"command": "x"}
    sidecar = Sidecar(tmp_path / "o.jsonl", job)
    sidecar.add({0: {"v": 1}, 2: {"v": 3}})
    sidecar.close()
    again = Sidecar(tmp_path / "o.jsonl", job)
    assert again.done == {0: {"v": 1}, 2: {"v": 3}}
    again.remove()
    assert not (tmp_path / "o.jsonl.partial.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "--input {path}: no such file"),
        ('{"prompt": "1+1=", "answer": "2"}\n[1, 2]\n', "{path}:2: expected a JSON object, got list"),
        ('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n', "{path}:2: not JSON"),
        (b'{"prompt": "caf\xe9=", "answer": "2"}\n', "{path}:1: not valid UTF-8 (byte 0xe9"),
    ],
)
def test_a_bad_input_file_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "in.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["filter", "--input", str(path), "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("k15-curate: error: ") and message.format(path=path) in err[0]
    assert not (tmp_path / "out.jsonl").exists()
