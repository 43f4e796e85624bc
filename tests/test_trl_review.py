"""The trainers on the paths a real run takes: unscorable completions, reward aggregation, vLLM's importance ratio,
the optimizer reset's timing, and what the logs show. Each test fails on the code before its fix."""

import logging

import pytest
import torch

from k15_plugin.data.arithmetic import make_datasets
from k15_plugin.data.build.warm_start import build_tokenizer, tiny_test_model
from k15_plugin.trl import K15GRPOConfig, K15GRPOTrainer, KimiMirrorDescentConfig, KimiMirrorDescentTrainer

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
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        seed=0,
        disable_tqdm=True,
    )
    base.update(overrides)
    return config_cls(**base)


def _short_or_none(completion_ids, **kwargs):
    """1 for completions of <= 2 tokens, 0 for 3-4 tokens, None (cannot score) for longer ones."""
    return [1.0 if len(ids) <= 2 else 0.0 if len(ids) <= 4 else None for ids in completion_ids]


def _trainer(cls, config_cls, tmp_path, tokenizer, train_dataset, reward=_short_or_none, **overrides):
    return cls(
        model=tiny_test_model(tokenizer),
        reward_funcs=[reward],
        args=_args(config_cls, tmp_path, **overrides),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )


def _rollout(trainer):
    """One generation batch through TRL's _prepare_inputs, as the first micro-step of training does."""
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


# ------------------------------------------------------------------------------------------- unscorable completions
def test_unscorable_completion_gets_no_length_reward_and_is_not_counted(tmp_path, tokenizer, train_dataset):
    trainer = _trainer(
        K15GRPOTrainer,
        K15GRPOConfig,
        tmp_path,
        tokenizer,
        train_dataset,
        length_penalty_weight=0.5,
        sampler_type="prioritized",
    )
    trainer.model.train()
    sampler = trainer._k15_sampler = trainer._get_train_sampler()
    # one group of k=4, lengths (2, 9, 1, 4): rewards 1, None, 1, 0 -> the 9-token completion is unscorable
    ids = [[5, 2], [5] * 8 + [2], [2], [5, 5, 5, 2]]
    inputs = [{"prompt": "1+1=", "answer": "2", "k15_index": 7}] * 4
    rewards = trainer._calculate_rewards(inputs, ["1+1="] * 4, ["x"] * 4, ids)
    # scored lengths (2, 1, 4): min 1, max 4, span 3; lambda = 0.5 - (len - 1)/3 -> (1/6, -, 0.5, -0.5)
    # correct (T, -, T, F): (1/6, NaN, 0.5, min(0, -0.5) = -0.5)
    assert torch.isnan(rewards[1]).all()  # every column NaN: TRL treats the row as unscorable
    assert rewards[[0, 2, 3], 1].tolist() == pytest.approx([1 / 6, 0.5, -0.5])
    # the sampler saw three attempts at problem 7, two of them correct
    assert sampler.tracker.state_dict()["attempts"][7].item() == 3
    assert sampler.tracker.state_dict()["successes"][7].item() == 2


def test_trl_still_warns_when_every_reward_is_none(tmp_path, tokenizer, train_dataset, caplog):
    trainer = _trainer(
        K15GRPOTrainer,
        K15GRPOConfig,
        tmp_path,
        tokenizer,
        train_dataset,
        reward=lambda completions, **kw: [None] * 4,
        length_penalty_weight=0.5,
    )
    trainer.model.train()
    with caplog.at_level(logging.WARNING):
        rewards = trainer._calculate_rewards([{"prompt": "p"}] * 4, ["p"] * 4, ["x"] * 4, [[2], [5, 2], [2], [2]])
    assert "All reward functions returned None" in caplog.text
    assert torch.isnan(rewards).all()


