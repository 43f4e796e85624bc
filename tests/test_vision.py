"""The vision-language task (k15_plugin.data.vision), its shipped tiny LLaVA, and the plugin's TRL trainers on image
rows, on CPU."""

import math

import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf

from k15_plugin.data.arithmetic import ArithmeticReward
from k15_plugin.data.builtin import BUILTIN_TASKS, task_name, task_options
from k15_plugin.data.vision import (
    CELL,
    COLOURS,
    IMAGE_SIZE,
    MAX_NEW_TOKENS,
    QUESTION,
    VISION_CHECKPOINT_DIR,
    Scene,
    draw_scene,
    evaluate_vision_greedy,
    load_vision_checkpoint,
    make_vision_datasets,
    read_vision_warm_start,
    render,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def datasets():
    return make_vision_datasets(num_train=300, seed=0)


@pytest.fixture(scope="module")
def shipped():
    return load_vision_checkpoint()


def test_a_scene_by_hand_renders_and_counts():
    # a red square in cell 0, a red circle in cell 1, a blue square in cell 5, a red square in cell 15
    scene = Scene(
        (
            (0, "square", "red", 10, 2, 2),
            (1, "circle", "red", 12, 1, 1),
            (5, "square", "blue", 8, 3, 3),
            (15, "square", "red", 7, 0, 7),
        ),
        clutter=2,
    )
    assert scene.answer == 2
    image = render(scene)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    assert image.getpixel((2, 2)) == image.getpixel((11, 11)) == COLOURS["red"]  # the square's corners
    assert image.getpixel((CELL + 1, 1)) == (0, 0, 0)  # the circle's bounding-box corner is background
    assert image.getpixel((CELL + 7, 7)) == COLOURS["red"]  # its centre is not
    assert image.getpixel((CELL + 3 + 4, CELL + 3 + 4)) == COLOURS["blue"]
    assert image.getpixel((3 * CELL, 3 * CELL + 7)) == COLOURS["red"]
    with pytest.raises(ValueError, match="clutter must be one of"):
        draw_scene(__import__("random").Random(0), 4)


def test_rows_hold_a_conversational_prompt_an_image_an_answer_and_the_clutter(datasets):
    train, heldout = datasets
    assert set(train.column_names) == set(heldout.column_names) == {"prompt", "image", "answer", "difficulty"}
    assert len(train) == 300 and len(heldout) == 300
    row = train[0]
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert [p["type"] for p in row["prompt"][0]["content"]] == ["image", "text"]
    assert row["prompt"][0]["content"][1]["text"] == QUESTION
    assert row["image"].size == (IMAGE_SIZE, IMAGE_SIZE)
    assert set(train["answer"]) == {"1", "2", "3", "4", "5"} and set(train["difficulty"]) == {1, 2, 3}
    assert [heldout["difficulty"].count(level) for level in (1, 2, 3)] == [100, 100, 100]


def test_clutter_counts_the_distractors_and_the_answer_the_red_squares():
    import random

    rng = random.Random(7)
    for level, (low, high) in {1: (0, 0), 2: (1, 4), 3: (5, 8)}.items():
        for _ in range(50):
            scene = draw_scene(rng, level)
            red_squares = [o for o in scene.objects if o[1:3] == ("square", "red")]
            assert 1 <= scene.answer == len(red_squares) <= 5
            assert low <= len(scene.objects) - scene.answer <= high
            assert len({o[0] for o in scene.objects}) == len(scene.objects)  # one object per cell


def test_rows_are_deterministic_and_the_heldout_set_is_fixed_and_disjoint(datasets):
    train, heldout = datasets
    again, heldout_again = make_vision_datasets(num_train=300, seed=0)
    other, heldout_other = make_vision_datasets(num_train=300, seed=1)

    def pixels(ds):
        return [image.tobytes() for image in ds["image"]]

    assert pixels(again) == pixels(train) and again["answer"] == train["answer"]
    assert pixels(heldout_again) == pixels(heldout_other) == pixels(heldout)  # does not depend on the training seed
    assert pixels(other) != pixels(train)
    assert not set(pixels(train)) & set(pixels(heldout)) and not set(pixels(other)) & set(pixels(heldout))
    assert len(set(pixels(heldout))) == len(heldout)


def test_the_reward_judges_the_answer_digits_then_eos(shipped):
    _, processor = shipped
    tokenizer = processor.tokenizer
    reward = ArithmeticReward(tokenizer)

    def ids(text, eos=True):
        return [*tokenizer(text, add_special_tokens=False)["input_ids"], *([tokenizer.eos_token_id] if eos else [])]

    assert [len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in "0123456789"] == [1] * 10
    assert reward.score(ids("3"), "3") == 1.0
    assert reward.score(ids("4"), "3") == 0.0
    assert reward.score(ids("3", eos=False), "3") == 0.0  # did not stop
    assert reward.score(ids("03"), "3") == 0.0 and reward.score(ids(" 3"), "3") == 0.0
    assert reward.score(ids("<image>3"), "3") == 0.0
    assert reward(completion_ids=[ids("2"), ids("5")], answer=["2", "2"]) == [1.0, 0.0]


def test_the_builtin_table_holds_the_vision_task():
    task = BUILTIN_TASKS["demo_vision"]
    assert task.images and task.difficulty and not task.allow_steps and task.max_new_tokens() == MAX_NEW_TOKENS == 2
    data = OmegaConf.load("conf/data/demo_vision.yaml")
    assert data.source == "demo_vision" and task_name(data) == "demo_vision" and task_options(data) == {}
    train, heldout = task.rows(12, 0, data.heldout_size, **task_options(data))
    assert len(train) == 12 and len(heldout) == data.heldout_size and "image" in train.column_names
    from k15_plugin.long2short.data import Long2ShortError, task_prompts

    with pytest.raises(Long2ShortError, match="an image task"):
        task_prompts("demo_vision", None, "heldout", None)


def test_shipped_checkpoint_reloads_and_matches_its_record(shipped):
    """The shipped LLaVA reloads with AutoProcessor / AutoModelForImageTextToText; its greedy accuracy on the recorded
    held-out subset is what warm_start.json says; it is right sometimes, with headroom, and better than one guess."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = shipped
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"  # no torchvision needed
    assert isinstance(processor, type(AutoProcessor.from_pretrained(VISION_CHECKPOINT_DIR)))
    assert AutoModelForImageTextToText.from_pretrained(VISION_CHECKPOINT_DIR).config.model_type == "llava"
    assert sum(f.stat().st_size for f in VISION_CHECKPOINT_DIR.iterdir()) < 3_000_000
    info = read_vision_warm_start()
    _, heldout = make_vision_datasets(num_train=1)
    assert info["heldout_size"] == len(heldout)
    subset = heldout.select(info["subset_rows"])
    measured = evaluate_vision_greedy(model, processor, subset)
    assert measured == info["subset"]
    assert 0.2 <= info["heldout"]["accuracy"] <= 0.4
    assert info["heldout"]["accuracy"] > info["heldout_majority_accuracy"] + 0.05  # it reads the picture
    assert len(info["heldout"]["answer_shares"]) >= 2


def test_the_maker_builds_the_shipped_processor_and_trains_deterministically(shipped):
    """The processor built in code renders and encodes a row as the shipped one does, and the warm start is a
    function of its seed: two short runs give identical weights."""
    from argparse import Namespace

    from k15_plugin.data.build.make_vision_checkpoint import (
        build_vision_model,
        build_vision_processor,
        sft_tensors,
        train,
    )

    _, shipped_processor = shipped
    rows = _image_rows(6)
    built = sft_tensors(build_vision_processor(), rows)
    for a, b in zip(built, sft_tensors(shipped_processor, rows), strict=True):
        assert torch.equal(a, b)
    input_ids, labels, pixel_values = built
    assert (input_ids == shipped_processor.tokenizer.convert_tokens_to_ids("<image>")).sum(dim=1).tolist() == [16] * 6
    assert (labels != -100).sum(dim=1).tolist() == [2] * 6  # the answer's digit and EOS
    assert pixel_values.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)

    def run():
        processor = build_vision_processor()
        model = build_vision_model(processor.tokenizer, seed=0, text_hidden=32, vision_hidden=32)
        args = Namespace(seed=0, lr=1e-3, batch=4, max_steps=3, target=1.1)
        train(model, processor, rows, rows.select(range(2)), args)
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)
    processor = build_vision_processor()
    fresh = build_vision_model(processor.tokenizer, seed=0, text_hidden=32, vision_hidden=32).state_dict()
    assert not all(torch.equal(first[k], fresh[k]) for k in first)


def _image_rows(n: int = 8) -> Dataset:
    train, _ = make_vision_datasets(num_train=n, seed=3, heldout_size=3)
    return train


def _train_args(config_cls, out, **options):
    """A trainer config for the training tests on image rows: 16 completions (4 prompts x 4) per step, the task's
    completion limit, CPU, seed 0, a log line per step, and ``options``."""
    return config_cls(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=MAX_NEW_TOKENS,
        logging_steps=1,
        learning_rate=1e-3,
        seed=0,
        disable_tqdm=True,
        **options,
    )


@pytest.mark.parametrize("trainer_name", ["KimiMirrorDescentTrainer", "K15GRPOTrainer", "K15RLOOTrainer"])
def test_each_trainer_takes_two_steps_on_image_rows(tmp_path, shipped, trainer_name):
    """Two optimizer steps on image rows from the shipped checkpoint: finite non-zero losses and gradients, and the
    vision tower moves (the pixels reach the loss)."""
    import k15_plugin.trl as k15_trl

    trainer_cls = getattr(k15_trl, trainer_name)
    config_cls = {
        "KimiMirrorDescentTrainer": k15_trl.KimiMirrorDescentConfig,
        "K15GRPOTrainer": k15_trl.K15GRPOConfig,
        "K15RLOOTrainer": k15_trl.K15RLOOConfig,
    }[trainer_name]
    _, processor = shipped
    model, _ = load_vision_checkpoint()  # a fresh copy: training changes it
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = _train_args(config_cls, tmp_path, max_steps=2, save_strategy="no")
    trainer = trainer_cls(
        model=model,
        reward_funcs=[ArithmeticReward(processor.tokenizer)],
        args=args,
        train_dataset=_image_rows(),
        processing_class=processor,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert [h["step"] for h in logs] == [1, 2]
    for h in logs:
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0, h
        assert 0 < h["reward"] < 1, h  # right sometimes: the groups carry signal
    assert any(h["loss"] != 0 for h in logs)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.startswith("model.vision_tower.") for name in moved)
    assert any(name.startswith("model.multi_modal_projector.") for name in moved)


def test_mixed_text_and_image_rows_are_refused_at_construction(tmp_path, shipped):
    """TRL 1.16 cannot batch rows with and without an image; the plugin's trainers say so before training."""
    from k15_plugin.trl import K15GRPOConfig, K15GRPOTrainer, KimiMirrorDescentConfig, KimiMirrorDescentTrainer
    from k15_plugin.trl.trainer import check_image_rows

    model, processor = shipped
    rows = _image_rows(4)
    text_prompt = [{"role": "user", "content": [{"type": "text", "text": "How many?"}]}]
    mixed = Dataset.from_dict(
        {
            "prompt": [*rows["prompt"], text_prompt],
            "image": [*rows["image"], None],
            "answer": [*rows["answer"], "1"],
        }
    )
    for trainer_cls, config_cls in (
        (KimiMirrorDescentTrainer, KimiMirrorDescentConfig),
        (K15GRPOTrainer, K15GRPOConfig),
    ):
        args = config_cls(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=2)
        with pytest.raises(ValueError, match=r"1 of 5 rows without an image \(column 'image'\).*cannot mix"):
            trainer_cls(
                model=model,
                reward_funcs=[ArithmeticReward(processor.tokenizer)],
                args=args,
                train_dataset=mixed,
                processing_class=processor,
            )
    with pytest.raises(ValueError, match=r"eval_dataset\['x'\] has 1 of 5"):
        check_image_rows({"x": mixed}, "eval_dataset")
    # an `images` column: an empty list beside rows with images is a row without one; all empty is text-only
    listed = Dataset.from_dict({"prompt": ["a", "b"], "images": [[rows["image"][0]], []]})
    with pytest.raises(ValueError, match="1 of 2 rows without an image"):
        check_image_rows(listed)
    check_image_rows(Dataset.from_dict({"prompt": ["a", "b"], "images": [[], []]}))
    check_image_rows(rows)
    check_image_rows(Dataset.from_dict({"prompt": ["a"]}))


def test_partial_rollouts_with_image_rows_are_refused(tmp_path, shipped):
    """Partial rollouts continue trajectories from token ids alone, so image rows would lose their pictures."""
    from k15_plugin.trl import KimiMirrorDescentConfig, KimiMirrorDescentTrainer

    model, processor = shipped
    args = KimiMirrorDescentConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=2, max_completion_length=2
    )
    args.rollout_segment_tokens = 1
    with pytest.raises(ValueError, match=r"rollout_segment_tokens=1 \(partial rollouts\) with image rows"):
        KimiMirrorDescentTrainer(
            model=model,
            reward_funcs=[ArithmeticReward(processor.tokenizer)],
            args=args,
            train_dataset=_image_rows(4),
            processing_class=processor,
        )


