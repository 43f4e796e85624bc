"""k15_plugin.core.prompt_sampler: the host-independent chunked sampler (verl, OpenRLHF) and its exact resume."""

import pytest
import torch
from torch.utils.data import DataLoader

from k15_plugin.core.prompt_sampler import CurriculumPromptSampler, PrioritizedPromptSampler, PromptSampler


def _loader(sampler, batch_size):
    return DataLoader(list(range(sampler.num_problems)), batch_size=batch_size, sampler=sampler, drop_last=True)


def _run(sampler, it, steps, rng, batch_size=4):
    """``steps`` batches from the iterator ``it``; after each, rewards for 3 samples per prompt."""
    out = []
    for _ in range(steps):
        batch = next(it).tolist()
        assert sampler.pop_emitted(len(batch)) == batch
        out.append(batch)
        rows = torch.tensor(batch).repeat_interleave(3)
        sampler.update(rows, torch.rand(len(rows), generator=rng) < 0.4)
    return out


def test_chunks_are_distinct_prompts_and_an_epoch_is_whole_chunks():
    sampler = PrioritizedPromptSampler(10, 4, seed=1)
    assert len(sampler) == 8  # 2 chunks of 4; the 2 rows left over are dropped as drop_last does
    epoch = [b.tolist() for b in _loader(sampler, 4)]
    assert len(epoch) == 2 and all(len(set(b)) == 4 for b in epoch)
    assert sampler.epoch == 0 and sampler.position == 8
    assert len(list(_loader(sampler, 4))) == 2 and sampler.epoch == 1


def test_a_chunk_is_drawn_when_its_first_row_is_asked_for():
    sampler = PrioritizedPromptSampler(6, 3, seed=0, floor=1e-6)
    it = iter(sampler)
    first = [next(it) for _ in range(3)]
    assert sampler.num_chunks_drawn == 1
    sampler.update(torch.tensor(first), torch.ones(3))  # all solved: weight 1e-6 against 0.5 for the others
    second = [next(it) for _ in range(3)]
    assert set(first).isdisjoint(second)
    assert sampler.num_chunks_drawn == 2


@pytest.mark.parametrize("batch_size", [4, 2, 1])
@pytest.mark.parametrize("stop", [1, 3, 4, 5])  # inside the first epoch, at its end, and inside the second
def test_resume_from_state_dict_continues_exactly(batch_size, stop):
    def make():
        return PrioritizedPromptSampler(17, 4, seed=5, floor=0.02)

    steps_per_chunk = 4 // batch_size
    sampler = make()
    rng = torch.Generator().manual_seed(0)
    loader = _loader(sampler, batch_size)
    it = iter(loader)
    done = 0
    want = []
    state = rng_state = None
    while len(want) < 6 * steps_per_chunk:
        try:
            batch = _run(sampler, it, 1, rng, batch_size)
        except StopIteration:
            it = iter(loader)
            continue
        done += 1
        if state is not None:
            want += batch
        if done == stop * steps_per_chunk:
            state, rng_state = sampler.state_dict(), rng.get_state()

    resumed = make()
    resumed.load_state_dict(state)
    rng.set_state(rng_state)
    loader = _loader(resumed, batch_size)
    it = iter(loader)
    got = []
    while len(got) < len(want):
        try:
            got += _run(resumed, it, 1, rng, batch_size)
        except StopIteration:
            it = iter(loader)
    assert got == want


def test_state_of_another_layout_is_refused():
    state = PrioritizedPromptSampler(10, 4).state_dict()
    with pytest.raises(ValueError, match="sampler state mismatch for chunk_size"):
        PrioritizedPromptSampler(10, 5).load_state_dict(state)
    with pytest.raises(ValueError, match="sampler state mismatch for kind"):
        CurriculumPromptSampler(10, 4, difficulty=torch.zeros(10)).load_state_dict(state)


def test_prioritized_follows_the_failure_rates():
    sampler = PrioritizedPromptSampler(8, 2, seed=3, floor=0.05)
    # rows 0-3 always solved, 4-7 never: weights 0.05 against 1
    sampler.update(torch.arange(8).repeat(4), (torch.arange(8) < 4).repeat(4).float())
    counts = torch.zeros(8)
    for _ in range(50):
        for batch in _loader(sampler, 2):
            counts[batch] += 1
    assert counts[4:].sum() > 5 * counts[:4].sum()


def test_curriculum_draws_only_from_the_pool_of_the_chunks_step():
    difficulty = torch.tensor([3.0, 0.0, 2.0, 1.0, 0.0, 3.0, 1.0, 2.0])
    sampler = CurriculumPromptSampler(
        8, 2, seed=0, difficulty=difficulty, schedule="staged", switch_step=2, hard_fraction=0.25
    )
    batches = [b.tolist() for b in _loader(sampler, 2)]
    assert len(batches) == 4
    # steps 0 and 1: all problems; from step 2: the hardest 2 (rows 0 and 5, label 3)
    assert all(set(b) == {0, 5} for b in batches[2:])
    assert sampler.step_of_chunk(3) == 3
    assert PromptSampler(8, 2, steps_per_chunk=4).step_of_chunk(3) == 12


def test_a_small_pool_draws_with_replacement_and_warns_once():
    sampler = CurriculumPromptSampler(8, 4, seed=0, difficulty=torch.arange(8.0), schedule="staged", hard_fraction=0.25)
    with pytest.warns(UserWarning, match="drawing with replacement"):
        batches = [b.tolist() for b in _loader(sampler, 4)]
    assert all(set(b) <= {6, 7} for b in batches)


def test_pop_emitted_refuses_more_than_was_yielded():
    sampler = PrioritizedPromptSampler(4, 2)
    it = iter(sampler)
    next(it)
    with pytest.raises(RuntimeError, match="prefetching"):
        sampler.pop_emitted(2)
    first = next(it)
    assert sampler.pop_emitted() == [sampler.chunk[0].item(), first] and sampler.pop_emitted() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_problems": 3, "chunk_size": 4}, "must not exceed the dataset size"),
        ({"num_problems": 3, "chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"num_problems": 3, "chunk_size": 1, "seed": -1}, "seed must be an integer >= 0"),
        ({"num_problems": 3, "chunk_size": 1, "floor": 0}, "floor"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrioritizedPromptSampler(**kwargs)
