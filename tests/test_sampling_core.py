"""k15_plugin.core.sampling (paper section 2.3.4): success rates, priority weights, curriculum pools, by hand."""

import pytest
import torch

from k15_plugin.core import SuccessRateTracker, curriculum_fraction, curriculum_pool, prioritized_weights

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------------
# SuccessRateTracker
# ----------------------------------------------------------------------------------------------------------------------


def test_tracker_rates_by_hand():
    tracker = SuccessRateTracker(num_problems=4, prior=0.25)
    # Two generation batches of k=2 completions per prompt, one entry per completion.
    tracker.update(torch.tensor([0, 0, 2, 2]), torch.tensor([True, False, True, True]))
    tracker.update(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # problem 0: successes 1 + 2 = 3 over attempts 2 + 2 = 4 -> 0.75
    # problem 1: 0 / 2 -> 0.0
    # problem 2: 2 / 2 -> 1.0
    # problem 3: never attempted -> prior 0.25
    torch.testing.assert_close(tracker.rates(), torch.tensor([0.75, 0.0, 1.0, 0.25], dtype=torch.float64))
    assert tracker.attempts.tolist() == [4, 2, 2, 0]


def test_tracker_partial_credit_and_unseen_prior():
    tracker = SuccessRateTracker(num_problems=3)
    assert tracker.rates().tolist() == [0.5, 0.5, 0.5]  # default prior 0.5 for every unseen problem
    tracker.update(torch.tensor([1, 1, 1]), torch.tensor([0.5, 0.0, 1.0]))
    # problem 1: (0.5 + 0 + 1) / 3 = 0.5; the others stay at the prior
    torch.testing.assert_close(tracker.rates(), torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))
    tracker.update(torch.tensor([2]), torch.tensor([0.0]))
    assert tracker.rates().tolist() == [0.5, 0.5, 0.0]


def test_tracker_state_dict_round_trip():
    tracker = SuccessRateTracker(num_problems=3, prior=0.1)
    tracker.update(torch.tensor([0, 2, 2]), torch.tensor([True, False, True]))
    state = tracker.state_dict()
    other = SuccessRateTracker(num_problems=3, prior=0.9)
    other.load_state_dict(state)
    torch.testing.assert_close(other.rates(), tracker.rates())
    assert other.prior == 0.1
    # the state is a copy: updating the source afterwards does not leak into it
    tracker.update(torch.tensor([1]), torch.tensor([True]))
    assert other.rates()[1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="num_problems"):
        SuccessRateTracker(num_problems=4).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "indices", "successes", "match"),
    [
        ({"num_problems": 0}, None, None, "num_problems"),
        ({"num_problems": 3, "prior": 1.5}, None, None, "prior"),
        ({"num_problems": 3}, torch.tensor([0, 3]), torch.tensor([True, True]), "indices"),
        ({"num_problems": 3}, torch.tensor([-1]), torch.tensor([True]), "indices"),
        ({"num_problems": 3}, torch.tensor([0.0]), torch.tensor([True]), "indices"),
        ({"num_problems": 3}, torch.tensor([[0]]), torch.tensor([[True]]), "indices"),
        ({"num_problems": 3}, torch.tensor([0, 1]), torch.tensor([True]), "successes"),
        ({"num_problems": 3}, torch.tensor([0]), torch.tensor([2.0]), "successes"),
        ({"num_problems": 3}, torch.tensor([0]), torch.tensor([float("nan")]), "successes"),
    ],
)
def test_tracker_validation(kwargs, indices, successes, match):
    with pytest.raises(ValueError, match=match):
        tracker = SuccessRateTracker(**kwargs)
        tracker.update(indices, successes)


# ----------------------------------------------------------------------------------------------------------------------
# prioritized_weights
# ----------------------------------------------------------------------------------------------------------------------


def test_prioritized_weights_with_floor():
    rates = torch.tensor([0.0, 0.5, 0.9, 1.0])
    # max(1 - s, 0.2): [1.0, 0.5, max(0.1, 0.2) = 0.2, max(0.0, 0.2) = 0.2]
    torch.testing.assert_close(prioritized_weights(rates, floor=0.2), torch.tensor([1.0, 0.5, 0.2, 0.2]))
    # floor 1 makes every problem equally likely
    assert prioritized_weights(rates, floor=1.0).tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("rates", "floor", "match"),
    [
        (torch.tensor([0.5]), 0.0, "floor"),
        (torch.tensor([0.5]), 1.5, "floor"),
        (torch.tensor([0.5]), float("nan"), "floor"),
        (torch.tensor([1.5]), 0.1, "rates"),
        (torch.tensor([[0.5]]), 0.1, "rates"),
        (torch.tensor([]), 0.1, "rates"),
    ],
)
def test_prioritized_weights_validation(rates, floor, match):
    with pytest.raises(ValueError, match=match):
        prioritized_weights(rates, floor)


# ----------------------------------------------------------------------------------------------------------------------
# curriculum_pool
# ----------------------------------------------------------------------------------------------------------------------

# Ten problems; the stable easiest-first ranking (ties by index) is 1, 4, 7, 0, 5, 8, 2, 3, 9, 6:
#   difficulty 0: 1, 4, 7   difficulty 1: 0, 5, 8   difficulty 2: 2, 3, 9   difficulty 3: 6
DIFFICULTY = torch.tensor([1.0, 0.0, 2.0, 2.0, 0.0, 1.0, 3.0, 0.0, 1.0, 2.0])


