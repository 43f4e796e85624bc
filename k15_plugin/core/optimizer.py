"""The optimizer reset of section 2.3.2 ("we reset the optimizer state at the start of each iteration").

Two ways, for two kinds of host: :func:`clear_optimizer_state` drops the per-parameter state (Adam's moments and step
counts), so the next ``step()`` is a freshly built optimizer's first (TRL through accelerate, verl's FSDP engines);
:func:`zero_optimizer_state` zeroes it in place, for optimizers whose state tensors are referenced elsewhere
(DeepSpeed's ZeRO optimizers, whose ZeRO-1/2 views of the moments are taken once, and CPU-offloaded buffers: OpenRLHF,
and TRL under DeepSpeed). Learning rates and schedules are untouched.
"""

from __future__ import annotations

import torch


def clear_optimizer_state(optimizer) -> int:
    """Drop the per-parameter state of ``optimizer`` (or of a wrapper that exposes the inner optimizer's ``state``, as
    accelerate's ``AcceleratedOptimizer`` does); returns the number of parameters whose state was dropped.

    Example:
    ```python
    >>> import torch
    >>> from k15_plugin.core.optimizer import clear_optimizer_state
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.Adam([w])
    >>> w.sum().backward(); opt.step()
    >>> clear_optimizer_state(opt), len(opt.state)
    (1, 0)

    ```
    """
    cleared = len(optimizer.state)
    optimizer.state.clear()
    return cleared


def zero_optimizer_state(optimizer) -> int:
    """Zero, in place, every tensor of an optimizer's per-parameter state and its step counts (state and groups).

    ``optimizer`` is a torch optimizer or a wrapper holding one as ``.optimizer`` (DeepSpeed's ZeRO optimizers); a
    ZeRO-3 wrapper's ``backup_optimizer`` (the torch optimizer of the sub-groups kept on the GPU under a partial
    optimizer offload) is zeroed too. With the moments and the step at 0 the next update is a freshly built
    optimizer's first. Returns the number of tensors zeroed; raises ``TypeError`` when no torch optimizer is found,
    and ``ValueError`` for a ZeRO-3 wrapper that swaps the state to NVMe (``swap_optimizer``): between steps its
    tensors are empty and the next step reads the old moments back from disk.
    """
    base = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(base, torch.optim.Optimizer):
        raise TypeError(f"cannot reset the state of a {type(base).__name__}: not a torch optimizer")
    if getattr(optimizer, "swap_optimizer", False) is True:
        raise ValueError(
            "the optimizer reset cannot reach optimizer state offloaded to NVMe (DeepSpeed ZeRO-3 "
            "offload_optimizer.device=nvme): offload it to cpu, or turn the reset off"
        )
    backup = getattr(optimizer, "backup_optimizer", None) if base is not optimizer else None
    zeroed = 0
    for each in (base, backup if isinstance(backup, torch.optim.Optimizer) else None):
        if each is None:
            continue
        for state in each.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.zero_()
                    zeroed += 1
                elif key == "step":
                    state[key] = 0
        for group in each.param_groups:
            if "step" in group:
                group["step"] = 0
    return zeroed
