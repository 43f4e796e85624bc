"""Prompt samplers for TRL (paper section 2.3.4): RepeatSampler's contract, priorities, curriculum, exact resume."""

import os
import warnings
from collections import Counter

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from k15_plugin.data.build.warm_start import build_tokenizer, tiny_test_model
from k15_plugin.trl import K15GRPOConfig, K15GRPOTrainer, K15RLOOConfig, K15RLOOTrainer
from k15_plugin.trl.samplers import SAMPLER_STATE_NAME, CurriculumSampler, K15RepeatSampler, PrioritizedSampler

torch.set_num_threads(1)


def _chunks(stream, batch_size, mini_repeat_count, repeat_count):
    """Split a stream into (repeat_count, batch_size, mini_repeat_count) chunk tensors."""
    per_chunk = batch_size * mini_repeat_count * repeat_count
    assert len(stream) % per_chunk == 0
    return torch.tensor(stream).view(-1, repeat_count, batch_size, mini_repeat_count)


# ----------------------------------------------------------------------------------------------------------------------
# The stream: RepeatSampler's contract
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["prioritized", "curriculum"])
def test_grouping_contract(kind):
    p, k, b, r = 11, 3, 3, 2  # 11 // 3 = 3 chunks per epoch, the incomplete last one dropped like RepeatSampler
    if kind == "prioritized":
        sampler = PrioritizedSampler(range(p), k, b, r, seed=0)
    else:
        sampler = CurriculumSampler(
            range(p), k, b, r, seed=0, difficulty=torch.arange(p), schedule="gradual", start_fraction=0.5, ramp_steps=2
        )
    stream = list(sampler)
    assert len(stream) == len(sampler) == 3 * b * k * r  # RepeatSampler's __len__
    chunks = _chunks(stream, b, k, r)  # (C, R, B, k)
    for chunk in chunks:
        assert (chunk == chunk[:1, :, :1]).all()  # each index k times in a row, the whole chunk r times
        prompts = chunk[0, :, 0].tolist()
        assert len(set(prompts)) == b  # distinct within a generation batch
        assert all(0 <= i < p for i in prompts)


def test_same_seed_same_stream_on_every_process():
    def make(seed):
        return PrioritizedSampler(range(20), 2, 4, 1, seed=seed, floor=0.05)

    a, b = make(7), make(7)
    assert list(a) == list(b)
    # Same (gathered) statistics on every process keep them identical after updates too.
    for s in (a, b):
        s.update(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([True, True, True, False, False, False]))
    assert list(a) == list(b)
    assert list(make(7)) != list(make(8))


def test_prioritized_frequency_follows_one_minus_success_rate():
    p = 4
    sampler = PrioritizedSampler(range(p), 1, 1, 1, seed=0, floor=0.05)
    # success rates 0, 1/2, 3/4, 1 (4 attempts each) -> weights 1, 0.5, 0.25, max(0, 0.05) = 0.05 (sum 1.8)
    sampler.update(torch.arange(p).repeat_interleave(4), torch.tensor([0] * 4 + [1, 1, 0, 0] + [1, 1, 1, 0] + [1] * 4))
    counts = Counter()
    for _ in range(1000):  # batch_size 1: every draw is exactly proportional to the weights
        counts.update(sampler)
    freq = torch.tensor([counts[i] / 4000 for i in range(p)])
    torch.testing.assert_close(freq, torch.tensor([1.0, 0.5, 0.25, 0.05]) / 1.8, atol=0.03, rtol=0)


def test_prioritized_batches_prefer_unsolved_problems():
    p, b = 8, 2
    sampler = PrioritizedSampler(range(p), 1, b, 1, seed=1, floor=0.05)
    # problems 0-3 always solved, 4-7 never: inclusion in a batch of 2 (no replacement) is not exactly proportional,
    # but the unsolved ones must dominate.
    sampler.update(torch.arange(p), torch.tensor([True] * 4 + [False] * 4))
    counts = Counter()
    for _ in range(300):
        counts.update(sampler)
    solved = sum(counts[i] for i in range(4))
    assert solved < 0.15 * (300 * 4 * b)  # weights 0.05 vs 1: about 5% of the draws, far from the uniform 50%


