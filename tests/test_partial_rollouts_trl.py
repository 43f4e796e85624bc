"""Partial rollouts and repeat detection in the plugin's TRL trainers, on a tiny Llama, on CPU.

Most tests script the generation (a function of the prompt and the tokens so far, patched into TRL's
``_generate_single_turn``), so what each rollout batch must contain is known exactly; the rest use the real model.
"""

import json

import pytest
import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from k15_plugin.core.partial_rollouts import PartialRolloutBuffer
from k15_plugin.data.arithmetic import make_datasets
from k15_plugin.data.build.warm_start import build_tokenizer, tiny_test_model
from k15_plugin.trl import (
    K15GRPOConfig,
    K15GRPOTrainer,
    K15RLOOConfig,
    K15RLOOTrainer,
    KimiMirrorDescentConfig,
    KimiMirrorDescentTrainer,
)
from k15_plugin.trl.partial import PARTIAL_STATE_NAME, TOKEN_WEIGHTS

torch.set_num_threads(1)

EQUALS, EOS = 14, 2
TRAINERS = {
    "kimi_md": (KimiMirrorDescentTrainer, KimiMirrorDescentConfig, {}),
    "grpo": (K15GRPOTrainer, K15GRPOConfig, {}),
    "rloo": (K15RLOOTrainer, K15RLOOConfig, {"beta": 0.0}),  # beta=0: no reference model from the Hub
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    train, _ = make_datasets(seed=0)
    return train.select(range(96))


def _args(config_cls, tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=12,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        seed=0,
        disable_tqdm=True,
    )
    base.update(overrides)
    return config_cls(**base)


def _trainer(name, tmp_path, tokenizer, dataset, reward, callbacks=(), **overrides):
    trainer_cls, config_cls, extra = TRAINERS[name]
    return trainer_cls(
        model=tiny_test_model(tokenizer, seed=0),
        reward_funcs=[reward],
        args=_args(config_cls, tmp_path, **{**extra, **overrides}),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


class Recorder:
    """Reward function that records every scored batch: (global step, prompts, completion ids)."""

    __name__ = "recorder"

    def __init__(self, score=lambda ids: float(len(ids) <= 3)):
        self.score = score
        self.batches = []

    def __call__(self, prompts, completion_ids, trainer_state, **kwargs):
        self.batches.append((trainer_state.global_step, list(prompts), [list(x) for x in completion_ids]))
        return [self.score(ids) for ids in completion_ids]


# ----------------------------------------------------------------------------------------------------------------------
# A scripted generator: the completion of "a+b=" is a function of (a, b); a call continues it by at most the
# budget TRL's generation config holds at that moment.
# ----------------------------------------------------------------------------------------------------------------------


def target(prompt_ids: list[int]) -> list[int]:
    digits = prompt_ids[1 : prompt_ids.index(EQUALS)]
    s = sum(digits)
    if s % 7 == 0:  # a loop: 5 6 5 6 ... (12 tokens, never ends by itself)
        return [5, 6] * 6
    if s % 3 == 0:  # long: 9 tokens + EOS
        return [3 + (s + i) % 10 for i in range(9)] + [EOS]
    return [3 + s % 10, EOS]  # short


def scripted_single_turn(self, prompt_ids, images, multimodal_fields, num_generations=None, *rest):
    budget = self.generation_config.max_new_tokens
    out = []
    for prefix in prompt_ids:
        prompt_end = prefix.index(EQUALS) + 1
        done = len(prefix) - prompt_end
        out.append(target(prefix[:prompt_end])[done : done + budget])
    return out, None


@pytest.fixture
def scripted(monkeypatch):
    calls = []

    def recording(self, prompt_ids, *args, **kwargs):
        calls.append((self.generation_config.max_new_tokens, [list(p) for p in prompt_ids]))
        return scripted_single_turn(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", recording)
    return calls


def _outputs(trainer):
    """Wrap the trainer's rollout so every batch TRL builds is kept, with the policy version that generated each token
    (``out["versions"]``, per row) and the version it trains under (``out["step"]``)."""
    outputs, original = [], trainer._generate_and_score_completions

    def wrapped(inputs):
        out = original(inputs)
        members = [m for g in trainer._k15_last_emitted for m in g.members]
        versions = [PartialRolloutBuffer.token_versions(m) for m in members]
        behaviour = [m.logprobs for m in members]
        outputs.append({**out, "versions": versions, "behaviour": behaviour, "step": trainer.state.global_step})
        return out

    trainer._generate_and_score_completions = wrapped
    return outputs


@pytest.mark.parametrize("mask", ["all", "latest"])
def test_trajectories_continue_over_segments_and_groups_train_whole(tmp_path, tokenizer, dataset, scripted, mask):
    reward = Recorder()
    trainer = _trainer(
        "kimi_md", tmp_path, tokenizer, dataset, reward, rollout_segment_tokens=4, max_steps=6, rollout_loss_mask=mask
    )
    outputs = _outputs(trainer)
    trainer.train()

    assert {budget for budget, _ in scripted} == {4}  # every call capped at one segment
    assert trainer.generation_config.max_new_tokens == 12  # and restored afterwards
    fresh_calls = [prefixes for _, prefixes in scripted if all(p[-1] == EQUALS for p in prefixes)]
    assert len(fresh_calls[0]) == 3 * 16  # the first rollout batch admits 2 extra batches (12 / 4 - 1)
    delayed = stale_last_segments = 0
    for (_step, prompts, completions), out in zip(reward.batches, outputs, strict=True):
        prompt_ids = tokenizer(prompts)["input_ids"]
        for g in range(0, 16, 4):  # whole groups of 4 consecutive rows, each completion its full target
            assert len(set(prompts[g : g + 4])) == 1
        for ids, completion in zip(prompt_ids, completions, strict=True):
            assert completion == target(ids)
        # the loss mask: every token, or only the tokens the current policy generated
        assert [len(v) for v in out["versions"]] == [len(c) for c in completions]
        expected = [[1] * len(v) if mask == "all" else [int(x == out["step"]) for x in v] for v in out["versions"]]
        got = out.get("tool_mask")
        if mask == "all":
            assert got is None
        else:
            got = (got * out["completion_mask"]).tolist()
            assert [row[: len(e)] for row, e in zip(got, expected, strict=True)] == expected
        delayed += any(len(c) > 4 for c in completions)
        stale_last_segments += sum(v[-1] < out["step"] for v in out["versions"])
    assert delayed  # long trajectories reached training
    assert stale_last_segments  # some trajectories' last segments were generated by an older policy
    logs = [h for h in trainer.state.log_history if "k15/partial/buffer_groups" in h]
    assert all(h["k15/partial/buffer_groups"] > 0 for h in logs)  # groups stay in flight between rollout batches
    stale = [h["k15/partial/stale_token_share"] for h in logs]
    ages = [h["k15/partial/oldest_token_age"] for h in logs]
    if mask == "all":
        assert max(ages) >= 1 and max(stale) > 0  # some trained tokens are from older policies
        assert all(0 <= x <= 1 for x in stale)
    else:  # the staleness of what the loss trains: none under "latest"
        assert max(ages) == 0 and max(stale) == 0


def test_repeats_are_stopped_counted_incorrect_and_penalized(tmp_path, tokenizer, dataset, scripted):
    reward = Recorder(score=lambda ids: 1.0)  # every completion "correct" for the task reward
    trainer = _trainer(
        "grpo",
        tmp_path,
        tokenizer,
        dataset,
        reward,
        rollout_segment_tokens=4,
        repeat_detection=True,
        repeat_min_period=1,
        repeat_max_period=2,
        repeat_min_count=3,
        repeat_min_span=6,
        repeat_penalty=0.25,
        length_penalty_weight=0.5,
        max_steps=3,
    )
    rewards = []
    calculate = trainer._calculate_rewards

    def recording(*args):
        out = calculate(*args)
        rewards.append(out.clone())
        return out

    trainer._calculate_rewards = recording
    trainer.train()
    assert trainer.reward_func_names == ["recorder", "repeat_penalty", "length_penalty"]
    seen = 0
    for (_, prompts, completions), r in zip(reward.batches, rewards, strict=True):
        for ids, completion, row in zip(tokenizer(prompts)["input_ids"], completions, r, strict=True):
            looping = target(ids) == [5, 6] * 6
            if looping:  # cut at the first point the rule fires: 5 6 5 6 5 6 (3 copies of period 2, span 6)
                assert completion == [5, 6, 5, 6, 5, 6]
            assert row[0].item() == (0.0 if looping else 1.0)  # task reward zeroed: counted incorrect
            assert row[1].item() == (-0.25 if looping else 0.0)
            seen += looping
    assert seen
    logs = [h for h in trainer.state.log_history if "k15/repeat/rate" in h]
    assert logs and "rewards/repeat_penalty/mean" in logs[0]


@pytest.mark.parametrize("name", list(TRAINERS))
def test_one_segment_per_trajectory_is_exactly_trls_generation(tmp_path, tokenizer, dataset, name):
    """With the budget equal to max_completion_length the machinery is on but never binds: the same completions,
    rewards and weights as TRL's own generation, bit for bit."""
    runs = {}
    for label, extra in {"plain": {}, "machinery": {"rollout_segment_tokens": 6}}.items():
        reward = Recorder()
        trainer = _trainer(
            name, tmp_path / label, tokenizer, dataset, reward, max_completion_length=6, max_steps=3, **extra
        )
        trainer.train()
        runs[label] = (reward.batches, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    assert runs["plain"][0] == runs["machinery"][0]
    for n, p in runs["plain"][1].items():
        assert torch.equal(p, runs["machinery"][1][n]), n


def test_greedy_segments_reproduce_one_shot_greedy_generation(tmp_path, tokenizer, dataset):
    """The real model, greedy, weights frozen (lr 0): 2-token segments continued from prompt + prefix give the
    completions one generate call of 6 tokens gives."""
    reward = Recorder()
    trainer = _trainer(
        "kimi_md",
        tmp_path,
        tokenizer,
        dataset,
        reward,
        rollout_segment_tokens=2,
        max_completion_length=6,
        learning_rate=0.0,
        max_steps=2,
        generation_kwargs={"do_sample": False},
    )
    trainer.train()
    model = trainer.model.eval()
    for _, prompts, completions in reward.batches:
        assert max(map(len, completions)) > 2  # some trajectories did span several segments
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=0)
            expected = out[0, ids.shape[1] :].tolist()
            if EOS in expected:
                expected = expected[: expected.index(EOS) + 1]
            assert completion == expected, prompt


class Snapshots(TrainerCallback):
    """The weights after every optimizer step: ``weights[v]`` is policy version v, which generates at step v."""

    def __init__(self):
        self.weights = {}

    def _keep(self, state, model):
        """A copy of the weights as they are at ``state.global_step``."""
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.state_dict().items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Version 0: the initial weights."""
        self._keep(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """The version after each optimizer step."""
        self._keep(state, model)


@pytest.mark.parametrize("name", ["kimi_md", "rloo"])
def test_behaviour_logprobs_are_the_generating_policys_processed_scores(tmp_path, tokenizer, dataset, name):
    """transformers ``generate``, sampling with temperature, top-k and top-p: every generated token's stored log-prob
    equals a recompute by the policy version its segment records (the weights after that many optimizer steps),
    through the same temperature / top-k / top-p processing."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    snapshots = Snapshots()
    trainer = _trainer(
        name,
        tmp_path,
        tokenizer,
        dataset,
        Recorder(score=lambda ids: float(ids[0] % 2)),
        [snapshots],
        rollout_segment_tokens=2,
        max_completion_length=6,
        max_steps=4,
        learning_rate=3e-2,
        temperature=0.7,
        top_k=6,
        top_p=0.9,
    )
    emitted, emit = [], trainer._k15_buffer.emit
    trainer._k15_buffer.emit = lambda count, *order: emitted.extend(emit(count, *order)) or emitted[-count:]
    trainer.train()
    process = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(6), TopPLogitsWarper(0.9)])
    model = tiny_test_model(tokenizer, seed=0).eval()
    versions, checked = set(), 0
    members = [(g, m) for g in emitted for m in g.members] + [
        (g, m) for g in trainer._k15_buffer.groups for m in g.members
    ]
    for group, member in members:
        if not member.completion_ids:
            continue
        assert member.logprobs is not None and len(member.logprobs) == len(member.completion_ids)
        ids = torch.tensor([group.prompt_ids + member.completion_ids])
        start = len(group.prompt_ids)
        for segment in member.segments:
            model.load_state_dict(snapshots.weights[segment.version])
            with torch.no_grad():
                logits = model(ids).logits[0, start - 1 : -1].float()  # (C, V): position t predicts token t
            scores = process(ids[:, :start], logits)  # the warpers act on each row (position) alike
            expected = torch.log_softmax(scores, dim=-1).gather(1, ids[0, start:, None]).squeeze(1)
            span = slice(segment.start, segment.start + segment.length)
            torch.testing.assert_close(torch.tensor(member.logprobs[span]), expected[span], atol=1e-4, rtol=1e-4)
            versions.add(segment.version)
            checked += segment.length
    assert checked and len(versions) >= 2  # tokens of several policy versions were checked


CORRECTED = [("kimi_md", {"num_iterations": 2}), ("grpo", {}), ("rloo", {})]  # pi_i: TRL's, recomputed, RLOO's


def _gradient(trainer, inputs):
    """The gradient of the trainer's loss on one micro-batch, as one flat vector."""
    trainer.model.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(type(trainer)._compute_loss(trainer, trainer.model, inputs), params, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
    )


@pytest.mark.parametrize(("name", "extra"), CORRECTED)
def test_stale_tokens_are_weighted_by_the_truncated_ratio_of_pi_i_to_their_behaviour_policy(
    tmp_path, tokenizer, dataset, name, extra
):
    """``token_is``: in every trained batch, a token from an older policy carries min(pi_i / mu, cap), pi_i being the
    recompute by the policy of the batch's step (here from a snapshot of its weights) and mu the stored behaviour
    log-prob; every other token carries 1. Then the loss: the weights act on its policy-gradient term only, and
    linearly (weight 1 is no correction; weight 0 leaves what an advantage of 0 leaves: nothing, or for KimiMD the
    squared term towards pi_i, unweighted)."""
    snapshots, cap = Snapshots(), 1.5
    trainer = _trainer(
        name,
        tmp_path,
        tokenizer,
        dataset,
        Recorder(score=lambda ids: float(ids[0] % 2)),
        [snapshots],
        rollout_segment_tokens=2,
        max_completion_length=6,
        max_steps=4,
        learning_rate=3e-2,
        rollout_correction="token_is",
        rollout_is_cap=cap,
        **extra,
    )
    outputs = _outputs(trainer)
    batches, compute_loss = [], trainer._compute_loss

    def recording(model, inputs):
        """The trainer's loss, each micro-batch kept."""
        batches.append(inputs)
        return compute_loss(model, inputs)

    trainer._compute_loss = recording
    trainer.train()
    model = tiny_test_model(tokenizer, seed=0).eval()
    stale = clipped = 0
    for out in outputs:
        weights = out[TOKEN_WEIGHTS]  # (B, C)
        model.load_state_dict(snapshots.weights[out["step"]])
        for i, (versions, behaviour) in enumerate(zip(out["versions"], out["behaviour"], strict=True)):
            prompt = out["prompt_ids"][i][out["prompt_mask"][i].bool()]
            completion = out["completion_ids"][i][: len(versions)]
            with torch.no_grad():
                logits = model(torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1 : -1]
            pi_i = torch.log_softmax(logits.float(), dim=-1).gather(1, completion[:, None]).squeeze(1)
            ratio = (pi_i - torch.tensor(behaviour)).exp()
            old = torch.tensor(versions) < out["step"]
            expected = torch.where(old, ratio.clamp(max=cap), torch.ones_like(ratio))
            torch.testing.assert_close(weights[i, : len(versions)], expected, atol=2e-4, rtol=2e-4)
            stale += int(old.sum())
            clipped += int((old & (ratio > cap)).sum())
    assert stale and clipped  # stale tokens were weighted, some of them at the cap
    logs = [h for h in trainer.state.log_history if "k15/off_policy/ess" in h]
    assert len(logs) == len(outputs)
    for key in ("ess", "sequence_ess", "weight_ess", "outside_share", "zero_weight_share"):
        assert all(0 <= h[f"k15/off_policy/{key}"] <= 1 for h in logs), key
    assert min(h["k15/off_policy/ess"] for h in logs) < 1 and max(h["k15/off_policy/outside_share"] for h in logs) > 0

    inputs = next(b for b in batches if (b[TOKEN_WEIGHTS] != 1).any())
    w = inputs[TOKEN_WEIGHTS]
    plain = {k: v for k, v in inputs.items() if k != TOKEN_WEIGHTS}
    g_w, g_plain = _gradient(trainer, inputs), _gradient(trainer, plain)
    g_ones = _gradient(trainer, {**inputs, TOKEN_WEIGHTS: torch.ones_like(w)})
    g_zero = _gradient(trainer, {**inputs, TOKEN_WEIGHTS: torch.zeros_like(w)})
    g_2w = _gradient(trainer, {**inputs, TOKEN_WEIGHTS: 2 * w})
    g_no_advantage = _gradient(trainer, {**plain, "advantages": torch.zeros_like(inputs["advantages"])})
    torch.testing.assert_close(g_ones, g_plain)
    torch.testing.assert_close(g_zero, g_no_advantage)
    torch.testing.assert_close(g_2w - g_no_advantage, 2 * (g_w - g_no_advantage), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(g_w, g_plain)
    if name == "kimi_md":
        assert g_no_advantage.abs().max() > 0  # the squared term, untouched by the weights
    else:
        assert g_zero.abs().max() == 0


@pytest.mark.parametrize(("iterations", "logged"), [(2, True), (1, False)])
def test_without_a_correction_the_loss_is_unchanged_and_metrics_come_when_pi_i_is_free(
    tmp_path, tokenizer, dataset, iterations, logged
):
    """``rollout_correction="none"``: no weights in the batch; the off-policy metrics are logged when TRL computes
    pi_i anyway (several optimizer steps per rollout batch), not at the cost of a forward of their own."""
    trainer = _trainer(
        "kimi_md",
        tmp_path,
        tokenizer,
        dataset,
        Recorder(score=lambda ids: float(ids[0] % 2)),
        rollout_segment_tokens=2,
        max_completion_length=6,
        max_steps=4,
        num_iterations=iterations,
    )
    outputs = _outputs(trainer)
    trainer.train()
    assert outputs and all(TOKEN_WEIGHTS not in out for out in outputs)
    logs = [h for h in trainer.state.log_history if "k15/off_policy/ess" in h]
    assert bool(logs) == logged
    assert all(h["k15/off_policy/weight_ess"] == 1.0 and h["k15/off_policy/zero_weight_share"] == 0 for h in logs)


def test_rloo_trains_on_continued_trajectories(tmp_path, tokenizer, dataset, monkeypatch):
    from trl import RLOOTrainer

    def scripted_rloo(self, prompt_ids, images, multimodal_fields):
        return scripted_single_turn(self, prompt_ids, images, multimodal_fields)[0]

    monkeypatch.setattr(RLOOTrainer, "_generate_single_turn", scripted_rloo)
    reward = Recorder()
    trainer = _trainer("rloo", tmp_path, tokenizer, dataset, reward, rollout_segment_tokens=4, max_steps=4)
    outputs = _outputs(trainer)
    trainer.train()
    for (_, prompts, completions), out in zip(reward.batches, outputs, strict=True):
        for ids, completion in zip(tokenizer(prompts)["input_ids"], completions, strict=True):
            assert completion == target(ids)
        # RLOO's loss sees the whole trajectories (its completion mask), continued segments included
        assert out["completion_mask"].sum(dim=1).tolist() == [len(c) for c in completions]
    assert any(len(c) > 4 for _, _, cs in reward.batches for c in cs)


@pytest.mark.parametrize("action", ["regenerate", "drop", "mask"])
def test_admission_order_and_the_staleness_cap_in_training(tmp_path, tokenizer, dataset, scripted, action):
    """``rollout_emit_order="admission"`` with a cap of 1 optimizer step and a pipeline deliberately deeper than the
    cap allows (2 extra batches, 1 step per rollout batch): every rollout batch trains the oldest admitted groups, the
    cap acts (regenerate / drop: no trained token is more than 1 step old; mask: older tokens are out of the loss),
    completions are still whole targets, and the prioritized sampler counts each trained row once: a dropped group
    never, its re-admitted prompt when it trains."""
    from k15_plugin.trl.trainer import INDEX_COLUMN

    reward = Recorder()
    trainer = _trainer(
        "kimi_md",
        tmp_path,
        tokenizer,
        dataset,
        reward,
        rollout_segment_tokens=4,
        rollout_prefill_batches=2,
        rollout_emit_order="admission",
        rollout_max_staleness=1,
        rollout_stale_action=action,
        sampler_type="prioritized",
        max_steps=6,
    )
    buffer = trainer._k15_buffer
    outputs, order_ok, dropped, trained_rows = _outputs(trainer), [], [], []
    enforce, emit = buffer.enforce_staleness, buffer.emit

    def recording_enforce(version):
        before = {g.uid: g.row[INDEX_COLUMN] for g in buffer.groups}
        counts = enforce(version)
        dropped.extend(i for uid, i in before.items() if uid not in {g.uid for g in buffer.groups})
        return counts

    def recording_emit(count, order):
        groups = emit(count, order)
        order_ok.append(all(g.uid < h.uid for g in groups for h in buffer.groups))  # the oldest admitted ones
        trained_rows.extend(g.row[INDEX_COLUMN] for g in groups for _ in g.members)
        return groups

    buffer.enforce_staleness, buffer.emit = recording_enforce, recording_emit
    trainer.train()

    assert len(outputs) == 6 and all(order_ok)
    for (_, prompts, completions), out in zip(reward.batches, outputs, strict=True):
        for ids, completion in zip(tokenizer(prompts)["input_ids"], completions, strict=True):
            assert completion == target(ids)  # a regenerated member writes the same scripted target again
        step, mask = out["step"], out.get("tool_mask")
        for row, versions in enumerate(out["versions"]):
            if action == "mask":
                got = (mask[row] * out["completion_mask"][row]).tolist()[: len(versions)]
                assert got == [int(v >= step - 1) for v in versions]
            else:
                assert all(v >= step - 1 for v in versions)
    logs = [h for h in trainer.state.log_history if "k15/partial/oldest_token_age" in h]
    assert all(h["k15/partial/oldest_token_age"] <= 1 for h in logs)
    fired = {
        "regenerate": "k15/partial/cap_regenerated_members",
        "drop": "k15/partial/cap_requeued_groups",
        "mask": "k15/partial/cap_masked_tokens",
    }[action]
    assert max(h[fired] for h in logs) > 0
    attempts = trainer._k15_sampler.tracker.attempts
    assert attempts.sum() == len(trained_rows) == 6 * 16
    assert all(attempts[i] == trained_rows.count(i) for i in set(trained_rows))
    assert bool(dropped) == (action == "drop")
    assert any(i in trained_rows for i in dropped) or action != "drop"  # a re-admitted prompt trained later


def test_the_automatic_prefill_stays_within_the_staleness_cap(tmp_path, tokenizer, dataset):
    """12 / 4 - 1 = 2 extra batches without a cap; with a cap of 3 optimizer steps and 2 steps per rollout batch, a
    group trained 2 rollout batches after its admission would be 4 steps old: 1 batch."""
    common = dict(rollout_segment_tokens=4, num_iterations=2)
    assert _trainer("kimi_md", tmp_path, tokenizer, dataset, Recorder(), **common)._k15_prefill_batches == 2
    capped = _trainer("kimi_md", tmp_path, tokenizer, dataset, Recorder(), rollout_max_staleness=3, **common)
    assert capped._k15_prefill_batches == 1


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("sampler", ["uniform", "prioritized"])
def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path, tokenizer, dataset, sampler):
    """Real sampling: a run saved at step 3 and resumed trains on exactly the batches (completions included), and
    ends with exactly the weights and buffer, of the run that was never interrupted."""
    common = dict(rollout_segment_tokens=2, max_completion_length=6, max_steps=6, sampler_type=sampler)
    full_reward = Recorder()
    full = _trainer("kimi_md", tmp_path / "full", tokenizer, dataset, full_reward, **common)
    full.train()

    first = _trainer(
        "kimi_md",
        tmp_path / "cut",
        tokenizer,
        dataset,
        Recorder(),
        [StopAt(3)],
        save_strategy="steps",
        save_steps=3,
        **common,
    )
    first.train()
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    saved = json.loads((checkpoint / PARTIAL_STATE_NAME).read_text())
    assert saved["buffer"]["groups"]  # something was in flight
    groups = saved["buffer"]["groups"] + saved["last_emitted"]
    members = [m for g in groups for m in g["members"] if m["completion_ids"]]
    assert members and all(len(m["logprobs"]) == len(m["completion_ids"]) for m in members)  # behaviour log-probs
    assert all(isinstance(lp, float) for m in members for lp in m["logprobs"])

    resumed_reward = Recorder()
    resumed = _trainer("kimi_md", tmp_path / "cut", tokenizer, dataset, resumed_reward, **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_reward.batches == [b for b in full_reward.batches if b[0] >= 3]
    assert resumed._k15_buffer.state_dict() == full._k15_buffer.state_dict()
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_resume_inside_a_rollout_batch_trains_that_batch_again(tmp_path, tokenizer, dataset, scripted):
    """Two optimizer steps per rollout batch, a checkpoint after the first: the resumed run trains the rest of the
    batch the checkpoint was taken in (the same groups, not a fresh rollout), then goes on admitting."""
    common = dict(rollout_segment_tokens=4, max_steps=6, num_iterations=2, sampler_type="prioritized")
    full_reward = Recorder()
    full = _trainer("kimi_md", tmp_path / "full", tokenizer, dataset, full_reward, **common)
    full.train()
    first = _trainer(
        "kimi_md",
        tmp_path / "cut",
        tokenizer,
        dataset,
        Recorder(),
        [StopAt(3)],
        save_strategy="steps",
        save_steps=3,
        **common,
    )
    first.train()
    resumed_reward = Recorder()
    resumed = _trainer("kimi_md", tmp_path / "cut", tokenizer, dataset, resumed_reward, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    # the uninterrupted run scored rollout batches at steps 0, 2, 4; the resumed one re-scores the step-2 batch
    # (the same prompts and completions) at step 3, then the step-4 batch
    assert [b[0] for b in full_reward.batches] == [0, 2, 4]
    assert [b[1:] for b in resumed_reward.batches] == [b[1:] for b in full_reward.batches[1:]]
    assert resumed._k15_buffer.state_dict() == full._k15_buffer.state_dict()
    assert resumed._k15_sampler.num_updates == full._k15_sampler.num_updates  # the replayed batch is not counted twice


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("grpo", {"rollout_segment_tokens": 5}, "must divide max_completion_length=12"),
        ("grpo", {"rollout_segment_tokens": -1}, "rollout_segment_tokens must be an integer >= 0"),
        ("grpo", {"rollout_loss_mask": "first"}, "rollout_loss_mask must be one of"),
        ("grpo", {"repeat_detection": True, "repeat_min_count": 1}, "repeat_min_count must be an integer >= 2"),
        ("grpo", {"repeat_penalty": -1.0}, "repeat_penalty must be a number >= 0"),
        ("rloo", {"rollout_segment_tokens": 4, "rollout_loss_mask": "latest"}, "not supported by RLOO"),
        ("grpo", {"rollout_segment_tokens": 4, "generation_kwargs": {"min_new_tokens": 2}}, "min_new_tokens"),
        ("grpo", {"repeat_detection": True, "use_vllm": True, "vllm_mode": "server"}, "vllm_mode='server'"),
        ("grpo", {"rollout_correction": "token_is"}, "rollout_correction='token_is' corrects tokens of older"),
        ("rloo", {"rollout_segment_tokens": 4, "rollout_correction": "clip"}, "rollout_correction must be one of"),
        ("kimi_md", {"rollout_segment_tokens": 4, "rollout_is_cap": 1}, "rollout_is_cap must be a number > 1"),
        ("grpo", {"rollout_max_staleness": 2}, "rollout_max_staleness=2 acts on groups carried over"),
        ("grpo", {"rollout_emit_order": "admission"}, "rollout_emit_order='admission' acts on groups carried over"),
        ("grpo", {"rollout_segment_tokens": 4, "rollout_emit_order": "newest"}, "rollout_emit_order must be one of"),
        ("grpo", {"rollout_segment_tokens": 4, "rollout_max_staleness": -1}, "rollout_max_staleness must be an"),
        (
            "rloo",
            {"rollout_segment_tokens": 4, "rollout_max_staleness": 2, "rollout_stale_action": "mask"},
            "rollout_stale_action='mask' is not supported by RLOO",
        ),
    ],
)
def test_bad_settings_are_refused_in_one_line(tmp_path, tokenizer, dataset, name, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _trainer(name, tmp_path, tokenizer, dataset, Recorder(), **overrides)


def test_two_processes_take_identical_decisions(tmp_path):
    """A real 2-process launch (gloo): both processes hold the same buffer after every rollout batch, each generates
    its share of the work, and their slices together are whole groups of full trajectories.

    The two processes get the environment torchrun gives its workers (RANK, WORLD_SIZE, MASTER_ADDR, ...), started
    directly: the launcher itself would be a third process importing torch (the CLI's own test goes through
    torchrun)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("partial_two_process.py")
    with socket.socket() as s:  # a port of its own: another test may run torchrun on the default one at the same time
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        GROUP_RANK="0",
        ROLE_RANK="0",
    )
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "ROLE_WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        results = [p.communicate(timeout=1800) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, stderr) in zip(processes, results, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert all(r["completions_are_targets"] for r in ranks)  # every row continued from its own prefix
    assert ranks[0]["final_buffer"] == ranks[1]["final_buffer"]
    assert all(r["generated_rows"] > 0 for r in ranks)  # the work was shared
    for a, b in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True):
        assert a["step"] == b["step"] and a["buffer"] == b["buffer"]
        prompts = a["prompts"] + b["prompts"]  # 12 rows: 3 groups of 4, the middle one on both processes
        assert len(prompts) == 12 and all(len(set(prompts[g : g + 4])) == 1 for g in range(0, 12, 4))
    assert any(len(c) > 4 for r in ranks for s in r["batches"] for c in s["completions"])
    # the off-policy correction ran on every rollout batch, with the same gathered metrics on both processes
    assert (
        len(ranks[0]["off_policy_ess"]) == len(ranks[0]["batches"])
        and ranks[0]["off_policy_ess"] == ranks[1]["off_policy_ess"]
    )
