"""Greedy held-out evaluation of the model a TRL trainer is training, on its device, on every process.

Each process decodes its own shard of the held-out prompts with the trainer's model as it is placed for training
(GPU, DDP, or DeepSpeed: under ZeRO-3 the parameters are gathered and DeepSpeed's hooks lifted for the duration, as
TRL does for generation, so no process waits on another mid-decode); the per-shard sums are then gathered, so every
process returns the same numbers. Every process must call it at the same point.
"""

from __future__ import annotations

import torch
from trl.models import unwrap_model_for_generation


def heldout_metrics(trainer, task, tokenizer, limit: int | None = None) -> dict[str, float]:
    """``{"accuracy", "mean_completion_tokens"}`` over the first ``limit`` held-out prompts (all for ``None``)."""
    accelerator = trainer.accelerator
    rows = task.heldout if limit is None or limit >= len(task.heldout) else task.heldout.select(range(limit))
    shard = rows.shard(num_shards=accelerator.num_processes, index=accelerator.process_index, contiguous=True)
    with unwrap_model_for_generation(trainer.model_wrapped, accelerator) as model:
        empty = {"accuracy": 0.0, "mean_completion_tokens": 0.0}
        result = task.evaluate(model, tokenizer, shard) if len(shard) else empty
    n = len(shard)
    sums = [[result["accuracy"] * n, result["mean_completion_tokens"] * n, n]]
    local = torch.tensor(sums, dtype=torch.float64, device=accelerator.device)  # (1, 3) sums of this shard
    correct, tokens, total = accelerator.gather(local).sum(dim=0).tolist()  # (3,) over all shards
    total = max(total, 1.0)
    return {"accuracy": correct / total, "mean_completion_tokens": tokens / total}
