"""long2short (paper section 2.4): make a model that answers in fewer tokens out of a long-CoT one.

Four methods, each on ordinary Hugging Face checkpoints and JSONL files (command line: ``k15-long2short``):

* **merge** -- average the long model with a short one of the same ancestry (:func:`merge`, by mergekit);
* **shortest rejection sampling** -- n samples per prompt from the long model, the shortest correct one kept and
  fine-tuned on (:func:`sample`, :func:`sft_rows`, :func:`finetune` with TRL's ``SFTTrainer``);
* **DPO** -- the shortest correct sample against longer ones: wrong ones longer than it and correct ones at least
  1.5x longer (:func:`dpo_rows`, :func:`finetune` with TRL's ``DPOTrainer``);
* **long2short RL** -- a second RL phase with the length penalty and a shorter length limit
  (``k15-train experiment=long2short_rl``).

:func:`evaluate` and :func:`report` compare the results by accuracy against mean answer tokens (the paper's Fig. 7).
The selection rules themselves are pure functions in :mod:`k15_plugin.core.long2short`.
"""

from k15_plugin.long2short.data import Long2ShortError, task_prompts
from k15_plugin.long2short.merge import merge
from k15_plugin.long2short.rows import dpo_rows, sft_rows
from k15_plugin.long2short.sampling import evaluate, report, sample
from k15_plugin.long2short.train import finetune

__all__ = [
    "Long2ShortError",
    "dpo_rows",
    "evaluate",
    "finetune",
    "merge",
    "report",
    "sample",
    "sft_rows",
    "task_prompts",
]
