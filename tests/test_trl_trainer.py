"""KimiMirrorDescentTrainer and the plugin's GRPO/RLOO trainers on a tiny Llama, on CPU."""

import copy

import pytest
import torch
from transformers import TrainerCallback

import k15_plugin.trl.trainer as trainer_module
from k15_plugin.core import length_reward
from k15_plugin.data.arithmetic import ArithmeticReward, make_datasets
from k15_plugin.data.build.warm_start import build_tokenizer, tiny_test_model
from k15_plugin.trl import (
    K15GRPOConfig,
    K15GRPOTrainer,
    K15RLOOConfig,
    K15RLOOTrainer,
    KimiMirrorDescentConfig,
    KimiMirrorDescentTrainer,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def train_dataset():
    train, _ = make_datasets(seed=0)
    return train.select(range(64))


def _args(config_cls, tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        seed=0,
        disable_tqdm=True,
    )
    base.update(overrides)
    return config_cls(**base)


def _length_reward_func(completion_ids, **kwargs):
    """A reward with signal on the random tiny model: 1 for completions of <= 3 tokens."""
    return [1.0 if len(ids) <= 3 else 0.0 for ids in completion_ids]


class _Recorder(TrainerCallback):
    def __init__(self):
        self.optimizer_steps = []
        self.learning_rates = []

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        inner = optimizer
        while not isinstance(inner, torch.optim.Optimizer):
            inner = inner.optimizer
        steps = {int(s["step"]) for s in inner.state.values()}
        self.optimizer_steps.append(steps)
        self.learning_rates.append(lr_scheduler.get_last_lr()[0])


def test_three_step_run_changes_parameters_and_logs(tmp_path, tokenizer, train_dataset):
    model = tiny_test_model(tokenizer)
    before = copy.deepcopy(model.state_dict())
    args = _args(KimiMirrorDescentConfig, tmp_path, num_iterations=2, tau=0.5)
    trainer = KimiMirrorDescentTrainer(
        model=model,
        reward_funcs=[_length_reward_func],
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    changed = [name for name, p in model.state_dict().items() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)  # every tensor moved

    logs = [h for h in trainer.state.log_history if "k15/l2_loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    # step 1: first update of rollout batch 1 (pi_theta == pi_i): the l2 term is exactly 0;
    # step 2: second update of the same batch: non-zero; step 3: first update of batch 2: 0 again
    assert logs[0]["k15/l2_loss"] == 0.0 and logs[0]["k15/abs_log_ratio"] == 0.0
    assert logs[1]["k15/l2_loss"] > 0.0 and logs[1]["k15/abs_log_ratio"] > 0.0
    assert logs[2]["k15/l2_loss"] == 0.0
    for key in ("k15/policy_loss", "k15/baseline", "reward", "reward_std", "completions/mean_length"):
        assert key in logs[0], key


def _count_logp_passes(trainer):
    calls = {"n": 0}
    original = trainer._get_per_token_logps_and_entropies

    def counted(*a, **kw):
        calls["n"] += 1
        return original(*a, **kw)

    trainer._get_per_token_logps_and_entropies = counted
    return calls


@pytest.mark.parametrize("num_iterations, expect_old", [(1, False), (3, True)])
def test_old_logps_exist_exactly_when_needed(tmp_path, tokenizer, train_dataset, num_iterations, expect_old):
    args = _args(KimiMirrorDescentConfig, tmp_path, num_iterations=num_iterations, max_steps=1)
    trainer = KimiMirrorDescentTrainer(
        model=tiny_test_model(tokenizer),
        reward_funcs=[ArithmeticReward(tokenizer)],
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    calls = _count_logp_passes(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    inputs = trainer._prepare_inputs(batch)
    assert ("old_per_token_logps" in inputs) is expect_old
    # one forward for pi_i when needed, none otherwise (the loss's own forward is not part of _prepare_inputs)
    assert calls["n"] == (1 if expect_old else 0)
    if expect_old:  # pi_i's log-probs equal the current policy's before any update
        per_token, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].size(1),
        )
        mask = inputs["completion_mask"].bool()
        assert torch.allclose(per_token[mask], inputs["old_per_token_logps"][mask], atol=1e-5)


def _one_sgd_step_delta(tmp_path, tokenizer, train_dataset, **overrides):
    model = tiny_test_model(tokenizer, seed=1)
    before = copy.deepcopy(model.state_dict())
    args = _args(
        KimiMirrorDescentConfig,
        tmp_path,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        max_completion_length=8,
        **overrides,
    )
    trainer = KimiMirrorDescentTrainer(
        model=model,
        reward_funcs=[_length_reward_func],
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    return {name: before[name] - p for name, p in model.state_dict().items()}  # = lr * grad = grad


def test_gradient_accumulation_equals_full_batch(tmp_path, tokenizer, train_dataset):
    # Same generation batch (16 completions, generated in one call with the same seed) either as one micro-batch
    # or as 2 micro-batches of 8 accumulated: plain SGD with lr 1 makes the parameter change the gradient itself.
    full = _one_sgd_step_delta(tmp_path / "a", tokenizer, train_dataset, per_device_train_batch_size=16)
    accumulated = _one_sgd_step_delta(
        tmp_path / "b", tokenizer, train_dataset, per_device_train_batch_size=8, gradient_accumulation_steps=2
    )
    norm = torch.sqrt(sum((d**2).sum() for d in full.values()))
    assert norm > 1e-3  # the batch carried a learning signal
    for name in full:
        assert torch.allclose(full[name], accumulated[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_reset_each_rollout_batch_keeps_lr_schedule(tmp_path, tokenizer, train_dataset, reset):
    recorder = _Recorder()
    args = _args(
        KimiMirrorDescentConfig,
        tmp_path,
        num_iterations=2,
        max_steps=5,
        reset_optimizer_each_iteration=reset,
        lr_scheduler_type="linear",
    )
    trainer = KimiMirrorDescentTrainer(
        model=tiny_test_model(tokenizer),
        reward_funcs=[_length_reward_func],
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    trainer.train()
    # AdamW's per-parameter step count after each optimizer step; rollout batches span steps (1, 2), (3, 4), (5,)
    expected = [{1}, {2}, {1}, {2}, {1}] if reset else [{1}, {2}, {3}, {4}, {5}]
    assert recorder.optimizer_steps == expected
    # linear decay from 1e-3 to 0 over 5 steps, untouched by the resets
    assert recorder.learning_rates == pytest.approx([8e-4, 6e-4, 4e-4, 2e-4, 0.0])


def test_length_penalty_uses_the_gathered_group(monkeypatch, tmp_path, tokenizer, train_dataset):
    """One group of k=4 split over two simulated processes: the length reward must see all four lengths."""
    args = _args(K15GRPOConfig, tmp_path, length_penalty_weight=0.5, length_penalty_correct_threshold=1.0)
    trainer = K15GRPOTrainer(
        model=tiny_test_model(tokenizer),
        reward_funcs=[_length_reward_func],
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    # this process holds samples 0, 1 of the group (lengths 2 and 5); the other process holds 2, 3 (lengths 8, 4)
    local_ids = [[3, 2], [3, 4, 5, 6, 2]]
    remote_rewards = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # task reward, length slot (filled after gathering)
    remote_lengths = torch.tensor([8, 4])

    def fake_gather(t):
        return torch.cat([t, remote_rewards if t.dim() == 2 else remote_lengths.to(t.dtype)])

    monkeypatch.setattr("trl.trainer.grpo_trainer.gather", fake_gather)
    monkeypatch.setattr(trainer_module, "gather", fake_gather)
    trainer.model.train()
    inputs = [{"prompt": "1+1=", "answer": "2"}] * 2
    rewards = trainer._calculate_rewards(inputs, ["1+1="] * 2, ["x", "xxxx"], local_ids)
    # task rewards over the group: (1, 0, 0, 0) (only the 2-token completion is <= 3 tokens)
    # lengths (2, 5, 8, 4): min 2, max 8 -> lambda = 0.5 - (len - 2) / 6 = (0.5, 0, -0.5, 1/6)
    # correct (T, F, F, F) -> (0.5, min(0, 0) = 0, -0.5, min(0, 1/6) = 0); TRL applies the weight 0.5 through
    # reward_weights, so the column holds the unweighted length reward
    assert torch.allclose(rewards[:, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(rewards[:, 1], torch.tensor([0.5, 0.0, -0.5, 0.0]))
    assert trainer.reward_weights.tolist() == [1.0, 0.5]
    # the per-process slice alone would have given (0.5, -0.5) for this process: a different answer
    local_only = length_reward(torch.tensor([2, 5]), torch.tensor([True, False]), 2)
    assert not torch.allclose(rewards[:2, 1], local_only)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_length_penalty_with_host_baselines_and_warmup(tmp_path, tokenizer, train_dataset, algorithm):
    config_cls, trainer_cls = (
        (K15GRPOConfig, K15GRPOTrainer) if algorithm == "grpo" else (K15RLOOConfig, K15RLOOTrainer)
    )
    # beta=0: RLOO's default KL term would build a reference model from the model's Hub path
    args = _args(config_cls, tmp_path, length_penalty_weight=0.5, length_penalty_warmup_steps=2, max_steps=3, beta=0.0)
    trainer = trainer_cls(
        model=tiny_test_model(tokenizer),
        reward_funcs=[_length_reward_func],
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "length_penalty/weight" in h]
    assert [h["length_penalty/weight"] for h in logs] == [0.0, 0.0, 0.5]  # off during the 2 warm-up steps
    # during the warm-up the reward is the task reward alone; the length column (unweighted) is still logged
    assert logs[0]["reward"] == pytest.approx(logs[0]["rewards/_length_reward_func/mean"])
    assert logs[2]["rewards/length_penalty/std"] > 0.0


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"tau": -1.0}, "tau"),
        ({"tau": 0.0}, "tau"),
        ({"log_z_estimator": "max"}, "log_z_estimator"),
        ({"beta": 0.1}, "beta"),
        ({"sampler_type": "nonexistent"}, "sampler_type"),
        ({"length_penalty_weight": -0.5}, "length_penalty_weight"),
        ({"length_penalty_warmup_steps": -1}, "length_penalty_warmup_steps"),
        ({"prioritized_floor": 0.0}, "prioritized_floor"),
        ({"curriculum_schedule": "linear"}, "curriculum_schedule"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, key):
    with pytest.raises(ValueError, match=key):
        _args(KimiMirrorDescentConfig, tmp_path, **overrides)


def test_trainer_needs_plugin_config(tmp_path, tokenizer, train_dataset):
    from trl import GRPOConfig

    with pytest.raises(ValueError, match="KimiMirrorDescentConfig"):
        KimiMirrorDescentTrainer(
            model=tiny_test_model(tokenizer),
            reward_funcs=[_length_reward_func],
            args=_args(GRPOConfig, tmp_path),
            train_dataset=train_dataset,
            processing_class=tokenizer,
        )
