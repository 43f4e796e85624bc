"""The vision-language demo task: count the red squares in a small picture drawn in code.

Each row is a 56x56 RGB image of a 4x4 grid of 14-pixel cells (one cell per vision patch of the shipped model), some
cells holding one filled shape (square, circle or triangle) in one colour (red, green, blue or yellow) on a black
background, with a random size and offset inside its cell. The prompt asks ``How many red squares?``; the answer is
their number, :data:`MIN_TARGETS`..:data:`MAX_TARGETS`. Every other object is a distractor: a square of another
colour, or a red or other-coloured circle or triangle. The ``difficulty`` column is the clutter level, read from the
image: 1 without distractors, 2 with 1..4, 3 with 5..8 (:data:`CLUTTER`).

Rows are conversational, as TRL's vision-language path wants them: ``prompt`` is
``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red squares?"}]}]`` and the
``image`` column holds the picture (a PIL image); TRL puts the image into the ``{"type": "image"}`` block. The
completion is the number's digits then EOS, judged by :class:`~k15_plugin.data.arithmetic.ArithmeticReward` (any
tokenizer whose digits are single-character tokens: the shipped model's character-level one is).

The held-out scenes are drawn with :data:`HELDOUT_SEED` alone (the same set for every training seed), the same number
for each clutter level, in level order; a training scene is never one of them (the same objects in the same cells
with the same sizes and offsets). Disjoint layouts (shapes and colours per cell) would be too strong: there are
only 16 layouts of one red square alone, and 100 held-out uncluttered scenes would take most of them out of training.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from PIL import Image, ImageDraw

from k15_plugin.data.arithmetic import WARM_START_FILE, ArithmeticReward, greedy_kwargs, mean_by

__all__ = [
    "CLUTTER",
    "COLOURS",
    "IMAGE_SIZE",
    "MAX_NEW_TOKENS",
    "MAX_TARGETS",
    "MIN_TARGETS",
    "QUESTION",
    "SHAPES",
    "VISION_CHECKPOINT_DIR",
    "Scene",
    "draw_scene",
    "evaluate_vision",
    "evaluate_vision_greedy",
    "generate_vision_completions",
    "load_vision_checkpoint",
    "make_vision_datasets",
    "prompt_messages",
    "read_vision_warm_start",
    "render",
    "vision_scores",
]

IMAGE_SIZE = 56
GRID = 4  # GRID x GRID cells of IMAGE_SIZE // GRID pixels
CELL = IMAGE_SIZE // GRID
SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (60, 90, 240), "yellow": (230, 210, 40)}
TARGET = ("square", "red")
QUESTION = "How many red squares?"
MIN_TARGETS, MAX_TARGETS = 1, 5
# Clutter level (the difficulty column) -> the range of the number of distractors, inclusive.
CLUTTER = {1: (0, 0), 2: (1, 4), 3: (5, 8)}
MIN_SIDE, MAX_SIDE = 7, 12  # an object's bounding box, pixels
HELDOUT_SEED = 1234
DEFAULT_HELDOUT_SIZE = 300  # 100 per clutter level
DEFAULT_NUM_TRAIN = 5000
MAX_NEW_TOKENS = len(str(MAX_TARGETS)) + 1  # the answer's digits and EOS
# The shipped warm-started model (built by ``python -m k15_plugin.data.build.make_vision_checkpoint``).
VISION_CHECKPOINT_DIR = Path(__file__).resolve().parent / "demo_checkpoint_vision"


@dataclass(frozen=True)
class Scene:
    """One picture: ``objects`` are ``(cell, shape, colour, side, dx, dy)``, cell in ``0..GRID**2 - 1`` (row-major),
    ``side`` the bounding box in pixels and ``(dx, dy)`` its offset from the cell's corner."""

    objects: tuple[tuple[int, str, str, int, int, int], ...]
    clutter: int

    @property
    def answer(self) -> int:
        """The number of red squares."""
        return sum((shape, colour) == TARGET for _, shape, colour, *_ in self.objects)


