"""One plugin trainer through real vLLM colocate generation on CPU; prints one JSON line for tests/test_vllm_cpu.py.

    python tests/vllm_scenario.py kimi_md|grpo|kimi_md_partial OUTPUT_DIR

Run in its own process: TRL's colocate mode initialises torch.distributed for vLLM, once per process. The demo
checkpoint (shipped, on disk) is what vLLM loads. Two rollout batches, so weights are synced into vLLM after training
steps; the length penalty and the prioritized sampler are on. ``kimi_md_partial``: partial rollouts (4-token
segments, up to 8 tokens in all) with repeat detection inside vLLM's generation and the ``token_is`` off-policy
correction on vLLM's behaviour log-probs.
"""

from __future__ import annotations

import json
import sys
import time

START = time.perf_counter()

import torch  # noqa: E402

torch.set_num_threads(1)


def main(algorithm: str, output_dir: str) -> dict:
    from k15_plugin.data.arithmetic import ArithmeticReward, load_demo_checkpoint, make_datasets
    from k15_plugin.trl import K15GRPOConfig, K15GRPOTrainer, KimiMirrorDescentConfig, KimiMirrorDescentTrainer

    seconds = {"imports": time.perf_counter() - START}
    model, tokenizer = load_demo_checkpoint()
    train, _ = make_datasets(num_train=256, seed=0)
    common = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,
        vllm_max_model_length=64,
        per_device_train_batch_size=32,
        steps_per_generation=2,
        num_generations=8,
        max_completion_length=4,
        learning_rate=1e-3,
        logging_steps=1,
        length_penalty_weight=0.1,
        sampler_type="prioritized",
    )
    if algorithm == "kimi_md_partial":
        return partial(common, model, tokenizer, train, seconds)
    if algorithm == "kimi_md":  # 2 passes x 2 micro-batches: 4 optimizer steps per rollout batch
        config, trainer_cls = KimiMirrorDescentConfig(**common, num_iterations=2, tau=0.5), KimiMirrorDescentTrainer
        steps = 8
    else:  # 2 micro-batches: 2 optimizer steps per rollout batch
        config, trainer_cls, steps = K15GRPOConfig(**common, loss_type="grpo"), K15GRPOTrainer, 4
    config.max_steps = steps
    trainer = trainer_cls(
        model=model,
        reward_funcs=[ArithmeticReward(tokenizer)],
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
    )

    seen = {"calls": 0, "is_ratio": 0, "old_logps": 0, "generations": 0}
    compute_loss, generate = trainer._compute_loss, trainer.vllm_generation.generate

    def recording_loss(model, inputs):
        seen["calls"] += 1
        seen["is_ratio"] += "importance_sampling_ratio" in inputs
        seen["old_logps"] += "old_per_token_logps" in inputs
        return compute_loss(model, inputs)

    def recording_generate(*args, **kwargs):
        seen["generations"] += 1
        return generate(*args, **kwargs)

    seconds["trainer_and_engine"] = time.perf_counter() - START - seconds["imports"]
    trainer._compute_loss, trainer.vllm_generation.generate = recording_loss, recording_generate
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    seconds["train"] = time.perf_counter() - START - sum(seconds.values())

    # After an explicit sync the engine's weights are the trainer's: the linear layers kept their weights.
    trainer.vllm_generation.sync_weights()
    engine_model = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    engine = dict(engine_model.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    logs = [h for h in trainer.state.log_history if "loss" in h or "reward" in h]
    sampler = trainer._k15_sampler
    return {
        "algorithm": algorithm,
        "steps": trainer.state.global_step,
        "vllm_generations": seen["generations"],
        "loss_calls": seen["calls"],
        "loss_calls_with_is_ratio": seen["is_ratio"],
        "loss_calls_with_old_logps": seen["old_logps"],
        "params_changed": sum(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()),
        "params": len(before),
        # the engine may hold its weights in another dtype (vLLM's CPU build picks bf16 for a float32 checkpoint)
        "engine_dtype": str(engine[name].dtype),
        "engine_weight_max_abs_diff": (engine[name] - trainer.model.get_parameter(name).to(engine[name].dtype))
        .abs()
        .max()
        .item(),
        "engine_weight_changed": (engine[name].float() - before[name]).abs().max().item(),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "logp_diff_per_step": [h.get("sampling/sampling_logp_difference/mean") for h in logs],
        "is_ratio_mean_per_step": [h.get("sampling/importance_sampling_ratio/mean") for h in logs],
        "l2_loss_per_step": [h.get("k15/l2_loss") for h in logs],
        "length_penalty_weight": [h.get("length_penalty/weight") for h in logs],
        "sampler_attempts": int(sampler.tracker.state_dict()["attempts"].sum()),
    }


def partial(common, model, tokenizer, train, seconds) -> dict:
    """Partial rollouts through vLLM: every call is capped at the 4-token segment, continued prefixes go back to
    vLLM as prompt token ids, and vLLM's own repetition detection (a deliberately eager rule: a block of 1-2 tokens
    twice, e.g. the "11" of 5+6=11) stops rows inside generation, which the post-hoc check then confirms."""
    from k15_plugin.data.arithmetic import ArithmeticReward
    from k15_plugin.trl import KimiMirrorDescentConfig, KimiMirrorDescentTrainer

    common = {**common, "max_completion_length": 8}
    config = KimiMirrorDescentConfig(
        **common,
        num_iterations=2,
        tau=0.5,
        max_steps=8,
        rollout_segment_tokens=4,
        repeat_detection=True,
        repeat_min_period=1,
        repeat_max_period=2,
        repeat_min_count=2,
        repeat_min_span=2,
        rollout_correction="token_is",
    )
    trainer = KimiMirrorDescentTrainer(
        model=model,
        reward_funcs=[ArithmeticReward(tokenizer)],
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
    )
    engine = trainer.vllm_generation
    calls = []
    generate = engine.llm.generate

    def recording_generate(prompts, sampling_params=None, **kwargs):
        outputs = generate(prompts, sampling_params=sampling_params, **kwargs)
        reasons = [o.outputs[0].finish_reason for o in outputs]
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        calls.append(
            {
                "max_tokens": sampling_params.max_tokens,
                "repetition_detection": sampling_params.repetition_detection is not None,
                "prompt_lengths": sorted({len(p["prompt_token_ids"]) for p in prompts}),
                "finish_reasons": sorted(set(map(str, reasons))),
                "lengths": sorted(set(lengths)),
                "stopped_early": sum(1 for n, r in zip(lengths, reasons, strict=True) if r not in ("stop", "length")),
            }
        )
        return outputs

    engine.llm.generate = recording_generate
    seconds["trainer_and_engine"] = time.perf_counter() - START - seconds["imports"]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    seconds["train"] = time.perf_counter() - START - sum(seconds.values())
    logs = [h for h in trainer.state.log_history if "k15/partial/rounds" in h]
    groups = trainer._k15_buffer.groups + trainer._k15_last_emitted
    members = [m for g in groups for m in g.members if m.completion_ids]
    return {
        "algorithm": "kimi_md_partial",
        # vLLM's processed log-probs kept for every token (continued members: several policy versions)
        "members_with_behaviour_logprobs": sum(
            m.logprobs is not None and len(m.logprobs) == len(m.completion_ids) and None not in m.logprobs
            for m in members
        ),
        "members": len(members),
        "off_policy_ess": [h.get("k15/off_policy/ess") for h in logs],
        "steps": trainer.state.global_step,
        "calls": calls,
        "params_changed": sum(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()),
        "params": len(before),
        "repeat_rate": [h.get("k15/repeat/rate") for h in logs],
        "repeat_penalty_mean": [h.get("rewards/repeat_penalty/mean") for h in logs],
        "segments_per_trajectory": [h.get("k15/partial/segments_per_trajectory") for h in logs],
        "is_ratio_mean_per_step": [h.get("sampling/importance_sampling_ratio/mean") for h in logs],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2])
    print(json.dumps(result))
