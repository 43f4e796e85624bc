"""verl's actor worker with one more remote method: clearing the optimizer's state (paper 2.3.2, reset per iteration).

The plugin's trainer puts this class in place of ``ActorRolloutRefWorker`` when
``algorithm.k15.reset_optimizer_each_iteration`` is on, and calls ``k15_reset_optimizer`` on every rank before each
actor update. Only torch optimizers (the FSDP engines) are cleared; any other engine raises rather than train on
with the old moments.
"""

from __future__ import annotations

import torch
from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.engine_workers import ActorRolloutRefWorker

from k15_plugin.core.optimizer import clear_optimizer_state


def reset_optimizer_state(optimizer) -> int:
    """Clear a torch optimizer's per-parameter state (Adam moments and step counts); learning rates untouched.

    Returns the number of parameters whose state was cleared. The next ``step()`` starts every moment from zero and
    the bias correction from step 1, exactly as a freshly built optimizer would.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"algorithm.k15.reset_optimizer_each_iteration: cannot reset a {type(optimizer).__name__} (only torch "
            "optimizers, as verl's FSDP engines use); set it to false for this engine"
        )
    return clear_optimizer_state(optimizer)


class K15ActorRolloutRefWorker(ActorRolloutRefWorker):
    """``ActorRolloutRefWorker`` plus :meth:`k15_reset_optimizer`."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def k15_reset_optimizer(self) -> int:
        """Clear this rank's actor optimizer state (:func:`reset_optimizer_state`); returns the parameters cleared.

        Dispatched ``ONE_TO_ALL``: the controller's call runs on every rank. Raises TypeError when the actor engine
        has no torch optimizer.
        """
        engine = getattr(self.actor, "engine", None)
        return reset_optimizer_state(getattr(engine, "optimizer", None))
