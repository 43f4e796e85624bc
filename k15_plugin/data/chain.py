"""The chained-addition demo task, a testbed for long and variable-length work: ``"a1+a2+...+ak="``.

Terms are two-digit (10..99) and the number of terms ``k`` is drawn per prompt from ``terms_min..terms_max``
(2..8 by default), so prompts range from easy (one addition) to hard (seven additions in a row), and ``k`` is the
``difficulty`` column the curriculum sampler reads. A completion may work the sum out before answering; the reward
(:class:`~k15_plugin.data.arithmetic.ArithmeticReward` with ``allow_steps``) judges the digits after the last ``=``
(then EOS), and the work may hold only digits, ``+`` and ``=``. Three formats (``12+34+56+78=``, answer 180):

=========  ===================================  ==========================================================
format     completion                           what it does
=========  ===================================  ==========================================================
verbose    ``12+34+56+78=46+56+78=102+78=180``  restates the rest of the sum after each addition
steps      ``46+56=102+78=180``                 running partial sums only
direct     ``180``                              the answer alone
=========  ===================================  ==========================================================

A verbose completion grows with k squared (10 tokens at k = 2, about 115 at k = 8, EOS included), a steps one with
k (about 4 to 46), so a model that mixes them writes long answers to hard prompts and short ones to easy prompts:
the long, variable-length regime the paper's length penalty, partial rollouts and long2short are about.
"""

from __future__ import annotations

import random

from datasets import Dataset

__all__ = [
    "FORMATS",
    "MAX_TERM",
    "MIN_TERM",
    "TERMS_MAX",
    "TERMS_MIN",
    "completion",
    "make_chain_datasets",
    "max_new_tokens",
    "parse_prompt",
]

MIN_TERM, MAX_TERM = 10, 99  # two-digit terms
TERMS_MIN, TERMS_MAX = 2, 8  # the default range of k
HELDOUT_SEED = 1234
DEFAULT_HELDOUT_SIZE = 700  # 100 per k over the default range
DEFAULT_NUM_TRAIN = 50_000
FORMATS = ("verbose", "steps", "direct")


def completion(terms: list[int], fmt: str) -> str:
    """The completion text (no EOS) of the prompt of ``terms`` in ``fmt`` (see the module's table).

    Example:
    ```python
    >>> from k15_plugin.data.chain import completion
    >>> [completion([12, 34, 56, 78], f) for f in ("verbose", "steps", "direct")]
    ['12+34+56+78=46+56+78=102+78=180', '46+56=102+78=180', '180']

    ```
    """
    if len(terms) < 2:
        raise ValueError(f"a chain has at least 2 terms, got {terms}")
    if fmt == "direct":
        return str(sum(terms))
    if fmt == "steps":
        total = terms[0] + terms[1]
        text = str(total)
        for term in terms[2:]:
            total += term
            text += f"+{term}={total}"
        return text
    if fmt == "verbose":
        rest = list(terms)
        text = "+".join(map(str, rest)) + "="
        while len(rest) > 2:
            rest = [rest[0] + rest[1], *rest[2:]]
            text += "+".join(map(str, rest)) + "="
        return text + str(sum(terms))
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def parse_prompt(prompt: str) -> list[int]:
    """The terms of a prompt ``"a1+...+ak="``; ValueError unless it is integers joined by ``+``, ending in ``=``."""
    if not prompt.endswith("="):
        raise ValueError(f"a chain prompt ends with '=', got {prompt!r}")
    return [int(x) for x in prompt[:-1].split("+")]


def max_new_tokens(terms_max: int = TERMS_MAX) -> int:
    """The longest completion of any format for up to ``terms_max`` terms, EOS included: the generation budget."""
    return len(completion([MAX_TERM] * terms_max, "verbose")) + 1


def _draw(rng: random.Random, terms_min: int, terms_max: int) -> tuple[int, ...]:
    k = rng.randint(terms_min, terms_max)
    return tuple(rng.randint(MIN_TERM, MAX_TERM) for _ in range(k))


def make_chain_datasets(
    num_train: int | None = None,
    seed: int = 0,
    heldout_size: int = DEFAULT_HELDOUT_SIZE,
    terms_min: int = TERMS_MIN,
    terms_max: int = TERMS_MAX,
    heldout_seed: int = HELDOUT_SEED,
) -> tuple[Dataset, Dataset]:
    """``(train_ds, heldout_ds)`` with ``prompt`` (``"12+34+56="``), ``answer`` (``"102"``) and ``difficulty`` (k).

    The held-out chains are drawn with ``heldout_seed`` only (the same set for every seed) with the same number of
    prompts for each k (``heldout_size`` rounded down to a multiple of the k range, at least one per k), and never
    appear in ``train_ds``, which holds ``num_train`` (default 50,000) distinct other chains, k uniform, drawn with
    ``seed``.
    """
    if not 2 <= terms_min <= terms_max:
        raise ValueError(
            f"terms_min and terms_max must satisfy 2 <= terms_min <= terms_max, got {terms_min}, {terms_max}"
        )
    n = DEFAULT_NUM_TRAIN if num_train is None else num_train
    if n < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    ks = range(terms_min, terms_max + 1)
    per_k = max(1, heldout_size // len(ks))
    if heldout_size < 1:
        raise ValueError(f"heldout_size must be >= 1, got {heldout_size}")
    held_rng = random.Random(heldout_seed)
    held: list[tuple[int, ...]] = []
    held_set: set[tuple[int, ...]] = set()
    for k in ks:
        count = 0
        space = (MAX_TERM - MIN_TERM + 1) ** k
        while count < min(per_k, space // 2):
            chain = tuple(held_rng.randint(MIN_TERM, MAX_TERM) for _ in range(k))
            if chain not in held_set:
                held_set.add(chain)
                held.append(chain)
                count += 1
    rng = random.Random(seed)
    train: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    attempts = 0
    while len(train) < n:
        chain = _draw(rng, terms_min, terms_max)
        attempts += 1
        if chain in held_set or chain in seen:
            if attempts > 20 * n:
                raise ValueError(f"num_train={n} is more than the distinct chains of {terms_min}..{terms_max} terms")
            continue
        seen.add(chain)
        train.append(chain)

    def rows(chains: list[tuple[int, ...]]) -> dict[str, list]:
        return {
            "prompt": ["+".join(map(str, c)) + "=" for c in chains],
            "answer": [str(sum(c)) for c in chains],
            "difficulty": [len(c) for c in chains],
        }

    return Dataset.from_dict(rows(train)), Dataset.from_dict(rows(held))