def test_length_penalty_and_prioritized_sampler_resume_exactly_on_image_rows(tmp_path):
    """k1.5 with the length penalty from step 0 and the prioritized sampler on image rows: a run resumed from the
    checkpoint of its first step ends as the uninterrupted run (weights, loss and the sampler's statistics)."""
    from k15_plugin.trl import KimiMirrorDescentConfig, KimiMirrorDescentTrainer

    def trainer(out, max_steps):
        model, processor = load_vision_checkpoint()
        args = _train_args(
            KimiMirrorDescentConfig,
            out,
            max_steps=max_steps,
            num_iterations=1,
            save_steps=1,
            save_strategy="steps",
            length_penalty_weight=0.5,
            length_penalty_warmup_steps=0,
            sampler_type="prioritized",
        )
        return KimiMirrorDescentTrainer(
            model=model,
            reward_funcs=[ArithmeticReward(processor.tokenizer)],
            args=args,
            train_dataset=_image_rows(16),
            processing_class=processor,
        )

    straight = trainer(tmp_path / "a", 2)
    straight.train()
    resumed = trainer(tmp_path / "b", 2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    sampler_state = sorted((tmp_path / "a" / "checkpoint-2").glob("*sampler*"))
    assert sampler_state, sorted(p.name for p in (tmp_path / "a" / "checkpoint-2").iterdir())
    assert (
        sampler_state[0].read_bytes()
        == next((tmp_path / "b" / "checkpoint-2").glob(sampler_state[0].name)).read_bytes()
    )
