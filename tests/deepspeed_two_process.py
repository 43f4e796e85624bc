"""The TRL trainers under DeepSpeed on CPU, in the processes ``accelerate launch`` starts; each writes what it saw.

    accelerate launch --config_file examples/accelerate/deepspeed_zero3_cpu.yaml \\
        tests/deepspeed_two_process.py OUTPUT_DIR [--reset-only]

(``tests/test_deepspeed_cpu.py`` starts it under each of the CPU configs). In order, on a tiny Llama built in code:

- each trainer (``KimiMirrorDescentTrainer``, ``K15GRPOTrainer``, ``K15RLOOTrainer``) takes two optimizer steps;
- the optimizer reset: kimi_md, two optimizer steps per rollout batch (``num_iterations=2``), four steps. After each
  step the DeepSpeed optimizer's own torch optimizer (the one updating the fp32 partitions) is read: its step counts,
  and whether the update equals a freshly built AdamW's first update from the same weights with the same gradient
  (recovered from the first moment, m = (1 - beta1) g on a first step);
- checkpoint and exact resume (not with ``--reset-only``): the same run saved at step 2 and stopped, then resumed
  from that checkpoint, must end with the uninterrupted run's weights, bit for bit.

Each process writes ``rank<R>.json``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def reward(completion_ids, **kwargs):
    """A reward with signal on a random tiny model (not tied to the length, which barely varies there)."""
    return [float(sum(c) % 3) / 2 for c in completion_ids]


def inner_optimizer(trainer):
    """The torch optimizer inside accelerate's wrapper and DeepSpeed's ZeRO optimizer, and the ZeRO optimizer."""
    zero = trainer.optimizer.optimizer  # accelerate's DeepSpeedOptimizerWrapper holds the engine's optimizer
    return zero.optimizer, zero


def gathered(model) -> dict[str, torch.Tensor]:
    """Every parameter in full (ZeRO-3 partitions gathered; every process must call it)."""
    params = dict(model.named_parameters())
    if not hasattr(next(iter(params.values())), "ds_id"):
        return {n: p.detach().clone() for n, p in params.items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].numpy().tobytes())
    return h.hexdigest()


def main(out: Path, reset_only: bool) -> None:
    from transformers import TrainerCallback

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

    tokenizer = build_tokenizer()
    train, _ = make_datasets(seed=0)
    train = train.select(range(64))

    def build(trainer_cls, config_cls, run_dir, callbacks=(), **overrides):
        settings = dict(
            output_dir=str(out / run_dir),
            use_cpu=False,  # accelerate's cpu=True would skip DeepSpeed
            ddp_backend="gloo",  # accelerate 1.16 has no default backend for the CPU; DeepSpeed uses gloo there
            bf16=False,
            report_to=[],
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=4,
            max_steps=2,
            logging_steps=1,
            save_strategy="no",
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            seed=0,
            disable_tqdm=True,
        )
        settings.update(overrides)
        return trainer_cls(
            model=tiny_test_model(tokenizer),
            reward_funcs=[reward],
            args=config_cls(**settings),
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )

    result = {}

    # -- each trainer takes two optimizer steps
    if not reset_only:
        result["trainers"] = {}
        for name, trainer_cls, config_cls in (
            ("kimi_md", KimiMirrorDescentTrainer, KimiMirrorDescentConfig),
            ("grpo", K15GRPOTrainer, K15GRPOConfig),
            ("rloo", K15RLOOTrainer, K15RLOOConfig),
        ):
            # beta=0: RLOO's default KL term would build a reference model from the model's Hub path
            trainer = build(trainer_cls, config_cls, name, beta=0.0)
            before = gathered(trainer.model)
            trainer.train()
            after = gathered(trainer.model)
            result["trainers"][name] = {
                "steps": trainer.state.global_step,
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                "moved": max(float((after[n] - before[n]).abs().max()) for n in after),
                "weights": digest(after),
            }

    # -- the optimizer reset: after each step, the inner optimizer's step counts and whether its last update was a
    # fresh AdamW's first
    class Snapshots(TrainerCallback):
        def __init__(self):
            self.steps, self.fresh_error, self.prev = [], [], None

        def on_step_end(self, args, state, control, **kwargs):
            opt, _ = inner_optimizer(trainer)
            group = opt.param_groups[0]
            now = {id(p): (p.detach().clone(), s["exp_avg"].clone()) for p, s in opt.state.items()}
            self.steps.append(sorted({int(s["step"]) for s in opt.state.values()}))
            if self.prev is not None:
                error = 0.0
                assert self.prev.keys() == now.keys()  # the same fp32 partitions
                for key, (w1, m1) in now.items():
                    w0 = self.prev[key][0]
                    fresh_w = w0.clone().requires_grad_()
                    fresh_w.grad = m1 / (1 - group["betas"][0])  # the gradient, if this was a first step
                    torch.optim.AdamW(
                        [fresh_w],
                        lr=group["lr"],
                        betas=group["betas"],
                        eps=group["eps"],
                        weight_decay=group["weight_decay"],
                    ).step()
                    scale = max(float((w1 - w0).abs().max()), 1e-30)  # the size of the real update
                    error = max(error, float((fresh_w.detach() - w1).abs().max()) / scale)
                self.fresh_error.append(error)  # relative to the update; ~1e-6 when it was a fresh first update
            self.prev = now

    snapshots = Snapshots()
    reset_settings = dict(num_iterations=2, max_steps=4, reset_optimizer_each_iteration=True)
    trainer = build(KimiMirrorDescentTrainer, KimiMirrorDescentConfig, "reset", [snapshots], **reset_settings)
    trainer.train()
    opt, zero = inner_optimizer(trainer)
    full = gathered(trainer.model)
    # DeepSpeed's own view of the moments (safe_get_full_optimizer_state) must be the optimizer's: ZeRO-1/2 read them
    # through views of the state tensors taken at the first step (DeepSpeed 0.19.6 links the first parameter group's
    # only), so a reset that replaced the tensors would leave DeepSpeed reading the moments from before it.
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(zero, "bit16_groups"):  # ZeRO-1/2: the first group's parameters and their fp32 partition
        params, partitions = zero.bit16_groups[0], [zero.single_partition_of_fp32_groups[0]]
    else:  # ZeRO-3 reads the state itself: every parameter, every sub-group's partition
        params, partitions = list(trainer.model.parameters()), list(opt.state)
    seen = sum(float(safe_get_full_optimizer_state(p, "exp_avg").double().square().sum()) for p in params)
    held = torch.tensor(
        [sum(float(opt.state[p]["exp_avg"].double().square().sum()) for p in partitions)], dtype=torch.float64
    )
    torch.distributed.all_reduce(held)
    result["reset"] = {
        "zero_optimizer": type(zero).__name__,
        "optimizer": type(opt).__name__,
        "partitions": len(opt.state),
        "steps": snapshots.steps,
        "fresh_error": snapshots.fresh_error,  # for steps 2, 3, 4
        "resets": trainer._k15_resets,
        "moments_seen_by_deepspeed": seen,
        "moments_held": float(held),
        "weights": digest(full),
    }

    # -- checkpoint at step 2 and exact resume
    if not reset_only:

        class StopAt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 2:
                    control.should_training_stop = True

        cut = build(
            KimiMirrorDescentTrainer,
            KimiMirrorDescentConfig,
            "cut",
            [StopAt()],
            save_strategy="steps",
            save_steps=2,
            **reset_settings,
        )
        cut.train()
        checkpoint = out / "cut" / "checkpoint-2"
        resumed = build(KimiMirrorDescentTrainer, KimiMirrorDescentConfig, "cut", **reset_settings)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        after = gathered(resumed.model)
        result["resume"] = {
            "checkpoint": sorted(p.name for p in checkpoint.iterdir()),
            "steps": resumed.state.global_step,
            "max_difference": max(float((after[n] - full[n]).abs().max()) for n in full),
            "weights": digest(after),
        }

    rank = trainer.accelerator.process_index
    result.update(
        rank=rank, world=trainer.accelerator.num_processes, distributed=str(trainer.accelerator.distributed_type)
    )
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--reset-only" in sys.argv[2:])
