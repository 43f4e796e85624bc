"""The light exact-match reward used for `reward.verifier=task` on Hub/JSONL data."""

import pickle

import pytest

from k15_plugin.rewards.answer import AnswerMatchReward, extract_answer, normalize_answer


@pytest.mark.parametrize(
    "text, extraction, expected",
    [
        ("so the total is 12, then 1,234.", "last_number", "1,234"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "gsm8k", "72"),
        ("no marker 72", "gsm8k", None),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "boxed", "\\frac{1}{2}"),
        ("nothing here", "last_number", None),
    ],
)
def test_extract_answer(text, extraction, expected):
    assert extract_answer(text, extraction) == expected


def test_normalize_answer():
    # "1,000" -> 1000; "$5.00" -> 5; "0.50" -> 0.5; non-numbers stay as stripped strings
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("$5.00") == "5"
    assert normalize_answer("0.50") == "0.5"
    assert normalize_answer(" x+1 ") == "x+1"


def test_answer_match_reward_scores_and_never_raises():
    reward = AnswerMatchReward("gsm8k")
    completions = [
        "work ... #### 1,000",  # right, with a thousands separator
        [{"role": "assistant", "content": "#### 999"}],  # chat completion, wrong
        "no final answer",  # no marker -> 0
        None,  # garbage -> 0
    ]
    assert reward(completions=completions, answer=["1000", "1000", "1000", "1000"]) == [1.0, 0.0, 0.0, 0.0]
    assert pickle.loads(pickle.dumps(reward))(completions=["#### 3"], answer=["3"]) == [1.0]
    with pytest.raises(ValueError, match="extraction"):
        AnswerMatchReward("regex")
