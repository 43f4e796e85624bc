"""Run OpenRLHF's ``train_ppo_ray`` in this process with the plugin's classes in place.

Before OpenRLHF's launcher module runs (as ``__main__``, with ``runpy``), :func:`run` puts
:class:`~k15_plugin.openrlhf.trainer.K15PPOTrainer` and :class:`~k15_plugin.openrlhf.trainer.K15PolicyModelActor` where
OpenRLHF looks them up (``openrlhf.trainer.ppo_trainer.PPOTrainer``, imported inside ``train()``, and
``openrlhf.trainer.ray.ppo_actor.PolicyModelActor``, imported by the launcher module), and wraps
``openrlhf.utils.config.hierarchize`` (imported inside ``__main__`` after parsing) so the parsed arguments carry
``args.k15`` (:class:`~k15_plugin.openrlhf.config.OpenRLHFSettings`) to every actor. Everything else, Ray's start,
OpenRLHF's own argument checks, vLLM and DeepSpeed, is OpenRLHF's.
"""

from __future__ import annotations

import runpy
import sys

from k15_plugin.openrlhf.config import OpenRLHFSettings
from k15_plugin.openrlhf.flags import OPENRLHF_MODULE


def run(argv: list[str], settings: OpenRLHFSettings) -> None:
    """Run ``openrlhf.cli.train_ppo_ray`` as ``__main__`` with ``argv`` and the plugin's classes in place.

    ``settings`` reach every actor as ``args.k15``. OpenRLHF's names and ``sys.argv`` are restored afterwards, also
    when the run raises.
    """
    import openrlhf.trainer.ppo_trainer as trainer_module
    import openrlhf.trainer.ray.ppo_actor as actor_module
    import openrlhf.utils.config as config_module

    from k15_plugin.openrlhf.trainer import K15PolicyModelActor, K15PPOTrainer

    saved = (trainer_module.PPOTrainer, actor_module.PolicyModelActor, config_module.hierarchize, sys.argv)
    hierarchize = config_module.hierarchize

    def hierarchize_with_k15(args):
        namespace = hierarchize(args)
        namespace.k15 = settings
        return namespace

    trainer_module.PPOTrainer = K15PPOTrainer
    actor_module.PolicyModelActor = K15PolicyModelActor
    config_module.hierarchize = hierarchize_with_k15
    sys.argv = ["train_ppo_ray", *argv]
    try:
        runpy.run_module(OPENRLHF_MODULE, run_name="__main__")
    finally:
        trainer_module.PPOTrainer, actor_module.PolicyModelActor, config_module.hierarchize, sys.argv = saved
