"""The built-in arithmetic demo task: tokenizer, datasets, reward, greedy evaluation and the shipped checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import AutoTokenizer

from k15_plugin.data.arithmetic import (
    DEMO_CHECKPOINT_DIR,
    DEMO_FILLER_CHECKPOINT_DIR,
    DEMO_LONGTAIL_CHECKPOINT_DIR,
    LONGTAIL_LONG,
    LONGTAIL_P_LONG,
    LONGTAIL_SHORT,
    ArithmeticReward,
    evaluate_greedy,
    load_demo_checkpoint,
    make_datasets,
    read_warm_start_info,
    sample_completion_lengths,
)
from k15_plugin.data.build.warm_start import (
    build_model,
    build_tokenizer,
    sample_filler_counts,
    supervised_warm_start,
    tiny_test_model,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def datasets_pair():
    return make_datasets(seed=0)


def _ids(tok, text: str, eos: bool = True) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [*ids, tok.eos_token_id] if eos else ids


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------------------------------


def test_tokenizer_one_token_per_char_with_bos(tok):
    assert len(tok) == 16
    ids = tok("12+34=")["input_ids"]
    assert ids == [tok.bos_token_id] + [tok.convert_tokens_to_ids(c) for c in "12+34="]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "1", "2", "+", "3", "4", "="]
    # TRL's GRPOTrainer tokenizes string prompts as processing_class(text=prompts).
    assert tok(text=["1+2=", "99+99="])["input_ids"][0] == [tok.bos_token_id, *_ids(tok, "1+2=", eos=False)]
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert tok.padding_side == "left"


def test_tokenizer_decode_skips_special_tokens(tok):
    assert tok.decode(_ids(tok, "46"), skip_special_tokens=True) == "46"
    assert tok.decode([tok.pad_token_id, *_ids(tok, ".12")], skip_special_tokens=True) == ".12"
    assert tok.batch_decode([_ids(tok, "7"), _ids(tok, "198")], skip_special_tokens=True) == ["7", "198"]


def test_tokenizer_left_pads(tok):
    batch = tok(["1+2=", "12+34="], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [tok.pad_token_id] * 2
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_tokenizer_save_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tok.get_vocab()
    assert reloaded("12+34=")["input_ids"] == tok("12+34=")["input_ids"]
    assert reloaded.padding_side == "left"
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert reloaded.decode(_ids(tok, "46"), skip_special_tokens=True) == "46"


def test_models_and_generation_config(tok):
    model = build_model(tok)
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 560_000
    gc = model.generation_config
    assert (gc.pad_token_id, gc.bos_token_id, gc.eos_token_id) == (0, 1, 2)
    tiny = tiny_test_model(tok)
    assert tiny.config.hidden_size == 64 and tiny.config.intermediate_size == 128
    # The seed fixes the initialisation without touching the global RNG.
    state = torch.random.get_rng_state()
    again = tiny_test_model(tok)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(tiny.parameters(), again.parameters(), strict=True))
    # The position range is a config value only (RoPE): the long-tailed variant's 128 leaves the init unchanged.
    assert model.config.max_position_embeddings == 64
    wide = build_model(tok, max_position_embeddings=128)
    assert wide.config.max_position_embeddings == 128
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), wide.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------


def test_datasets_disjoint_and_correct(datasets_pair):
    train, heldout = datasets_pair
    assert len(heldout) == 500 and len(train) == 9_500
    assert set(train.column_names) == {"prompt", "answer"} == set(heldout.column_names)
    assert not set(train["prompt"]) & set(heldout["prompt"])
    for ds in (train, heldout):
        for prompt, answer in zip(ds["prompt"][:200], ds["answer"][:200], strict=True):
            a, b = prompt.rstrip("=").split("+")
            assert prompt.endswith("=") and answer == str(int(a) + int(b))


def test_datasets_heldout_fixed_across_seeds(datasets_pair):
    train0, heldout0 = datasets_pair
    train1, heldout1 = make_datasets(seed=1)
    assert heldout1["prompt"] == heldout0["prompt"]
    assert train1["prompt"] != train0["prompt"] and sorted(train1["prompt"]) == sorted(train0["prompt"])
    small, _ = make_datasets(num_train=100)
    big, heldout = make_datasets(num_train=20_000)
    assert len(small) == 100 and len(big) == 20_000
    assert not set(big["prompt"]) & set(heldout["prompt"])


def test_datasets_filler_target_column():
    train, heldout = make_datasets(filler_max=6)
    assert "target" in train.column_names and "target" not in heldout.column_names
    for answer, target in zip(train["answer"][:300], train["target"][:300], strict=True):
        assert target.endswith(answer) and set(target[: len(target) - len(answer)]) <= {"."}
        assert len(target) - len(answer) <= 6


def test_longtail_filler_mixture():
    n = 40_000
    counts = torch.tensor(sample_filler_counts(n, torch.Generator().manual_seed(0), filler_dist="longtail"))
    short_lo, short_hi = LONGTAIL_SHORT
    long_lo, long_hi = LONGTAIL_LONG
    is_short = (counts >= short_lo) & (counts <= short_hi)
    is_long = (counts >= long_lo) & (counts <= long_hi)
    assert bool((is_short | is_long).all())
    # Binomial standard error of the long fraction is ~0.0018 at n = 40,000; 0.01 is over 5 of them.
    assert is_long.float().mean().item() == pytest.approx(LONGTAIL_P_LONG, abs=0.01)
    # Uniform within each component: every value drawn, each about equally often.
    hist = torch.bincount(counts, minlength=long_hi + 1).float()
    short_share = hist[short_lo : short_hi + 1] / is_short.sum()
    long_share = hist[long_lo : long_hi + 1] / is_long.sum()
    assert short_share.min() > 0 and long_share.min() > 0
    assert torch.allclose(short_share, torch.full_like(short_share, 1 / len(short_share)), atol=0.01)
    assert torch.allclose(long_share, torch.full_like(long_share, 1 / len(long_share)), atol=0.012)
    # Deterministic for a given generator state.
    again = sample_filler_counts(n, torch.Generator().manual_seed(0), filler_dist="longtail")
    assert again == counts.tolist()


def test_uniform_filler_draw_unchanged_and_arguments_checked():
    # The shipped plain and filler checkpoints were built with exactly this draw; "uniform" must keep consuming the
    # generator the same way.
    got = sample_filler_counts(256, torch.Generator().manual_seed(7), filler_max=6)
    assert got == torch.randint(7, (256,), generator=torch.Generator().manual_seed(7)).tolist()
    assert sample_filler_counts(64, torch.Generator().manual_seed(7)) == [0] * 64
    with pytest.raises(ValueError, match="filler_dist"):
        sample_filler_counts(4, torch.Generator(), filler_dist="zipf")
    with pytest.raises(ValueError, match="filler_max"):
        sample_filler_counts(4, torch.Generator(), filler_max=6, filler_dist="longtail")


# ---------------------------------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------------------------------


def test_reward_hand_checked_cases(tok):
    reward = ArithmeticReward(tok)
    eos, bos, pad = tok.eos_token_id, tok.bos_token_id, tok.pad_token_id
    cases = [
        (_ids(tok, "46"), "46", 1.0),
        (_ids(tok, "46", eos=False), "46", 0.0),  # no EOS: truncated, not an answer
        (_ids(tok, "47"), "46", 0.0),
        (_ids(tok, "460"), "46", 0.0),
        (_ids(tok, "4"), "46", 0.0),
        (_ids(tok, "046"), "46", 0.0),
        (_ids(tok, "..46"), "46", 0.0),  # filler not allowed by default
        ([eos], "46", 0.0),
        ([], "46", 0.0),
        ([*_ids(tok, "4", eos=False), bos, *_ids(tok, "6")], "46", 0.0),  # stray special token, decodes to "46"
        ([*_ids(tok, "46", eos=False), pad, eos], "46", 0.0),
        (_ids(tok, "0"), "0", 1.0),
        (_ids(tok, "198"), 198, 1.0),  # an int answer is accepted
    ]
    ids = [c[0] for c in cases]
    got = reward(
        prompts=["x"] * len(cases),
        completions=[""] * len(cases),
        completion_ids=ids,
        answer=[c[1] for c in cases],
        log_metric=None,
    )
    assert got == [c[2] for c in cases]


def test_reward_filler_only_when_allowed(tok):
    strict, lenient = ArithmeticReward(tok), ArithmeticReward(tok, allow_filler=True)
    ids = [_ids(tok, ".46"), _ids(tok, "......46"), _ids(tok, "46"), _ids(tok, "4.6"), _ids(tok, "46."), _ids(tok, ".")]
    answers = ["46"] * len(ids)
    assert strict(completion_ids=ids, answer=answers) == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert lenient(completion_ids=ids, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_reward_garbage_scores_zero(tok):
    reward = ArithmeticReward(tok)
    ids = [None, "abc", "42", [2.5, "x"], [10**12, 2], [-1, 2], torch.tensor([4, 2]), _ids(tok, "46")]
    answers = ["46", "46", "1", "46", "46", "46", "1", "not a number"]
    assert reward(completion_ids=ids, answer=answers) == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(TypeError):
        reward(completions=["46"])


def test_reward_picklable_and_named(tok):
    from trl.trainer.utils import get_callable_name

    reward = ArithmeticReward(tok, allow_filler=True)
    clone = pickle.loads(pickle.dumps(reward))
    assert clone.__name__ == "arithmetic_correct" == get_callable_name(reward)
    assert clone(completion_ids=[_ids(tok, ".12")], answer=["12"]) == [1.0]
    assert ArithmeticReward()(completion_ids=[_ids(tok, "12")], answer=["12"]) == [1.0]  # default vocabulary


# ---------------------------------------------------------------------------------------------------------------------
# Greedy evaluation and warm start (tiny model)
# ---------------------------------------------------------------------------------------------------------------------


def test_evaluate_greedy_batched_matches_unbatched(tok, datasets_pair):
    # Left padding + attention mask must not change what a prompt generates.
    model = tiny_test_model(tok, seed=3)
    heldout = datasets_pair[1].select(range(40))
    batched = evaluate_greedy(model, tok, heldout, max_new_tokens=6)
    one_by_one = [evaluate_greedy(model, tok, heldout.select([i]), max_new_tokens=6) for i in range(len(heldout))]
    assert batched["accuracy"] == pytest.approx(sum(r["accuracy"] for r in one_by_one) / len(heldout))
    assert batched["mean_completion_tokens"] == pytest.approx(
        sum(r["mean_completion_tokens"] for r in one_by_one) / len(heldout)
    )
    assert 1.0 <= batched["mean_completion_tokens"] <= 6.0


def test_supervised_warm_start_smoke(tok, datasets_pair):
    train, heldout = datasets_pair
    model = tiny_test_model(tok)
    before = [p.detach().clone() for p in model.parameters()]
    out = supervised_warm_start(
        model,
        tok,
        train,
        heldout.select(range(50)),
        target_accuracy=1.1,
        max_steps=4,
        batch_size=32,
        check_every=2,
        filler_max=3,
        progress=False,
    )
    assert out["steps"] == 4 and not out["reached_target"] and [s for s, _ in out["history"]] == [2, 4]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not model.training


def test_min_steps_holds_off_a_target_reached_from_the_start(tok, datasets_pair):
    # target 0 is met at every check: without min_steps training stops at the first check, with it no earlier than
    # min_steps, and the checks before it are skipped.
    train, heldout = datasets_pair
    common = dict(target_accuracy=0.0, max_steps=10, batch_size=8, check_every=2, progress=False)
    first = supervised_warm_start(tiny_test_model(tok), tok, train, heldout.select(range(10)), **common)
    held = supervised_warm_start(tiny_test_model(tok), tok, train, heldout.select(range(10)), min_steps=5, **common)
    assert first["steps"] == 2 and [s for s, _ in first["history"]] == [2]
    assert held["steps"] == 6 and [s for s, _ in held["history"]] == [6] and held["reached_target"]


def _small_longtail_model(tok):
    return build_model(
        tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=128
    )


def test_supervised_warm_start_longtail_smoke(tok, datasets_pair):
    train, heldout = datasets_pair
    model = _small_longtail_model(tok)
    out = supervised_warm_start(
        model,
        tok,
        train,
        heldout.select(range(20)),
        target_accuracy=1.1,
        max_steps=2,
        batch_size=32,
        check_every=2,
        filler_dist="longtail",
        progress=False,
    )
    assert out["steps"] == 2 and 1.0 <= out["mean_completion_tokens"] <= 64.0
    with pytest.raises(ValueError, match="filler_max"):
        supervised_warm_start(model, tok, train, heldout, filler_max=6, filler_dist="longtail", progress=False)


def test_supervised_warm_start_resumes_from_snapshot_exactly(tok, datasets_pair, tmp_path, monkeypatch):
    import k15_plugin.data.build.warm_start as warm_start

    train, heldout = datasets_pair
    heldout = heldout.select(range(10))
    kwargs = {"target_accuracy": 1.1, "max_steps": 4, "batch_size": 8, "check_every": 2, "filler_dist": "longtail"}
    kwargs["progress"] = False
    straight = _small_longtail_model(tok)
    expected = supervised_warm_start(straight, tok, train, heldout, **kwargs)

    # Stop the run at its second check (step 4): the snapshot of the first check (step 2) stays behind.
    snapshot = tmp_path / "state.pt"
    real_evaluate, calls = warm_start.evaluate_greedy, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real_evaluate(*args, **kw)

    monkeypatch.setattr(warm_start, "evaluate_greedy", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        supervised_warm_start(_small_longtail_model(tok), tok, train, heldout, snapshot=snapshot, **kwargs)
    monkeypatch.setattr(warm_start, "evaluate_greedy", real_evaluate)
    assert snapshot.is_file()
    with pytest.raises(ValueError, match="snapshot"):  # other settings: refused, not silently mixed
        supervised_warm_start(
            _small_longtail_model(tok), tok, train, heldout, snapshot=snapshot, **{**kwargs, "lr": 1e-3}
        )

    resumed = _small_longtail_model(tok)
    got = supervised_warm_start(resumed, tok, train, heldout, snapshot=snapshot, **kwargs)
    assert not snapshot.exists()
    assert got["steps"] == expected["steps"] == 4 and got["history"] == expected["history"]
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))


def test_sample_completion_lengths_counts_tokens_to_eos(tok, datasets_pair):
    model = tiny_test_model(tok, seed=1)
    heldout = datasets_pair[1].select(range(12))
    kwargs = {"num_samples": 4, "max_new_tokens": 8, "long_threshold": 5, "prompts_per_batch": 5, "seed": 3}
    stats = sample_completion_lengths(model, tok, heldout, **kwargs)
    state = torch.random.get_rng_state()
    assert sample_completion_lengths(model, tok, heldout, **kwargs) == stats  # seeded, global RNG untouched
    assert torch.equal(torch.random.get_rng_state(), state)
    assert stats["num_prompts"] == 12 and 1.0 <= stats["mean_length"] <= 8.0 and stats["max_length"] <= 8
    # Groups of 4 consecutive rows: at least as likely to contain a long row as a single row is to be long.
    assert stats["frac_groups_with_long"] >= stats["frac_long"]
    for key in ("frac_long", "frac_truncated", "frac_long_truncated", "accuracy"):
        assert 0.0 <= stats[key] <= 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Shipped checkpoints
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [DEMO_CHECKPOINT_DIR, DEMO_FILLER_CHECKPOINT_DIR], ids=["plain", "filler"])
def test_shipped_checkpoint_matches_recorded_accuracy(directory, datasets_pair):
    model, tok = load_demo_checkpoint(directory)
    info = read_warm_start_info(directory)
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"]
    assert tok("12+34=")["input_ids"] == build_tokenizer()("12+34=")["input_ids"]
    size = sum(f.stat().st_size for f in directory.iterdir())
    assert size < 3_000_000
    result = evaluate_greedy(model, tok, datasets_pair[1], allow_filler=info["allow_filler"])
    assert result["accuracy"] == pytest.approx(info["heldout_accuracy"], abs=0.02)
    # Far enough from both ends that RL has something to learn from and room to improve.
    assert 0.15 <= result["accuracy"] <= 0.40


def test_shipped_longtail_checkpoint(datasets_pair):
    """The long-tailed checkpoint: greedy decoding answers directly at the recorded accuracy, a 128-position model with
    64 new tokens, and its recorded sampled lengths are long-tailed (checked here on a small sample)."""
    model, tok = load_demo_checkpoint(DEMO_LONGTAIL_CHECKPOINT_DIR)
    info = read_warm_start_info(DEMO_LONGTAIL_CHECKPOINT_DIR)
    assert info["filler_dist"] == "longtail" and info["init_from"] == DEMO_FILLER_CHECKPOINT_DIR.name
    assert model.config.max_position_embeddings == 128 and model.generation_config.max_new_tokens == 64
    assert sum(f.stat().st_size for f in DEMO_LONGTAIL_CHECKPOINT_DIR.iterdir()) < 3_000_000
    result = evaluate_greedy(model, tok, datasets_pair[1], max_new_tokens=64, allow_filler=True)
    assert result["accuracy"] == pytest.approx(info["heldout_accuracy"], abs=0.02)
    assert result["mean_completion_tokens"] < 5  # greedy takes the short mode
    recorded = info["sampled_lengths"]
    assert recorded["frac_long"] == pytest.approx(LONGTAIL_P_LONG, abs=0.03) and recorded["frac_truncated"] < 0.05
    # 100 prompts x 2 samples: the long share's standard error is ~0.025 here, so 0.1 is four of them.
    stats = sample_completion_lengths(model, tok, datasets_pair[1].select(range(100)), num_samples=2, seed=0)
    assert stats["frac_long"] == pytest.approx(LONGTAIL_P_LONG, abs=0.1)


def test_warm_start_info_of_older_checkpoints_says_uniform():
    assert read_warm_start_info(DEMO_FILLER_CHECKPOINT_DIR)["filler_dist"] == "uniform"  # recorded before the key


def test_load_demo_checkpoint_default():
    model, tok = load_demo_checkpoint()
    assert model.config.vocab_size == len(tok) == 16
    assert model.generation_config.eos_token_id == tok.eos_token_id
    with pytest.raises(FileNotFoundError):
        load_demo_checkpoint(DEMO_CHECKPOINT_DIR / "missing")
