"""The chained-addition task (k15_plugin.data.chain) and the built-in task table, by hand."""

import pytest
from omegaconf import OmegaConf

from k15_plugin.data.arithmetic import ArithmeticReward
from k15_plugin.data.build.warm_start import build_tokenizer
from k15_plugin.data.builtin import BUILTIN_TASKS, task_name, task_options
from k15_plugin.data.chain import completion, make_chain_datasets, max_new_tokens, parse_prompt


def test_formats_by_hand():
    assert completion([12, 34, 56, 78], "verbose") == "12+34+56+78=46+56+78=102+78=180"
    assert completion([12, 34, 56, 78], "steps") == "46+56=102+78=180"
    assert completion([12, 34, 56, 78], "direct") == "180"
    assert completion([12, 34], "verbose") == "12+34=46" and completion([12, 34], "steps") == "46"
    with pytest.raises(ValueError, match="format must be one of"):
        completion([1, 2], "proof")
    with pytest.raises(ValueError, match="at least 2 terms"):
        completion([5], "steps")
    assert parse_prompt("12+34+56=") == [12, 34, 56]
    # the longest completion: 8 terms of 99, restated: 8*3 + 7*3 + ... chars, plus EOS
    assert max_new_tokens(8) == len(completion([99] * 8, "verbose")) + 1 == 115
    assert max_new_tokens(2) == len("99+99=198") + 1


def test_every_format_is_judged_right_by_the_reward_and_a_wrong_step_is_not_the_answer():
    tokenizer = build_tokenizer()
    reward = ArithmeticReward(tokenizer, allow_steps=True)
    terms = [12, 34, 56, 78]

    def ids(text):
        return [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]

    for fmt in ("verbose", "steps", "direct"):
        assert reward.score(ids(completion(terms, fmt)), "180") == 1.0, fmt
    assert reward.score(ids("46+56=102+78=181"), "180") == 0.0  # only the digits after the last "=" count
    assert reward.score(ids("46+56=999+78=180"), "180") == 1.0  # the work is not judged, only the answer


def test_datasets_hold_k_as_difficulty_and_keep_the_heldout_set_out():
    train, heldout = make_chain_datasets(num_train=3000, seed=0)
    assert set(train.column_names) == {"prompt", "answer", "difficulty"}
    assert sorted(set(heldout["difficulty"])) == list(range(2, 9))
    assert [heldout["difficulty"].count(k) for k in range(2, 9)] == [100] * 7
    assert not set(train["prompt"]) & set(heldout["prompt"]) and len(set(train["prompt"])) == 3000
    for prompt, answer, k in zip(train["prompt"][:200], train["answer"][:200], train["difficulty"][:200], strict=True):
        terms = parse_prompt(prompt)
        assert len(terms) == k and str(sum(terms)) == answer and all(10 <= t <= 99 for t in terms)
    _, again = make_chain_datasets(num_train=10, seed=5)
    assert again["prompt"] == heldout["prompt"]  # the held-out set does not depend on the training seed
    small, held = make_chain_datasets(num_train=50, terms_min=3, terms_max=4, heldout_size=10)
    assert set(small["difficulty"]) == {3, 4} and held["difficulty"] == [3] * 5 + [4] * 5
    with pytest.raises(ValueError, match="terms_min and terms_max"):
        make_chain_datasets(terms_min=5, terms_max=4)


def test_the_builtin_table_names_the_task_of_a_data_config():
    def data(**kw):
        return OmegaConf.create({"source": "demo_arithmetic", "terms": 2, "filler_max": 0, **kw})

    assert task_name(data()) == "demo_arithmetic" and task_options(data()) == {"filler_max": 0}
    assert task_name(data(filler_max=6)) == "demo_arithmetic_filler"
    assert task_name(data(terms=3)) == "demo_sum3"
    chain = data(source="demo_chain", terms_min=3, terms_max=5)
    assert task_name(chain) == "demo_chain" and task_options(chain) == {"terms_min": 3, "terms_max": 5}
    task = BUILTIN_TASKS["demo_chain"]
    assert task.allow_steps and task.difficulty and task.max_new_tokens(**task_options(chain)) == max_new_tokens(5)
    train, heldout = task.rows(40, 0, 9, **task_options(chain))
    assert len(train) == 40 and set(train["difficulty"]) <= {3, 4, 5} and len(heldout) == 9
    assert BUILTIN_TASKS["demo_arithmetic"].max_new_tokens() == 4
    assert BUILTIN_TASKS["demo_arithmetic_filler"].max_new_tokens() == 10


def test_shipped_chain_checkpoint_matches_its_record_and_the_regime():
    """tiny_demo_chain: greedy held-out accuracy and length as recorded by its maker, right sometimes with headroom
    (better on short chains than long ones), and long, variable-length sampled answers."""
    from k15_plugin.data.arithmetic import DEMO_MODELS, evaluate_greedy, load_demo_checkpoint, read_warm_start_info

    directory = DEMO_MODELS["tiny_demo_chain"]
    model, tok = load_demo_checkpoint(directory)
    info = read_warm_start_info(directory)
    assert sum(f.stat().st_size for f in directory.iterdir()) < 3_000_000
    _, heldout = make_chain_datasets(num_train=10)
    measured = evaluate_greedy(model, tok, heldout, max_new_tokens=max_new_tokens(8), allow_steps=True)
    assert measured["accuracy"] == pytest.approx(info["heldout"]["accuracy"], abs=0.01)
    assert measured["mean_completion_tokens"] == pytest.approx(info["heldout"]["mean_tokens"], abs=0.1)
    by_k = {int(k): v for k, v in info["heldout"]["accuracy_by_k"].items()}
    assert 0.1 < measured["accuracy"] < 0.7
    assert min(by_k[2], by_k[3]) > max(by_k[7], by_k[8])  # headroom grows with k
    sampled = info["heldout"]["sampled"]
    assert 20 <= sampled["mean_tokens"] <= 80 and sampled["longest_tenth_mean_tokens"] >= 2 * sampled["median_tokens"]
    formats = sampled["formats"]
    assert formats["direct"]["accuracy"] < formats["verbose"]["accuracy"]  # the work helps