def test_mirror_descent_gives_unscorable_completions_no_advantage(tmp_path, tokenizer, train_dataset):
    trainer = _trainer(
        KimiMirrorDescentTrainer, KimiMirrorDescentConfig, tmp_path, tokenizer, train_dataset, max_completion_length=8
    )
    inputs = _rollout(trainer)
    lengths = inputs["completion_mask"].sum(dim=1)  # (B,)
    unscorable = lengths > 4
    assert unscorable.any() and (~unscorable).any()  # the random tiny model makes both kinds
    assert inputs["advantages"][unscorable].abs().sum().item() == 0.0
    # the table TRL logs shows the advantages mirror descent trains on (r - b), not TRL's (r - mean) / std
    logged = torch.tensor(list(trainer._logs["advantages"]))
    assert torch.allclose(logged.sort().values, inputs["advantages"].sort().values)


# ------------------------------------------------------------------------------------------- reward aggregation
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_length_penalty_weight_survives_trl_aggregation(tmp_path, tokenizer, train_dataset, aggregation):
    advantages = {}
    for weight in (0.01, 1.0):
        trainer = _trainer(
            K15GRPOTrainer,
            K15GRPOConfig,
            tmp_path / str(weight),
            tokenizer,
            train_dataset,
            reward=lambda completion_ids, **kw: [1.0 if len(i) <= 3 else 0.0 for i in completion_ids],
            length_penalty_weight=weight,
            multi_objective_aggregation=aggregation,
            max_completion_length=8,
            scale_rewards="none",
        )
        torch.manual_seed(0)
        advantages[weight] = _rollout(trainer)["advantages"]
        assert trainer.reward_weights.tolist() == pytest.approx([1.0, weight])
    # same completions (same seed), a hundredfold weight: the advantages must move
    assert (advantages[1.0] - advantages[0.01]).abs().max().item() > 0.1


# ------------------------------------------------------------------------------------------- vLLM importance ratio
def test_importance_ratio_weights_the_whole_sample_loss(tmp_path, tokenizer, train_dataset):
    trainer = _trainer(
        KimiMirrorDescentTrainer,
        KimiMirrorDescentConfig,
        tmp_path,
        tokenizer,
        train_dataset,
        reward=lambda completion_ids, **kw: [float(len(i) <= 3) for i in completion_ids],
        steps_per_generation=2,
        tau=0.5,
    )
    inputs = dict(_rollout(trainer))
    trainer.state.global_step = 1  # as if an optimizer step had happened: pi_i comes from the generation pass
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"] - 0.1  # so the squared term is not zero
    b = len(inputs["advantages"])
    losses = []
    for ratio in (torch.ones(b, 1), torch.full((b, 1), 2.0), torch.zeros(b, 1)):
        inputs["importance_sampling_ratio"] = ratio
        losses.append(trainer._compute_loss(trainer.model, inputs).item())
    assert trainer._metrics["train"]["k15/l2_loss"][0] > 0
    assert losses[1] == pytest.approx(2 * losses[0], rel=1e-5)  # policy and squared term both doubled
    assert losses[2] == 0.0


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"vllm_importance_sampling_mode": "token_truncate"}, "vllm_importance_sampling_mode"),
        ({"loss_type": "grpo"}, "loss_type"),
        ({"epsilon_high": 0.28}, "epsilon_high"),
        ({"scale_rewards": "none"}, "scale_rewards"),
        ({"entropy_coef": 0.01}, "entropy_coef"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
        ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold"),
    ],
)
def test_mirror_descent_refuses_options_it_would_ignore(tmp_path, overrides, key):
    with pytest.raises(ValueError, match=f"^{key}="):
        _args(KimiMirrorDescentConfig, tmp_path, **overrides)