def draw_scene(rng: random.Random, clutter: int) -> Scene:
    """A random scene of clutter level ``clutter`` (a key of :data:`CLUTTER`): 1..5 red squares, then distractors."""
    if clutter not in CLUTTER:
        raise ValueError(f"clutter must be one of {sorted(CLUTTER)}, got {clutter}")
    targets = rng.randint(MIN_TARGETS, MAX_TARGETS)
    distractors = rng.randint(*CLUTTER[clutter])
    kinds = [TARGET] * targets
    others = [(s, c) for s in SHAPES for c in COLOURS if (s, c) != TARGET]
    kinds += [rng.choice(others) for _ in range(distractors)]
    cells = rng.sample(range(GRID * GRID), len(kinds))
    objects = []
    for cell, (shape, colour) in zip(cells, kinds, strict=True):
        side = rng.randint(MIN_SIDE, MAX_SIDE)
        objects.append((cell, shape, colour, side, rng.randint(0, CELL - side), rng.randint(0, CELL - side)))
    return Scene(tuple(sorted(objects)), clutter)


def render(scene: Scene) -> Image.Image:
    """The scene as a ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB image on black."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for cell, shape, colour, side, dx, dy in scene.objects:
        x0, y0 = (cell % GRID) * CELL + dx, (cell // GRID) * CELL + dy
        x1, y1 = x0 + side - 1, y0 + side - 1
        fill = COLOURS[colour]
        if shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    return image


def prompt_messages(question: str = QUESTION) -> list[dict]:
    """The conversational prompt: one user turn with the image's place, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _rows(scenes: list[Scene]) -> dict[str, list]:
    return {
        "prompt": [prompt_messages() for _ in scenes],
        "image": [render(s) for s in scenes],
        "answer": [str(s.answer) for s in scenes],
        "difficulty": [s.clutter for s in scenes],
    }


def make_vision_datasets(
    num_train: int | None = None,
    seed: int = 0,
    heldout_size: int = DEFAULT_HELDOUT_SIZE,
    heldout_seed: int = HELDOUT_SEED,
) -> tuple[Dataset, Dataset]:
    """``(train_ds, heldout_ds)`` with ``prompt`` (conversational), ``image`` (PIL), ``answer`` (``"3"``) and
    ``difficulty`` (the clutter level, 1..3).

    The held-out scenes are drawn with ``heldout_seed`` only, ``heldout_size`` rounded down to a multiple of the
    levels (at least one per level), level by level; the ``num_train`` training scenes (default
    :data:`DEFAULT_NUM_TRAIN`) are drawn with ``seed``, level uniform, and are never one of the held-out scenes.
    """
    n = DEFAULT_NUM_TRAIN if num_train is None else num_train
    if n < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    if heldout_size < 1:
        raise ValueError(f"heldout_size must be >= 1, got {heldout_size}")
    levels = sorted(CLUTTER)
    per_level = max(1, heldout_size // len(levels))
    held_rng = random.Random(heldout_seed)
    held: list[Scene] = []
    held_set: set[Scene] = set()
    for level in levels:
        count = 0
        while count < per_level:
            scene = draw_scene(held_rng, level)
            if scene not in held_set:
                held_set.add(scene)
                held.append(scene)
                count += 1
    rng = random.Random(seed)
    train = []
    while len(train) < n:
        scene = draw_scene(rng, rng.choice(levels))
        if scene not in held_set:
            train.append(scene)
    return Dataset.from_dict(_rows(train)), Dataset.from_dict(_rows(held))


# ----------------------------------------------------------------------------------------------------------------------
# Shipped checkpoint and evaluation
# ----------------------------------------------------------------------------------------------------------------------


def load_vision_checkpoint(path: str | Path | None = None) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)`` of a saved vision-language checkpoint (default: the shipped
    :data:`VISION_CHECKPOINT_DIR`), loaded with ``AutoModelForImageTextToText`` and ``AutoProcessor``; all local."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    directory = Path(path) if path is not None else VISION_CHECKPOINT_DIR
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {directory}; build it with `python -m k15_plugin.data.build.make_vision_checkpoint`"
        )
    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory)
    model.eval()
    return model, processor


def read_vision_warm_start(path: str | Path | None = None) -> dict[str, Any]:
    """The ``warm_start.json`` its maker wrote next to a vision checkpoint."""
    directory = Path(path) if path is not None else VISION_CHECKPOINT_DIR
    return json.loads((directory / WARM_START_FILE).read_text())


