"""``k15-long2short`` (paper section 2.4) and the three-term task it is demonstrated on: every command on tiny models
in seconds, their resumes and refusals, and the checks against hand-computed values."""

import json

import pytest
import torch
from safetensors.torch import load_file

from k15_plugin.data.arithmetic import ArithmeticReward
from k15_plugin.data.build.warm_start import build_tokenizer, tiny_test_model
from k15_plugin.data.sum3 import FORMATS, completion, make_sum3_datasets
from k15_plugin.long2short.cli import main, run

torch.set_num_threads(1)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ids(tok, text):
    return [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]


def _error(args, capsys) -> str:
    """``k15-long2short args`` must exit 2 with one ``error:`` line on stderr; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("k15-long2short: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two saved tiny Llamas on the demo tokenizer (seeds 0 and 1) and one of another size."""
    root = tmp_path_factory.mktemp("models")
    tok = build_tokenizer()
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = tiny_test_model(tok, seed=seed)
        model.generation_config.max_new_tokens = 7
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    from k15_plugin.data.build.warm_start import build_model

    other = build_model(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    other.save_pretrained(root / "other")
    tok.save_pretrained(root / "other")
    paths["other"] = root / "other"
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# The three-term task
# ----------------------------------------------------------------------------------------------------------------------


def test_sum3_formats_and_reward():
    tok = build_tokenizer()
    reward = ArithmeticReward(tok, allow_steps=True)
    assert [completion(12, 34, 56, f) for f in FORMATS] == ["12+34+56=46+56=102", "46+56=102", "102"]
    for fmt in FORMATS:
        assert reward.score(_ids(tok, completion(12, 34, 56, fmt)), "102") == 1.0
        assert reward.score(_ids(tok, completion(12, 34, 56, fmt)), "103") == 0.0
    assert reward.score(_ids(tok, "46+56=101"), "102") == 0.0  # the answer after the last '=' decides
    assert reward.score(_ids(tok, "1+1=102"), "102") == 1.0  # only the answer is judged, as with a chain of thought
    assert reward.score(_ids(tok, "46.56=102"), "102") == 0.0  # work may hold digits, '+' and '=' only
    assert reward.score(_ids(tok, "46+56="), "102") == 0.0  # no answer after the last '='
    assert reward.score(_ids(tok, "46+56=102")[:-1], "102") == 0.0  # no EOS: cut off, not finished
    strict = ArithmeticReward(tok)
    assert strict.score(_ids(tok, "46+56=102"), "102") == 0.0 and strict.score(_ids(tok, "102"), "102") == 1.0


def test_sum3_datasets():
    train0, held0 = make_sum3_datasets(num_train=300, seed=0)
    train1, held1 = make_sum3_datasets(num_train=300, seed=1)
    assert list(held0["prompt"]) == list(held1["prompt"]) and len(held0) == 500  # the held-out set ignores the seed
    assert list(train0["prompt"]) != list(train1["prompt"])
    assert len(set(train0["prompt"])) == 300 and not set(train0["prompt"]) & set(held0["prompt"])
    for prompt, answer in zip(train0["prompt"], train0["answer"], strict=True):
        a, b, c = (int(x) for x in prompt.rstrip("=").split("+"))
        assert max(a, b, c) <= 99 and int(answer) == a + b + c


def test_shipped_sum3_checkpoints_match_their_records():
    """The long model is right far more often than the short one (the trade-off long2short manages), at the
    recorded greedy accuracy, and its long answers are what make it accurate."""
    from k15_plugin.data.arithmetic import evaluate_greedy, load_demo_checkpoint, read_warm_start_info
    from k15_plugin.data.sum3 import MAX_NEW_TOKENS, SUM3_LONG_CHECKPOINT_DIR, SUM3_SHORT_CHECKPOINT_DIR

    _, heldout = make_sum3_datasets(num_train=10)
    measured = {}
    for name, directory in (("long", SUM3_LONG_CHECKPOINT_DIR), ("short", SUM3_SHORT_CHECKPOINT_DIR)):
        model, tok = load_demo_checkpoint(directory)
        info = read_warm_start_info(directory)
        assert sum(f.stat().st_size for f in directory.iterdir()) < 3_000_000
        measured[name] = evaluate_greedy(model, tok, heldout, max_new_tokens=MAX_NEW_TOKENS, allow_steps=True)
        assert measured[name]["accuracy"] == pytest.approx(info["heldout_accuracy"], abs=0.01)
        assert measured[name]["mean_completion_tokens"] == pytest.approx(
            info["heldout_mean_completion_tokens"], abs=0.05
        )
    assert measured["long"]["accuracy"] > measured["short"]["accuracy"] + 0.2
    assert measured["long"]["mean_completion_tokens"] > 3 * measured["short"]["mean_completion_tokens"]
    formats = read_warm_start_info(SUM3_LONG_CHECKPOINT_DIR)["sampled_formats"]
    assert min(formats["verbose"]["accuracy"], formats["steps"]["accuracy"]) > 3 * formats["direct"]["accuracy"]


# ----------------------------------------------------------------------------------------------------------------------
# The chain task
# ----------------------------------------------------------------------------------------------------------------------


def test_chain_heldout_prompts_cover_every_k_first():
    from k15_plugin.long2short.data import task_prompts

    rows = task_prompts("demo_chain", None, "heldout", None).rows  # the chain's held-out rows come sorted by k
    assert len(rows) == 700 and {r["prompt"] for r in rows[:14]} != {r["prompt"] for r in rows[-14:]}
    assert [r["prompt"].count("+") + 1 for r in rows[:14]] == [2, 3, 4, 5, 6, 7, 8] * 2  # round-robin over k
    assert all(str(sum(map(int, r["prompt"][:-1].split("+")))) == r["answer"] for r in rows)


def test_chain_long_short_pair_is_built_once_and_reused(tmp_path):
    from k15_plugin.data.build.make_chain_long2short_checkpoints import _built, build, recipe

    small = {"long_steps": 1, "short_steps": 1, "measure_size": 7}
    first = build(tmp_path / "long", tmp_path / "short", **small)
    assert not first["reused"] and first["long"]["recipe"] == recipe(long_steps=1, short_steps=1)
    assert first["short"]["init_from"] == "long" and first["long"]["heldout_size"] == 7
    weights = (tmp_path / "short" / "model.safetensors").read_bytes()
    again = build(tmp_path / "long", tmp_path / "short", **small)
    assert again["reused"] and (tmp_path / "short" / "model.safetensors").read_bytes() == weights
    assert _built(tmp_path / "short", recipe(long_steps=1, short_steps=2)) is None  # another recipe: built anew


# ----------------------------------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------------------------------


def test_merge_is_the_weighted_average(tiny_models, tmp_path):
    a, b = load_file(tiny_models["a"] / "model.safetensors"), load_file(tiny_models["b"] / "model.safetensors")
    for weight in (0.5, 0.25, 1.0):
        out = tmp_path / f"m{weight}"
        summary = run(
            [
                "merge",
                "--long",
                str(tiny_models["a"]),
                "--short",
                str(tiny_models["b"]),
                "--output",
                str(out),
                "--weight-long",
                str(weight),
            ]
        )
        assert summary["weight_long"] == weight
        merged = load_file(out / "model.safetensors")
        assert set(merged) == set(a)
        for key in a:  # mergekit sums in its own order: equal to float rounding (bitwise at 0.5)
            expected = weight * a[key] + (1 - weight) * b[key]
            torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-7)
            assert weight != 0.5 or torch.equal(merged[key], expected)
    # generation config and tokenizer come from the long model, whatever mergekit would pick
    assert json.loads((tmp_path / "m0.5" / "generation_config.json").read_text())["max_new_tokens"] == 7
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "m0.5")("12+34=")["input_ids"] == [1, 4, 5, 13, 6, 7, 14]


