"""The three-term demo task, where showing the work helps: ``"a+b+c="`` with ``a, b, c`` in 0..99.

The long2short methods (paper section 2.4) need a long model whose long answers are *worth* something, so that
making it answer briefly is a trade-off and not just the removal of filler. Here a completion may work the sum out
before answering; the reward (:class:`~k15_plugin.data.arithmetic.ArithmeticReward` with ``allow_steps``) judges the
digits after the last ``=`` only. Three answer formats (``12+34+56=``, answer 102):

=========  ======================  ======  ====================================================================
format     completion              tokens  what it does
=========  ======================  ======  ====================================================================
verbose    ``12+34+56=46+56=102``  19      restates the problem (copied from the prompt), then works it out
steps      ``46+56=102``           10      the partial sum, then the second addition
direct     ``102``                 4       the answer alone
=========  ======================  ======  ====================================================================

(tokens: EOS included.) On the 0.53M-parameter demo model, the partial sum is what makes the task learnable: after the
same supervised training a model that writes ``steps`` is right more than ten times as often as one answering
``direct`` (``warm_start.json`` next to each shipped checkpoint records the measurements). The restatement in
``verbose`` is copied from the prompt, as long chains of thought restate their problem, so a good long2short method
can drop it at no cost (about half the tokens), while dropping the partial sum costs most of the accuracy.

Shipped checkpoints (``python -m k15_plugin.data.build.make_sum3_checkpoints``):

* :data:`SUM3_LONG_CHECKPOINT_DIR` -- the *long* model: supervised on a mixture of the three formats
  (:data:`LONG_MIX`), so its samples vary in length as the paper's long-CoT model's do, and greedy decoding writes
  the work out;
* :data:`SUM3_SHORT_CHECKPOINT_DIR` -- the *short* model: the long model fine-tuned on ``direct`` answers only (a
  short-CoT model sharing the long model's ancestry, as weight averaging needs).
"""

from __future__ import annotations

import random

from datasets import Dataset

from k15_plugin.data.arithmetic import DEMO_MODELS

__all__ = [
    "FORMATS",
    "LONG_MIX",
    "MAX_NEW_TOKENS",
    "SUM3_LONG_CHECKPOINT_DIR",
    "SUM3_SHORT_CHECKPOINT_DIR",
    "completion",
    "make_sum3_datasets",
]

MAX_OPERAND = 99
HELDOUT_SEED = 1234
DEFAULT_HELDOUT_SIZE = 500
DEFAULT_NUM_TRAIN = 20_000
FORMATS = ("verbose", "steps", "direct")
# The long model's supervised mixture of formats.
LONG_MIX = {"verbose": 0.6, "steps": 0.25, "direct": 0.15}
# The longest completion: "99+99+99=198+99=297" and EOS, 20 tokens; generation allows that exactly.
MAX_NEW_TOKENS = 20

SUM3_LONG_CHECKPOINT_DIR = DEMO_MODELS["tiny_demo_sum3_long"]
SUM3_SHORT_CHECKPOINT_DIR = DEMO_MODELS["tiny_demo_sum3_short"]


def completion(a: int, b: int, c: int, fmt: str) -> str:
    """The completion text (no EOS) of ``a+b+c=`` in ``fmt`` (see the module's table)."""
    if fmt == "verbose":
        return f"{a}+{b}+{c}={a + b}+{c}={a + b + c}"
    if fmt == "steps":
        return f"{a + b}+{c}={a + b + c}"
    if fmt == "direct":
        return str(a + b + c)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def parse_prompt(prompt: str) -> tuple[int, int, int]:
    """``(a, b, c)`` of a prompt ``"a+b+c="``; ValueError when it is not three integers joined by ``+``."""
    a, b, c = (int(x) for x in prompt.rstrip("=").split("+"))
    return a, b, c


def make_sum3_datasets(
    num_train: int | None = None,
    seed: int = 0,
    heldout_size: int = DEFAULT_HELDOUT_SIZE,
    heldout_seed: int = HELDOUT_SEED,
) -> tuple[Dataset, Dataset]:
    """``(train_ds, heldout_ds)`` with ``prompt`` (``"12+34+56="``) and ``answer`` (``"102"``) columns.

    The held-out triples are drawn with ``heldout_seed`` only (the same set for every seed) and never appear in
    ``train_ds``, which holds ``num_train`` (default 20,000) distinct other triples drawn with ``seed``.
    """
    space = (MAX_OPERAND + 1) ** 3
    n = DEFAULT_NUM_TRAIN if num_train is None else num_train
    if not 0 < heldout_size < space // 2:
        raise ValueError(f"heldout_size must be in 1..{space // 2 - 1}, got {heldout_size}")
    if not 0 < n <= space // 2:
        raise ValueError(f"num_train must be in 1..{space // 2}, got {num_train}")
    held = random.Random(heldout_seed).sample(range(space), heldout_size)
    held_set = set(held)
    rng = random.Random(seed)
    train: list[int] = []
    seen: set[int] = set()
    while len(train) < n:
        i = rng.randrange(space)
        if i not in held_set and i not in seen:
            seen.add(i)
            train.append(i)

    def rows(indices: list[int]) -> dict[str, list[str]]:
        triples = [(i // 10_000, i // 100 % 100, i % 100) for i in indices]
        return {"prompt": [f"{a}+{b}+{c}=" for a, b, c in triples], "answer": [str(a + b + c) for a, b, c in triples]}

    return Dataset.from_dict(rows(train)), Dataset.from_dict(rows(sorted(held)))