@torch.no_grad()
def generate_vision_completions(
    model: torch.nn.Module,
    processor: Any,
    prompts: Sequence[list[dict]],
    images: Sequence[Image.Image],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 100,
    *,
    num_samples: int = 1,
    temperature: float | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Completion token ids of each (conversational prompt, image), up to and including the first EOS (all
    ``max_new_tokens`` when it never came), ``num_samples`` per prompt in prompt order.

    Greedy with ``temperature=None``; else plain ancestral sampling at ``temperature`` (no top-k/top-p), seeded with
    ``seed`` without touching the caller's global RNG. Prompts are rendered with the processor's chat template and a
    generation prompt, as TRL's rollouts render them, and left-padded with an attention mask. The model's train/eval
    mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    options = greedy_kwargs(tokenizer, max_new_tokens)
    if temperature is not None:
        options = {**options, "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    eos, out = tokenizer.eos_token_id, []
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                texts = processor.apply_chat_template(
                    list(prompts[start : start + batch_size]), add_generation_prompt=True, tokenize=False
                )
                batch = processor(
                    images=list(images[start : start + batch_size]), text=texts, padding=True, return_tensors="pt"
                )
                batch = {k: v.to(device) for k, v in batch.items()}
                ids = model.generate(**batch, **options, num_return_sequences=num_samples)
                for row in ids[:, batch["input_ids"].shape[1] :].tolist():
                    out.append(row[: row.index(eos) + 1] if eos in row else row)
    finally:
        model.train(was_training)
    return out


def vision_scores(
    model: torch.nn.Module,
    processor: Any,
    rows: Dataset,
    batch_size: int = 100,
    *,
    num_samples: int = 1,
    temperature: float | None = None,
) -> tuple[list[float], list[list[int]]]:
    """``(scores, completion ids)`` of :func:`generate_vision_completions` on ``rows``, ``num_samples`` per row in row
    order, each judged against its row's ``answer`` by :class:`~k15_plugin.data.arithmetic.ArithmeticReward`."""
    completions = generate_vision_completions(
        model,
        processor,
        rows["prompt"],
        rows["image"],
        batch_size=batch_size,
        num_samples=num_samples,
        temperature=temperature,
    )
    answers = [a for a in rows["answer"] for _ in range(num_samples)]
    reward = ArithmeticReward(processor.tokenizer)
    return [reward.score(ids, a) for ids, a in zip(completions, answers, strict=True)], completions


def evaluate_vision(model: torch.nn.Module, processor: Any, rows: Dataset, batch_size: int = 100) -> dict[str, float]:
    """``k15-train``'s held-out figures on image rows: greedy accuracy and mean completion tokens (EOS included),
    unrounded (the evaluation sums them over processes)."""
    scores, completions = vision_scores(model, processor, rows, batch_size)
    n = max(len(scores), 1)
    return {"accuracy": sum(scores) / n, "mean_completion_tokens": sum(map(len, completions)) / n}


def evaluate_vision_greedy(
    model: torch.nn.Module,
    processor: Any,
    rows: Dataset,
    batch_size: int = 100,
    *,
    num_samples: int = 1,
    temperature: float | None = None,
) -> dict:
    """Greedy accuracy on ``rows`` (judged by :class:`~k15_plugin.data.arithmetic.ArithmeticReward`), overall and
    per ``difficulty``, and the share of each answer given (``1``..``5``, ``other`` for anything else: how far it is
    from always guessing one number); with a ``temperature``, the same over ``num_samples`` sampled completions per
    row (seed 0)."""
    scores, completions = vision_scores(
        model, processor, rows, batch_size, num_samples=num_samples, temperature=temperature
    )
    levels = [level for level in rows["difficulty"] for _ in range(num_samples)]
    texts = [processor.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    valid = {str(n) for n in range(MIN_TARGETS, MAX_TARGETS + 1)}
    given = Counter(t if t in valid else "other" for t in texts)
    return {
        "accuracy": round(sum(scores) / len(scores), 4),
        "accuracy_by_difficulty": {str(level): round(v, 4) for level, v in mean_by(scores, levels).items()},
        "answer_shares": {t: round(given[t] / len(texts), 4) for t in [*sorted(valid), "other"] if given[t]},
    }
