"""The CLI's held-out evaluation: through the trainer, sharded over processes, plain greedy decoding."""

import pytest
import torch

from k15_plugin.cli.heldout import heldout_metrics
from k15_plugin.data.arithmetic import evaluate_greedy, load_demo_checkpoint
from k15_plugin.data.tasks import load_task
from k15_plugin.trl import KimiMirrorDescentConfig, KimiMirrorDescentTrainer

torch.set_num_threads(1)


class _Data:  # the fields of a composed `data` config that load_task reads for the demo task
    source, num_train, heldout_size, filler_max, terms = "demo_arithmetic", 200, 120, 0, 2


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load_demo_checkpoint()
    return model, tokenizer, load_task(_Data, tokenizer, seed=0, max_new_tokens=4)


def test_greedy_evaluation_ignores_the_checkpoints_generation_config(demo):
    model, tokenizer, task = demo
    plain = evaluate_greedy(model, tokenizer, task.heldout)
    model.generation_config.repetition_penalty = 5.0  # what an instruct checkpoint may ship (Qwen2.5: 1.05)
    model.generation_config.no_repeat_ngram_size = 1
    try:
        assert evaluate_greedy(model, tokenizer, task.heldout) == plain
        assert task.evaluate(model, tokenizer, task.heldout) == plain
    finally:
        model.generation_config.repetition_penalty = 1.0
        model.generation_config.no_repeat_ngram_size = 0


def test_heldout_metrics_through_the_trainer_equal_direct_decoding(demo, tmp_path):
    model, tokenizer, task = demo
    args = KimiMirrorDescentConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=4,
        max_steps=1,
        save_strategy="no",
    )
    trainer = KimiMirrorDescentTrainer(
        model=model, reward_funcs=task.reward_funcs, args=args, train_dataset=task.train, processing_class=tokenizer
    )
    assert heldout_metrics(trainer, task, tokenizer) == pytest.approx(evaluate_greedy(model, tokenizer, task.heldout))
    first = task.heldout.select(range(50))
    assert heldout_metrics(trainer, task, tokenizer, 50) == pytest.approx(evaluate_greedy(model, tokenizer, first))
