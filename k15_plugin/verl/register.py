"""Entry point of verl's ``verl.plugins`` group: ``import verl`` imports this module in every process (driver, Ray
workers). It registers the policy loss ``k15_md`` and the advantage estimators ``k15_md``, ``k15_grpo``,
``k15_rloo`` at once, and the trainer ``k15_sync`` as soon as verl's v1 trainer package is imported (importing that
package here would add about 3 s and verl's engine warnings to every ``import verl``, trainer or not).

verl catches an entry point's exception and logs it at DEBUG, which nobody sees; a failure here is logged at
WARNING with its traceback. ``VERL_USE_EXTERNAL_PLUGINS=none`` turns all plugins off.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

logger = logging.getLogger("k15_plugin.verl")

TRAINER_PACKAGE = "verl.trainer.ppo.v1"


def _register_trainer() -> None:
    try:
        importlib.import_module("k15_plugin.verl.trainer")
    except Exception:
        logger.warning(
            "k15-plugin: registering trainer.v1.trainer_mode=k15_sync with verl failed (install the plugin's verl "
            "extra: pip install 'k15-plugin[verl]')",
            exc_info=True,
        )


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after one module has been executed (then steps out of ``sys.meta_path``)."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_callback(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_callback
        return spec


try:
    from k15_plugin.verl import advantages, loss  # noqa: F401  (registers the loss and the estimators)
except Exception:
    logger.warning(
        "k15-plugin: registering with verl failed, so policy_loss.loss_mode=k15_md and adv_estimator=k15_* are "
        "missing (install the plugin's verl extra: pip install 'k15-plugin[verl]')",
        exc_info=True,
    )
    raise

if TRAINER_PACKAGE in sys.modules:
    _register_trainer()
elif not any(isinstance(f, _AfterImport) and f.name == TRAINER_PACKAGE for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport(TRAINER_PACKAGE, _register_trainer))
