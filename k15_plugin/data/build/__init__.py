"""Build-time tooling for the shipped demo checkpoints: the warm-start trainer and the checkpoint makers.

* :mod:`k15_plugin.data.build.warm_start` -- the demo tokenizer and models built in code and the supervised warm start;
* ``python -m k15_plugin.data.build.make_demo_checkpoint`` -- the plain, filler and long-tailed addition checkpoints;
* ``python -m k15_plugin.data.build.make_sum3_checkpoints`` -- the long and short three-term checkpoints.
* ``python -m k15_plugin.data.build.make_vision_checkpoint`` -- the tiny LLaVA of the vision-language task.

The checkpoints themselves stay next to the runtime task modules (``k15_plugin/data/demo_checkpoint*``). Nothing at
run time (``k15-train``, ``k15-curate``, ``k15-long2short``) imports this package.
"""