def test_curriculum_staged_switch():
    p, k, b, r, ga = 12, 2, 2, 2, 1  # one chunk = r / ga = 2 optimizer steps
    difficulty = torch.tensor([3, 0, 1, 2] * 3)
    sampler = CurriculumSampler(
        range(p),
        k,
        b,
        r,
        gradient_accumulation_steps=ga,
        seed=0,
        difficulty=difficulty,
        schedule="staged",
        switch_step=4,
        hard_fraction=0.25,
    )
    hard = {0, 4, 8}  # the hardest ceil(0.25 * 12) = 3: the difficulty-3 rows
    chunks = _chunks(list(sampler), b, k, r)  # (6, R, B, k)
    seen_before = set()
    for c, chunk in enumerate(chunks):
        step = sampler.step_of_chunk(c)
        assert step == 2 * c
        prompts = set(chunk[0, :, 0].tolist())
        if step >= 4:
            assert prompts <= hard, (c, prompts)
        else:
            seen_before |= prompts
    assert not seen_before <= hard  # before the switch the whole set is in play


def test_small_pool_falls_back_to_replacement_once():
    sampler = CurriculumSampler(
        range(10), 1, 3, 1, seed=0, difficulty=torch.arange(10), schedule="staged", hard_fraction=0.1
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = list(sampler)
    assert set(stream) == {9}  # a pool of one problem
    assert sum("with replacement" in str(w.message) for w in caught) == 1


def test_sampler_validation():
    with pytest.raises(ValueError, match="batch_size"):
        PrioritizedSampler(range(3), 2, 4, 1)
    with pytest.raises(ValueError, match="mini_repeat_count"):
        PrioritizedSampler(range(3), 0, 1, 1)
    with pytest.raises(ValueError, match="floor"):
        PrioritizedSampler(range(3), 1, 1, 1, floor=0.0)
    with pytest.raises(ValueError, match="difficulty"):
        CurriculumSampler(range(3), 1, 1, 1, difficulty=torch.zeros(4))
    with pytest.raises(ValueError, match="schedule"):
        CurriculumSampler(range(3), 1, 1, 1, difficulty=torch.zeros(3), schedule="linear")
    state = PrioritizedSampler(range(6), 2, 2, 1).state_dict(0)
    with pytest.raises(ValueError, match="batch_size"):
        PrioritizedSampler(range(6), 2, 3, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="kind"):
        CurriculumSampler(range(6), 2, 2, 1, difficulty=torch.zeros(6)).load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------------
# Resume, sampler level: a checkpoint inside a rollout batch, with prefetched chunks, and at an epoch end
# ----------------------------------------------------------------------------------------------------------------------


def _make_resume_sampler():
    # 4 chunks per epoch of 2 prompts x k=2; each chunk emitted r=4 times (num_iterations=2, steps_per_generation=2),
    # 2 micro-batches per optimizer step: a chunk spans 2 optimizer steps, an epoch 8.
    return PrioritizedSampler(range(9), 2, 2, 4, gradient_accumulation_steps=2, seed=3, floor=0.1)


@pytest.mark.parametrize("skip_consumed", [True, False])
def test_state_resumes_stream_inside_rollout_batch(skip_consumed):
    a = _make_resume_sampler()
    emission = 2 * 2  # indices per micro-batch (one process)
    a.update(torch.tensor([0, 0, 5, 5]), torch.tensor([True, True, False, True]))
    it = iter(a)
    # 3 optimizer steps trained = 6 micro-batches, plus one prefetched (the first of the next step).
    taken = [next(it) for _ in range(7 * emission)]
    state = a.state_dict(global_step=3)
    # step 3 -> micro-batch 6 of the epoch: chunk 1, its repeat 2 of 4; chunk 1 is the last chunk drawn so far
    assert (state["epoch"], state["first_chunk"], state["offset"], state["micro_batches"]) == (0, 1, 2, 6)
    assert state["records"].shape == (1, 2)
    rest = list(it)
    full = taken + rest  # the uninterrupted epoch

    b = _make_resume_sampler()
    b.load_state_dict(state, skip_consumed=skip_consumed)
    resumed = list(b)
    skipped = 6 * emission
    if skip_consumed:  # what transformers' skip_first_batches throws away, then exactly the live stream
        assert len(resumed) == len(full)
        assert resumed[skipped:] == full[skipped:]
    else:  # ignore_data_skip: the stream starts where training stopped
        assert resumed == full[skipped:]
    torch.testing.assert_close(b.tracker.rates(), a.tracker.rates())
    # The next epoch continues identically too (same generator, same statistics).
    assert list(b) == list(a)


def test_state_at_epoch_end_resumes_next_epoch():
    a = _make_resume_sampler()
    list(a)  # epoch 0 fully drawn and trained on
    state = a.state_dict(global_step=a.steps_per_epoch)
    assert (state["epoch"], state["first_chunk"], state["offset"]) == (1, 0, 0)
    assert state["records"].numel() == 0
    b = _make_resume_sampler()
    b.load_state_dict(state)
    assert list(b) == list(a)


def test_regenerated_rollout_batch_is_not_counted_twice():
    a = _make_resume_sampler()
    it = iter(a)
    first = [next(it) for _ in range(4)]  # chunk 0, first micro-batch: prompts first[0], first[2], k=2 each
    a.update(torch.tensor(first), torch.tensor([True, False, True, True]))
    state = a.state_dict(global_step=1)  # inside chunk 0 (offset 2 of 4)
    b = _make_resume_sampler()
    b.load_state_dict(state)
    # TRL regenerates chunk 0 after the resume and reports it again (other completions, other successes): dropped.
    b.update(torch.tensor(first[::-1]), torch.tensor([False, False, False, False]))
    torch.testing.assert_close(b.tracker.rates(), a.tracker.rates())
    assert b.num_updates == a.num_updates == 1
    b.update(torch.tensor(first), torch.tensor([False, False, False, False]))  # the next batch counts
    assert b.num_updates == 2


# ----------------------------------------------------------------------------------------------------------------------
# End to end with the plugin's trainers on a tiny Llama: exact resume from a TRL checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def _toy_dataset(num_prompts):
    return Dataset.from_dict(
        {
            "prompt": [f"{i}+{(7 * i) % 10}=" for i in range(num_prompts)],
            "difficulty": [(3 * i) % 7 for i in range(num_prompts)],  # ties on purpose
        }
    )


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return _toy_dataset(40)


class RecordingReward:
    """Deterministic toy reward that also records, per generation batch, the step and the dataset indices it saw.

    ``by_completion``: 1 when (sum of the completion's token ids + index) % 3 == 0, so successes vary with the
    sampled completions; otherwise 1 for every third prompt, whatever the completion. On one process the reward
    function sees the whole generation batch.
    """

    __name__ = "recording_reward"

    def __init__(self, by_completion: bool):
        self.by_completion = by_completion
        self.batches = []  # (global_step, [k15_index per completion], [reward per completion])

    def __call__(self, completion_ids, k15_index, trainer_state, **kwargs):
        if self.by_completion:
            rewards = [float((sum(ids) + i) % 3 == 0) for ids, i in zip(completion_ids, k15_index, strict=True)]
        else:
            rewards = [float(i % 3 == 0) for i in k15_index]
        self.batches.append((trainer_state.global_step, list(k15_index), rewards))
        return rewards


class StopAt(TrainerCallback):
    """Interrupts training after `step` optimizer steps (the checkpoint of that step is written first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _trainer(
    tmp, tokenizer, dataset, reward, callbacks=(), trainer_cls=K15GRPOTrainer, config_cls=K15GRPOConfig, **overrides
):
    args = dict(
        output_dir=str(tmp),
        use_cpu=True,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        max_steps=6,
        logging_steps=1,
        learning_rate=1e-3,
        seed=11,
        disable_tqdm=True,
        save_strategy="no",
    )
    args.update(overrides)
    return trainer_cls(
        model=tiny_test_model(tokenizer, seed=0),
        reward_funcs=[reward],
        args=config_cls(**args),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def _prompts_per_step(batches, num_steps):
    """Prompts trained on at each optimizer step: those of the latest generation batch at or before it."""
    per_step, current = [], None
    by_step = {step: indices for step, indices, _ in batches}  # a later generation at the same step wins
    for step in range(num_steps):
        current = by_step.get(step, current)
        per_step.append(current)
    return per_step


PRIORITIZED = {"sampler_type": "prioritized", "prioritized_floor": 0.05}
GRADUAL = {
    "sampler_type": "curriculum",
    "curriculum_schedule": "gradual",
    "curriculum_start_fraction": 0.2,
    "curriculum_ramp_steps": 4,
}


# With num_iterations=2 each rollout batch spans 2 optimizer steps, so a checkpoint at an odd step falls inside one and
# TRL regenerates that batch after the resume (its completions are not checkpointed; the generation RNG and the model
# then drift from the uninterrupted run). Those cases use a reward that ignores the completion, so the success
# statistics, hence the later draws, can match exactly. ignore_data_skip reloads the RNG before the data loader's
# iterator takes its seed from it, which shifts the generation RNG too.
@pytest.mark.parametrize(
    ("overrides", "by_completion", "num_prompts", "cut", "num_steps"),
    [
        (PRIORITIZED, True, 40, 3, 6),
        (GRADUAL, True, 40, 3, 6),
        ({**PRIORITIZED, "num_iterations": 2}, False, 40, 3, 6),
        ({**PRIORITIZED, "num_iterations": 2, "ignore_data_skip": True}, False, 40, 3, 6),
        (PRIORITIZED, True, 8, 5, 8),  # 4 steps per epoch: resume in the second epoch
        ({**PRIORITIZED, "prioritized_priority": "learnability"}, True, 40, 3, 6),
    ],
    ids=[
        "prioritized",
        "curriculum-gradual",
        "inside-rollout-batch",
        "ignore_data_skip",
        "second-epoch",
        "learnability",
    ],
)
def test_resume_draws_exactly_the_uninterrupted_prompts(
    tmp_path, tokenizer, monkeypatch, overrides, by_completion, num_prompts, cut, num_steps
):
    dataset = _toy_dataset(num_prompts)
    # Record the statistics each chunk is drawn with (how many generation batches it sees), in every run.
    draws = []
    draw_chunk = K15RepeatSampler._draw_chunk

    def recording_draw(self, chunk_number):
        draws.append((chunk_number, self.num_updates))
        return draw_chunk(self, chunk_number)

    monkeypatch.setattr(K15RepeatSampler, "_draw_chunk", recording_draw)

    full_reward = RecordingReward(by_completion)
    full = _trainer(tmp_path / "full", tokenizer, dataset, full_reward, max_steps=num_steps, **overrides)
    full.train()
    full_draws, draws[:] = list(draws), []

    # Interrupted at step `cut` of the same schedule (a shorter max_steps would change the learning-rate decay).
    first_reward = RecordingReward(by_completion)
    first = _trainer(
        tmp_path / "cut",
        tokenizer,
        dataset,
        first_reward,
        [StopAt(cut)],
        max_steps=num_steps,
        save_strategy="steps",
        save_steps=cut,
        **overrides,
    )
    first.train()
    checkpoint = tmp_path / "cut" / f"checkpoint-{cut}"
    assert (checkpoint / SAMPLER_STATE_NAME).is_file()

    resumed_reward = RecordingReward(by_completion)
    resumed = _trainer(tmp_path / "cut", tokenizer, dataset, resumed_reward, max_steps=num_steps, **overrides)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == num_steps

    expected = _prompts_per_step(full_reward.batches, num_steps)
    assert _prompts_per_step(first_reward.batches, cut) == expected[:cut]
    assert _prompts_per_step(resumed_reward.batches, num_steps)[cut:] == expected[cut:]
    num_iterations = overrides.get("num_iterations", 1)
    if num_iterations == 1:  # one generation batch per step: the batches themselves match, rewards included
        assert resumed_reward.batches == [b for b in full_reward.batches if b[0] >= cut]
    # The statistics end where the uninterrupted run's end (a regenerated batch is not counted twice).
    torch.testing.assert_close(resumed._k15_sampler.tracker.rates(), full._k15_sampler.tracker.rates())
    assert resumed._k15_sampler.num_updates == full._k15_sampler.num_updates == num_steps // num_iterations

    # The sampler saw exactly what the reward function scored: successes = reward >= 1 per completion.
    tracker = full._k15_sampler.tracker
    attempts, successes = Counter(), Counter()
    for _, indices, rewards in full_reward.batches:
        attempts.update(indices)
        successes.update(i for i, r in zip(indices, rewards, strict=True) if r >= 1)
    assert {i: int(n) for i, n in enumerate(tracker.attempts.tolist()) if n} == dict(attempts)
    for i, n in attempts.items():
        assert tracker.rates()[i].item() == pytest.approx(successes[i] / n)

    if num_prompts == 40:
        # The documented lag: chunk c sees generation batches 0..c-2 with one chunk per optimizer step, 0..c-1 with
        # num_iterations=2 (prefetch reaches one micro-batch ahead, and a chunk then spans two steps).
        lag = 1 if num_iterations == 1 else 0
        assert full_draws == [(c, max(c - lag, 0)) for c in range(len(full_draws))]
    if overrides["sampler_type"] == "curriculum":
        # gradual from 20% (8 easiest) to the whole set over 4 steps: step 0 draws only from the 8 easiest
        easiest = set(torch.sort(torch.tensor(dataset["difficulty"]), stable=True).indices[:8].tolist())
        assert set(expected[0]) <= easiest


def test_rloo_trainer_uses_and_checkpoints_the_sampler(tmp_path, tokenizer, dataset):
    reward = RecordingReward(by_completion=False)
    trainer = _trainer(
        tmp_path,
        tokenizer,
        dataset,
        reward,
        trainer_cls=K15RLOOTrainer,
        config_cls=K15RLOOConfig,
        sampler_type="curriculum",
        curriculum_switch_step=1,
        curriculum_hard_fraction=0.25,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        beta=0.0,
    )
    # (beta=0: RLOO's default KL term would build a reference model from the model's Hub path)
    trainer.train()
    assert isinstance(trainer._k15_sampler, CurriculumSampler)
    assert trainer._k15_sampler.num_updates == 2
    hardest = set(torch.sort(torch.tensor(dataset["difficulty"]), stable=True).indices[-10:].tolist())
    assert set(reward.batches[1][1]) <= hardest  # step 1 (the switch): only the hardest quarter
    state = torch.load(os.path.join(tmp_path, "checkpoint-2", SAMPLER_STATE_NAME), weights_only=True)
    assert state["kind"] == "CurriculumSampler" and state["num_updates"] == 2


def test_uniform_keeps_trl_sampler_and_missing_difficulty_column_is_named(tmp_path, tokenizer, dataset):
    reward = RecordingReward(by_completion=False)
    uniform = _trainer(tmp_path, tokenizer, dataset, reward)
    sampler = uniform._get_train_sampler()
    assert not isinstance(sampler, K15RepeatSampler) and uniform._k15_sampler is None

    no_labels = dataset.remove_columns("difficulty")
    curriculum = _trainer(tmp_path, tokenizer, no_labels, reward, sampler_type="curriculum")
    with pytest.raises(ValueError, match=r"curriculum_difficulty_column='difficulty'.*\['prompt', 'k15_index'\]"):
        curriculum.get_train_dataloader()


def test_prioritized_priority_reaches_the_sampler(tmp_path):
    reward = RecordingReward(by_completion=True)
    trainer = _trainer(
        tmp_path, build_tokenizer(), _toy_dataset(8), reward, **PRIORITIZED, prioritized_priority="learnability"
    )
    sampler = trainer._get_train_sampler()
    assert sampler.priority == "learnability"
    sampler.tracker.update(torch.tensor([0, 1, 2]), torch.tensor([0.0, 0.5, 1.0]))
    assert sampler.chunk_weights(0)[:4].tolist() == [0.05, 0.25, 0.05, 0.25]  # s(1 - s), floor 0.05, prior 0.5