def _members(mask):
    return sorted(torch.nonzero(mask).flatten().tolist())


def test_staged_pool():
    kw = {"switch_step": 5, "hard_fraction": 0.3}
    for step in (0, 4):  # before the switch: the whole set
        assert curriculum_pool(DIFFICULTY, step, "staged", **kw).all()
    # from the switch: the hardest ceil(0.3 * 10) = 3 of the ranking, i.e. its last three: 3, 9, 6
    # (difficulty 2 ties between 2, 3, 9 are broken by index: 2 ranks as the easiest of them and is left out)
    for step in (5, 100):
        assert _members(curriculum_pool(DIFFICULTY, step, "staged", **kw)) == [3, 6, 9]
    # ceil(0.25 * 10) = 3 too; ceil(0.7 * 10) must be 7 despite 0.7 * 10 = 7.000000000000001 in floating point
    assert _members(curriculum_pool(DIFFICULTY, 5, "staged", switch_step=5, hard_fraction=0.25)) == [3, 6, 9]
    assert curriculum_pool(DIFFICULTY, 5, "staged", switch_step=5, hard_fraction=0.7).sum() == 7


def test_gradual_pool():
    kw = {"start_fraction": 0.3, "ramp_steps": 7}
    # step 0: f = 0.3 -> ceil(3) = 3 easiest: 1, 4, 7
    assert _members(curriculum_pool(DIFFICULTY, 0, "gradual", **kw)) == [1, 4, 7]
    # step 2: f = 0.3 + 0.7 * 2/7 = 0.5 -> 5 easiest: 1, 4, 7, 0, 5
    assert curriculum_fraction(2, 0.3, 7) == pytest.approx(0.5)
    assert _members(curriculum_pool(DIFFICULTY, 2, "gradual", **kw)) == [0, 1, 4, 5, 7]
    # step 3: f = 0.3 + 0.7 * 3/7 = 0.6 -> 6 easiest: adds 8 (last of the difficulty-1 ties)
    assert _members(curriculum_pool(DIFFICULTY, 3, "gradual", **kw)) == [0, 1, 4, 5, 7, 8]
    # step 4: f = 0.7 -> 7 (not 8: the floating-point 7.000000000000001 is absorbed); adds 2
    assert _members(curriculum_pool(DIFFICULTY, 4, "gradual", **kw)) == [0, 1, 2, 4, 5, 7, 8]
    # from ramp_steps on: everything
    assert curriculum_pool(DIFFICULTY, 7, "gradual", **kw).all()
    assert curriculum_pool(DIFFICULTY, 70, "gradual", **kw).all()


def test_pool_never_empty_and_integer_labels():
    labels = torch.tensor([5, 1, 3])  # integer difficulty is fine
    assert _members(curriculum_pool(labels, 0, "gradual", start_fraction=0.01, ramp_steps=10)) == [1]
    assert _members(curriculum_pool(labels, 0, "staged", hard_fraction=0.01)) == [0]


@pytest.mark.parametrize(
    ("difficulty", "step", "schedule", "kwargs", "match"),
    [
        (DIFFICULTY, 0, "linear", {}, "schedule"),
        (DIFFICULTY, -1, "staged", {}, "step"),
        (DIFFICULTY, 1.5, "staged", {}, "step"),
        (DIFFICULTY, 0, "staged", {"switch_step": -2}, "switch_step"),
        (DIFFICULTY, 0, "staged", {"hard_fraction": 0.0}, "hard_fraction"),
        (DIFFICULTY, 0, "gradual", {"start_fraction": 1.2}, "start_fraction"),
        (DIFFICULTY, 0, "gradual", {"ramp_steps": 0}, "ramp_steps"),
        (torch.tensor([]), 0, "staged", {}, "difficulty"),
        (torch.tensor([[1.0]]), 0, "staged", {}, "difficulty"),
        (torch.tensor([1.0, float("inf")]), 0, "staged", {}, "difficulty"),
        (torch.tensor([True, False]), 0, "staged", {}, "difficulty"),
    ],
)
def test_curriculum_validation(difficulty, step, schedule, kwargs, match):
    with pytest.raises(ValueError, match=match):
        curriculum_pool(difficulty, step, schedule, **kwargs)


def test_learnability_priority_matches_hand_values_and_draws_accordingly():
    from k15_plugin.core.prompt_sampler import PrioritizedPromptSampler

    rates = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    w = prioritized_weights(rates, 0.05, "learnability")
    torch.testing.assert_close(w, torch.tensor([0.05, 0.1875, 0.25, 0.05], dtype=torch.float64))
    torch.testing.assert_close(
        prioritized_weights(rates, 0.05), torch.tensor([1.0, 0.75, 0.5, 0.05], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="priority must be one of"):
        prioritized_weights(rates, 0.05, "hardest")
    sampler = PrioritizedPromptSampler(4, 2, floor=0.05, priority="learnability", seed=0)
    assert sampler.chunk_weights(0).tolist() == [0.25] * 4  # prior 0.5 for rows not attempted yet