# ------------------------------------------------------------------------------------------- optimizer reset
def test_reset_happens_at_rollout_boundaries_only(tmp_path, tokenizer, train_dataset):
    trainer = _trainer(
        KimiMirrorDescentTrainer, KimiMirrorDescentConfig, tmp_path, tokenizer, train_dataset, steps_per_generation=2
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=4)
    param = next(trainer.model.parameters())
    # a resumed run: optimizer state restored from a checkpoint taken after the first of the rollout's two steps;
    # TRL regenerates because nothing is buffered, but this is not a new rollout batch
    trainer.optimizer.state[param]["step"] = torch.tensor(1.0)
    trainer._step, trainer._buffered_inputs = 1, None
    _rollout(trainer)
    assert param in trainer.optimizer.state and trainer._k15_resets == 0
    # a real rollout boundary clears it
    trainer._step = 2
    _rollout(trainer)
    assert not trainer.optimizer.state and trainer._k15_resets == 1


@pytest.mark.parametrize("steps_per_generation, warns", [(1, True), (4, False)])
def test_warns_once_when_a_rollout_feeds_one_optimizer_step(
    tmp_path, tokenizer, train_dataset, caplog, steps_per_generation, warns
):
    with caplog.at_level(logging.WARNING, logger="k15_plugin.trl.trainer"):
        _trainer(
            KimiMirrorDescentTrainer,
            KimiMirrorDescentConfig,
            tmp_path,
            tokenizer,
            train_dataset,
            per_device_train_batch_size=4,
            steps_per_generation=steps_per_generation,
        )
    messages = [r.message for r in caplog.records if "one optimizer step per rollout batch" in r.message]
    assert len(messages) == (1 if warns else 0)


def test_several_steps_per_rollout_log_the_squared_term_and_resets(tmp_path, tokenizer, train_dataset):
    trainer = _trainer(
        KimiMirrorDescentTrainer,
        KimiMirrorDescentConfig,
        tmp_path,
        tokenizer,
        train_dataset,
        reward=lambda completion_ids, **kw: [float(len(i) <= 3) for i in completion_ids],
        per_device_train_batch_size=8,
        steps_per_generation=2,
        max_steps=4,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "k15/l2_loss" in h]
    # steps 1, 3 open a rollout batch (pi_theta == pi_i, squared term 0); steps 2, 4 are the second step on it
    assert [h["k15/l2_loss"] == 0.0 for h in logs] == [True, False, True, False]
    assert [h["k15/optimizer_resets"] for h in logs] == [0.0, 0.0, 1.0, 1.0]  # cumulative; none before step 1


# ------------------------------------------------------------------------------------------- fp32 master weights
@pytest.mark.parametrize("dtype, min_changed, max_changed", [(torch.float32, 0.99, 1.0), (torch.bfloat16, 0.0, 0.5)])
def test_lr_1e6_changes_weights_only_with_fp32_master_weights(
    tmp_path, tokenizer, train_dataset, dtype, min_changed, max_changed
):
    """The real-model recipes load float32 weights and compute in bf16 (trainer.bf16); pure bf16 weights (what they
    loaded before) lose most lr-1e-6 updates to rounding, which is why k15-train refuses them."""
    model = tiny_test_model(tokenizer).to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = KimiMirrorDescentTrainer(
        model=model,
        reward_funcs=[lambda completion_ids, **kw: [float(len(i) <= 3) for i in completion_ids]],
        args=_args(
            KimiMirrorDescentConfig,
            tmp_path,
            learning_rate=1e-6,
            max_steps=1,
            bf16=True,
            reset_optimizer_each_iteration=False,
        ),
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    total = sum(p.numel() for p in before.values())
    assert min_changed <= changed / total <= max_changed


def test_warns_when_no_completion_can_count_as_correct(tmp_path, tokenizer, train_dataset, caplog):
    # reward weight 0.5 on a 0/1 reward: the weighted task reward never reaches the default threshold 1.0
    with caplog.at_level(logging.WARNING, logger="k15_plugin.trl.trainer"):
        _trainer(
            K15GRPOTrainer,
            K15GRPOConfig,
            tmp_path,
            tokenizer,
            train_dataset,
            reward_weights=[0.5],
            length_penalty_weight=0.1,
            scale_rewards="none",
        )
    assert any("length_penalty_correct_threshold=1.0 is above" in r.message for r in caplog.records)
