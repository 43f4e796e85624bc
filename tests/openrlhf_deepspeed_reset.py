"""OpenRLHF's policy actor resetting a real DeepSpeed engine's optimizer, in one process (gloo, DeepSpeed's CPU
accelerator); prints one JSON line per configuration.

    python tests/openrlhf_deepspeed_reset.py   (with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; the test does)

The engine is built as OpenRLHF 0.11's ``DeepspeedStrategy`` builds the actor's: its ``get_train_ds_config`` (bf16,
gradient clipping 1.0) with an ``AdamW`` optimizer section, ``deepspeed.initialize`` creating the optimizer, and the
actor holding what it returns (the ZeRO optimizer) as ``actor_optim``. Without ``adam_offload`` DeepSpeed would pick
FusedAdam, a CUDA op, so ``torch_adam`` asks for torch's AdamW there; with it DeepSpeed picks DeepSpeedCPUAdam, as on
a GPU machine. After three steps the actor's ``fit`` resets the moments and takes one step (``PolicyModelActor.fit``
replaced by one engine step); read on the torch optimizer under ZeRO (the fp32 partitions and their state):

- the state tensors are the same objects after the reset (zeroed in place) and the step counts go back to 1;
- that update is a freshly built AdamW's first from the same fp32 weights with the same gradient (recovered from the
  first moment, m = (1 - beta1) g on a first step), relative error ``fresh_error``; the update before it is not;
- DeepSpeed's own view of the moments (``safe_get_full_optimizer_state``) is the optimizer's.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace as NS

import torch

torch.set_num_threads(1)


def main() -> None:
    from k15_plugin.openrlhf.flags import STUB_DIR

    if any(importlib.util.find_spec(name) is None for name in ("vllm", "flash_attn")):
        sys.path.insert(0, str(STUB_DIR))  # as tests/test_openrlhf_adapter.py: stand-ins for the CUDA-only imports
    import openrlhf.trainer.ray.ppo_actor as upstream_actor

    from k15_plugin.openrlhf import trainer as k15_trainer

    base = k15_trainer.plain_class(upstream_actor.PolicyModelActor)
    for name, stage, adam_offload in (("zero2", 2, False), ("zero3", 3, False), ("zero3_adam_offload", 3, True)):
        print(json.dumps(run_one(name, stage, adam_offload, base, k15_trainer._K15PolicyModelActor)), flush=True)


def run_one(name: str, stage: int, adam_offload: bool, base, actor_class) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_optimizer_state
    from openrlhf.utils.deepspeed.deepspeed_utils import get_train_ds_config
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    adam = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}
    if not adam_offload:
        adam["torch_adam"] = True
    ds_config = get_train_ds_config(
        offload=False, adam_offload=adam_offload, stage=stage, optim_config={"type": "AdamW", "params": adam}
    )
    ds_config.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    engine, actor_optim, _, _ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=ds_config
    )
    ids = torch.randint(0, 32, (2, 6))

    def engine_step():
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    opt = actor_optim.optimizer  # the torch optimizer under ZeRO, keyed by the fp32 partitions

    def snapshot():
        return {id(p): (p.detach().clone(), s["exp_avg"].clone()) for p, s in opt.state.items()}

    def state_tensors():
        return [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]

    def fresh_error(before, after):
        """Largest difference between the last update and a fresh AdamW's first, relative to the update."""
        group, error = opt.param_groups[0], 0.0
        for key, (w1, m1) in after.items():
            w0 = before[key][0]
            fresh = w0.clone().requires_grad_()
            fresh.grad = m1 / (1 - group["betas"][0])  # the gradient, if this was a first step
            torch.optim.AdamW([fresh], lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=0.0).step()
            scale = max(float((w1 - w0).abs().max()), 1e-30)
            error = max(error, float((fresh.detach() - w1).abs().max()) / scale)
        return error

    engine_step()
    engine_step()
    before_third = snapshot()
    engine_step()
    third, held = snapshot(), state_tensors()

    # the actor, as OpenRLHF's Ray worker holds it after init_model_from_pretrained; its fit trains one step here
    actor = object.__new__(actor_class)
    actor.strategy = NS(args=NS(k15=NS(reset_optimizer_each_iteration=True)))
    actor.actor_optim, actor._k15_resets = actor_optim, 0
    base.fit = lambda self, kl_ctl=0: engine_step() or {}
    status = actor.fit(0.0)
    after_reset = snapshot()

    params = list(engine.module.parameters())
    seen = sum(float(safe_get_full_optimizer_state(p, "exp_avg").double().square().sum()) for p in params)
    result = {
        "name": name,
        "zero_optimizer": type(actor_optim).__name__,
        "optimizer": type(opt).__name__,
        "resets": status["k15/optimizer_resets"],
        "in_place": all(t is u for t, u in zip(held, state_tensors(), strict=True)),
        "steps": sorted({int(s["step"]) for s in opt.state.values()}),
        "fresh_error": fresh_error(third, after_reset),
        "fresh_error_without_reset": fresh_error(before_third, third),
        "moments_seen_by_deepspeed": seen,
        "moments_held": sum(float(s["exp_avg"].double().square().sum()) for s in opt.state.values()),
    }
    engine.destroy()
    return result


if __name__ == "__main__":
    main()