def test_merge_reruns_and_refusals(tiny_models, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["merge", "--long", str(tiny_models["a"]), "--short", str(tiny_models["b"]), "--output", str(out)]
    run(args)
    assert run(args)["skipped"] == "already done"
    assert "another job" in _error([*args, "--weight-long", "0.3"], capsys)  # would silently replace: refused
    assert run([*args, "--weight-long", "0.3", "--overwrite"])["weight_long"] == 0.3
    line = _error(
        [
            "merge",
            "--long",
            str(tiny_models["a"]),
            "--short",
            str(tiny_models["other"]),
            "--output",
            str(tmp_path / "x"),
        ],
        capsys,
    )
    assert "--short" in line and "hidden_size" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    assert "not a directory" in _error(
        ["merge", "--long", str(tmp_path / "nope"), "--short", str(tiny_models["b"]), "--output", str(tmp_path / "y")],
        capsys,
    )
    assert "--base" in _error([*args, "--method", "ties", "--overwrite"], capsys)
    assert "--weight-long" in _error([*args, "--weight-long", "1.5"], capsys)
    assert "the same model" in _error(
        ["merge", "--long", str(tiny_models["a"]), "--short", str(tiny_models["a"]), "--output", str(tmp_path / "z")],
        capsys,
    )


def test_merge_refuses_a_different_tokenizer(tiny_models, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    changed = tmp_path / "b2"
    shutil.copytree(tiny_models["b"], changed)
    tok = AutoTokenizer.from_pretrained(changed)
    tok.add_special_tokens({"additional_special_tokens": ["<think>"]})
    tok.save_pretrained(changed)
    line = _error(
        ["merge", "--long", str(tiny_models["a"]), "--short", str(changed), "--output", str(tmp_path / "m")], capsys
    )
    assert "vocabulary" in line and "<think>" in line


# ----------------------------------------------------------------------------------------------------------------------
# sample, build-sft, build-dpo
# ----------------------------------------------------------------------------------------------------------------------


def _sample_args(model, out, *extra):
    return [
        "sample",
        "--model",
        str(model),
        "--task",
        "demo_sum3",
        "--num-prompts",
        "6",
        "--n",
        "3",
        "--batch-size",
        "6",
        "--quiet",
        "--output",
        str(out),
        *extra,
    ]


def test_sample_scores_with_the_task_reward_and_resumes(tmp_path):
    out = tmp_path / "samples.jsonl"
    summary = run(_sample_args("tiny_demo_sum3_long", out))
    assert summary["complete"] and summary["prompts"] == 6 and summary["samples"] == 18
    rows = _read(out)
    tok = build_tokenizer()
    reward = ArithmeticReward(tok, allow_steps=True)
    train, _ = make_sum3_datasets(seed=0)
    assert [r["prompt"] for r in rows] == list(train["prompt"][:6])
    for row in rows:
        assert len(row["samples"]) == 3
        for s in row["samples"]:
            ids = tok(s["text"], add_special_tokens=False)["input_ids"] + ([] if s["truncated"] else [2])
            assert s["tokens"] == len(ids) and (not s["truncated"] or s["tokens"] == 20)
            assert s["reward"] == reward.score(ids, row["answer"]) and s["correct"] == (s["reward"] == 1.0)
    assert 0 < summary["accuracy"] < 1 and summary["prompts_with_correct"] >= 3  # the long model is right often
    # stopped after 2 prompts (one generate call of 6 sequences), then resumed: the same file
    again = tmp_path / "again.jsonl"
    first = run(_sample_args("tiny_demo_sum3_long", again, "--stop-after", "2"))
    assert first["complete"] is False and not again.exists()
    second = run(_sample_args("tiny_demo_sum3_long", again))
    assert second["resumed"] == 2 and again.read_text() == out.read_text()


def test_sample_refusals(tiny_models, tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "1+2="}])
    assert "row 1 has no 'answer'" in _error(
        [
            "sample",
            "--model",
            str(tiny_models["a"]),
            "--input",
            str(bad),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--max-new-tokens",
            "4",
        ],
        capsys,
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1+2=", "answer": "3"}\n{oops\n')
    assert f"{broken}:2: not JSON" in _error(
        [
            "sample",
            "--model",
            str(tiny_models["a"]),
            "--input",
            str(broken),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--max-new-tokens",
            "4",
        ],
        capsys,
    )
    assert "--max-new-tokens is required" in _error(
        [
            "sample",
            "--model",
            str(tiny_models["a"]),
            "--input",
            str(_write(tmp_path / "ok.jsonl", [{"prompt": "1+2=", "answer": "3"}])),
            "--output",
            str(tmp_path / "o.jsonl"),
        ],
        capsys,
    )
    assert "--max-new-tokens must be >= 1" in _error(
        _sample_args(tiny_models["a"], tmp_path / "o.jsonl", "--max-new-tokens", "0"), capsys
    )
    assert "--task nope" in _error(
        ["sample", "--model", str(tiny_models["a"]), "--task", "nope", "--output", str(tmp_path / "o.jsonl")], capsys
    )
    assert not (tmp_path / "o.jsonl").exists()


def _samples_row(prompt, answer, samples):
    return {
        "prompt": prompt,
        "answer": answer,
        "samples": [
            {"text": t, "tokens": n, "reward": float(c), "correct": c, "truncated": tr} for t, n, c, tr in samples
        ],
    }


@pytest.fixture
def samples_file(tmp_path):
    rows = [
        # shortest correct: "102" (4 tokens); the correct "46+56=102" (10 >= 1.5 x 4) and the restated one (19) are
        # negatives; the wrong "103" is not: it is no longer than the chosen answer (4 tokens)
        _samples_row(
            "12+34+56=",
            "102",
            [
                ("12+34+56=46+56=102", 19, True, False),
                ("103", 4, False, False),
                ("46+56=102", 10, True, False),
                ("102", 4, True, False),
            ],
        ),
        # only a truncated "correct-looking" sample: no positive, the row is dropped
        _samples_row("1+2+3=", "6", [("3+3=6", 5, False, True), ("7", 2, False, False)]),
        # shortest correct of 9 tokens: the correct one of 13 < 1.5 x 9 is no negative, nor the wrong "61" (3 tokens,
        # shorter); the wrong one of 18 tokens (longer) is
        _samples_row(
            "10+20+30=",
            "60",
            [
                ("30+30=60", 9, True, False),
                ("10+20=30+30=60", 13, True, False),
                ("61", 3, False, False),
                ("10+20+30=30+30=61", 18, False, False),
            ],
        ),
    ]
    return _write(tmp_path / "samples.jsonl", rows)


def test_build_sft_keeps_the_shortest_correct(samples_file, tmp_path):
    out = tmp_path / "sft.jsonl"
    summary = run(["build-sft", "--samples", str(samples_file), "--output", str(out)])
    assert summary["rows"] == 2 and summary["dropped_no_correct"] == 1
    assert [(r["prompt"], r["completion"], r["tokens"]) for r in _read(out)] == [
        ("12+34+56=", "102", 4),
        ("10+20+30=", "30+30=60", 9),
    ]
    rand = tmp_path / "random.jsonl"
    run(["build-sft", "--samples", str(samples_file), "--output", str(rand), "--select", "random", "--seed", "3"])
    picked = _read(rand)
    assert [r["prompt"] for r in picked] == ["12+34+56=", "10+20+30="]
    assert picked[0]["completion"] in ("12+34+56=46+56=102", "46+56=102", "102")


def test_build_dpo_pairs_follow_the_paper(samples_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    summary = run(["build-dpo", "--samples", str(samples_file), "--output", str(out), "--pairs-per-prompt", "all"])
    pairs = [(r["prompt"], r["chosen"], r["rejected"], r["rejected_correct"]) for r in _read(out)]
    assert pairs == [
        ("12+34+56=", "102", "12+34+56=46+56=102", True),
        ("12+34+56=", "102", "46+56=102", True),
        ("10+20+30=", "30+30=60", "10+20+30=30+30=61", False),
    ]
    assert summary["rule"] == "paper" and summary["pairs"] == 3 and summary["rejected_correct"] == 2
    assert summary["dropped_no_correct"] == 1 and summary["rejected_not_longer"] == 0
    one = tmp_path / "one.jsonl"
    assert run(["build-dpo", "--samples", str(samples_file), "--output", str(one)])["pairs"] == 2  # one per prompt


def test_build_dpo_any_wrong_pairs_every_wrong_sample(samples_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = ["build-dpo", "--samples", str(samples_file), "--output", str(out), "--pairs-per-prompt", "all"]
    summary = run([*args, "--rule", "any_wrong"])
    pairs = [(r["chosen"], r["rejected"], r["chosen_tokens"], r["rejected_tokens"]) for r in _read(out)]
    assert pairs == [
        ("102", "12+34+56=46+56=102", 4, 19),
        ("102", "103", 4, 4),  # a wrong answer as long as the chosen one
        ("102", "46+56=102", 4, 10),
        ("30+30=60", "61", 9, 3),  # a wrong answer shorter than the chosen one
        ("30+30=60", "10+20+30=30+30=61", 9, 18),
    ]
    assert summary["rule"] == "any_wrong" and summary["pairs"] == 5 and summary["rejected_not_longer"] == 2


def test_build_refusals(tmp_path, capsys):
    no_samples = _write(tmp_path / "x.jsonl", [{"prompt": "1+2=", "samples": "no"}])
    assert "row 1 has no 'samples' list" in _error(
        ["build-sft", "--samples", str(no_samples), "--output", str(tmp_path / "o.jsonl")], capsys
    )
    wrong = _write(tmp_path / "w.jsonl", [_samples_row("1+2=", "3", [("4", 2, False, False)])])
    assert "no prompt has a correct sample" in _error(
        ["build-dpo", "--samples", str(wrong), "--output", str(tmp_path / "o.jsonl")], capsys
    )
    # the only wrong answer is as short as the correct one: no negative under the paper's rule
    short_wrong = _write(
        tmp_path / "s.jsonl", [_samples_row("1+2=", "3", [("3", 2, True, False), ("4", 2, False, False)])]
    )
    assert "no prompt has a correct sample with a negative" in _error(
        ["build-dpo", "--samples", str(short_wrong), "--output", str(tmp_path / "o.jsonl")], capsys
    )
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------------------------------------------------
# sft, dpo
# ----------------------------------------------------------------------------------------------------------------------


def _finetune_args(kind, model, data, out, *extra):
    return [
        kind,
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        "--batch-size",
        "4",
        "--quiet",
        "--learning-rate",
        "1e-3",
        *extra,
    ]


@pytest.fixture
def sft_file(tmp_path):
    rows = [
        {"prompt": f"{a}+{b}+{c}=", "completion": completion(a, b, c, "steps")}
        for a, b, c in [(1, 2, 3), (10, 20, 30), (5, 5, 5), (7, 8, 9), (40, 1, 2), (3, 3, 3), (9, 9, 9), (2, 4, 6)]
    ]
    return _write(tmp_path / "sft.jsonl", rows)


def test_sft_trains_saves_and_skips_a_finished_job(tiny_models, sft_file, tmp_path):
    out = tmp_path / "rs"
    summary = run(_finetune_args("sft", tiny_models["a"], sft_file, out))
    assert summary["steps"] == 2 and summary["rows"] == 8 and not summary["resumed"]
    before, after = load_file(tiny_models["a"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "tokenizer.json").is_file() and not (tmp_path / "rs.partial").exists()
    record = json.loads((out / "long2short.json").read_text())
    assert record["job"]["command"] == "sft" and record["stats"]["steps"] == 2
    assert run(_finetune_args("sft", tiny_models["a"], sft_file, out))["skipped"] == "already done"


def test_sft_resumes_from_its_last_checkpoint(tiny_models, sft_file, tmp_path, monkeypatch):
    """An interruption after the first checkpoint: the rerun resumes there and ends where an uninterrupted run
    ends."""
    from transformers import Trainer

    whole = tmp_path / "whole"
    run(_finetune_args("sft", tiny_models["a"], sft_file, whole, "--save-steps", "1"))
    original = Trainer._save_checkpoint

    def stop_after_first_checkpoint(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", stop_after_first_checkpoint)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run(_finetune_args("sft", tiny_models["a"], sft_file, out, "--save-steps", "1"))
    assert not out.exists() and any((tmp_path / "cut.partial" / "trainer").glob("checkpoint-1"))
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    summary = run(_finetune_args("sft", tiny_models["a"], sft_file, out, "--save-steps", "1"))
    assert summary["resumed"] and summary["steps"] == 2
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_dpo_trains_with_the_sft_term(tiny_models, tmp_path):
    rows = [
        {"prompt": f"{a}+{b}+{c}=", "chosen": completion(a, b, c, "steps"), "rejected": completion(a, b, c, "verbose")}
        for a, b, c in [(1, 2, 3), (10, 20, 30), (5, 5, 5), (7, 8, 9)]
    ]
    data = _write(tmp_path / "pairs.jsonl", rows)
    args = _finetune_args("dpo", tiny_models["a"], data, tmp_path / "dpo", "--set", "max_steps=3")
    summary = run([*args, "--loss", "sigmoid,sft"])
    assert summary["steps"] == 3
    record = json.loads((tmp_path / "dpo" / "long2short.json").read_text())
    assert record["job"]["settings"]["loss_type"] == ["sigmoid", "sft"]
    assert record["job"]["overrides"] == {"max_steps": 3}


def test_finetune_refusals(tiny_models, sft_file, tmp_path, capsys):
    out = tmp_path / "o"
    line = _error(_finetune_args("sft", tiny_models["a"], sft_file, out, "--max-length", "12"), capsys)
    assert f"{sft_file}: row 1 (completion) is 13 tokens, more than --max-length 12" in line
    assert "not a field of TRL's SFTConfig" in _error(
        _finetune_args("sft", tiny_models["a"], sft_file, out, "--set", "learning_rat=1"), capsys
    )
    assert "row 1 has no 'chosen'" in _error(_finetune_args("dpo", tiny_models["a"], sft_file, out), capsys)
    assert "--loss" in _error(_finetune_args("dpo", tiny_models["a"], sft_file, out, "--loss", "sigmoid,nope"), capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------------
# eval, report
# ----------------------------------------------------------------------------------------------------------------------


def test_eval_and_report(tiny_models, tmp_path):
    from k15_plugin.data.arithmetic import evaluate_greedy, load_demo_checkpoint

    out = tmp_path / "eval.jsonl"
    summary = run(
        [
            "eval",
            "--models",
            f"long={tiny_models['a']}",
            f"other={tiny_models['b']}",
            "--task",
            "demo_sum3",
            "--num-prompts",
            "20",
            "--sampled",
            "2",
            "--max-new-tokens",
            "6",
            "--quiet",
            "--output",
            str(out),
        ]
    )
    rows = _read(out)
    assert [r["name"] for r in rows] == ["long", "other"] and summary["complete"]
    _, heldout = make_sum3_datasets(num_train=10)
    for row, key in zip(rows, ("a", "b"), strict=True):
        model, tok = load_demo_checkpoint(tiny_models[key])
        greedy = evaluate_greedy(model, tok, heldout.select(range(20)), max_new_tokens=6, allow_steps=True)
        assert row["greedy_accuracy"] == pytest.approx(greedy["accuracy"])
        assert row["greedy_tokens"] == pytest.approx(greedy["mean_completion_tokens"])
        assert 0 <= row["sampled_accuracy"] <= 1 and 1 <= row["sampled_tokens"] <= 6
    report = tmp_path / "report.md"
    result = run(
        [
            "report",
            "--eval",
            str(out),
            "--reference",
            "long",
            "--output",
            str(report),
            "--plot",
            str(tmp_path / "fig.png"),
        ]
    )
    other = result["tables"]["greedy"][1]
    assert other["tokens_ratio"] == pytest.approx(rows[1]["greedy_tokens"] / rows[0]["greedy_tokens"])
    assert other["accuracy_delta"] == pytest.approx(100 * (rows[1]["greedy_accuracy"] - rows[0]["greedy_accuracy"]))
    assert "| other |" in report.read_text() and (tmp_path / "fig.png").stat().st_size > 1000


def test_eval_refusals(tiny_models, tmp_path, capsys):
    assert "--models" in _error(
        [
            "eval",
            "--models",
            f"x={tiny_models['a']}",
            f"x={tiny_models['b']}",
            "--task",
            "demo_sum3",
            "--output",
            str(tmp_path / "e.jsonl"),
        ],
        capsys,
    )
    rows = _write(tmp_path / "e.jsonl", [{"name": "a", "greedy_accuracy": 0.5, "greedy_tokens": 4.0}])
    assert "--reference long" in _error(
        ["report", "--eval", str(rows), "--reference", "long", "--output", str(tmp_path / "r.md")], capsys
    )
    assert not (tmp_path / "r.md").exists()


def test_dpo_defaults_to_the_papers_plain_sigmoid_loss():
    from k15_plugin.long2short.cli import build_parser

    args = build_parser().parse_args(["dpo", "--model", "m", "--data", "d.jsonl", "--output", "o"])
    assert args.loss == "sigmoid"  # the paper's DPO has no SFT term; sigmoid,sft is the opt-in variant
