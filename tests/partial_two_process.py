"""Partial rollouts in a real 2-process run (gloo, CPU); each process writes what it saw as JSON.

    python -m torch.distributed.run --nproc_per_node 2 tests/partial_two_process.py OUTPUT_DIR

(the test starts the two processes itself, with the environment torchrun would give them).

Generation is scripted (the completion of "a+b=" is a function of a and b, continued by at most the segment budget
per call, with made-up behaviour log-probs), so what every process must receive is known; groups of 4 straddle the
processes (6 rows each). The ``token_is`` off-policy correction runs on both (its pi_i forward and metric gathers).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

EQUALS, EOS = 14, 2


def target(prompt_ids):
    s = sum(prompt_ids[1 : prompt_ids.index(EQUALS)])
    if s % 3 == 0:
        return [3 + (s + i) % 10 for i in range(9)] + [EOS]  # long: 10 tokens
    return [3 + s % 10, EOS]


def main(out: Path) -> None:
    from trl import GRPOTrainer

    from k15_plugin.data.arithmetic import make_datasets
    from k15_plugin.data.build.warm_start import build_tokenizer, tiny_test_model
    from k15_plugin.trl import KimiMirrorDescentConfig, KimiMirrorDescentTrainer

    generated = []  # prefixes this process generated

    def scripted(self, prompt_ids, images, multimodal_fields, num_generations=None):
        budget = self.generation_config.max_new_tokens
        out = []
        for prefix in prompt_ids:
            end = prefix.index(EQUALS) + 1
            generated.append(list(prefix))
            out.append(target(prefix[:end])[len(prefix) - end : len(prefix) - end + budget])
        return out, [[-1.0 - 0.1 * (t % 3) for t in x] for x in out]  # behaviour log-probs, made up

    GRPOTrainer._generate_single_turn = scripted
    seen = []

    def reward(prompts, completion_ids, trainer_state, **kwargs):
        buffer = trainer.__dict__["_k15_buffer"]
        digest = hashlib.sha256(json.dumps(buffer.state_dict(), sort_keys=True).encode()).hexdigest()
        seen.append(
            {
                "step": trainer_state.global_step,
                "prompts": list(prompts),
                "completions": [list(c) for c in completion_ids],
                "buffer": digest,
            }
        )
        return [float(len(c) <= 2) for c in completion_ids]

    reward.__name__ = "short"
    tokenizer = build_tokenizer()
    train, _ = make_datasets(seed=0)
    args = KimiMirrorDescentConfig(
        output_dir=str(out / "run"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=6,
        num_generations=4,
        max_completion_length=12,
        rollout_segment_tokens=4,
        rollout_correction="token_is",
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        seed=0,
        disable_tqdm=True,
    )
    trainer = KimiMirrorDescentTrainer(
        model=tiny_test_model(tokenizer),
        reward_funcs=[reward],
        args=args,
        train_dataset=train.select(range(96)),
        processing_class=tokenizer,
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    expected = [[target(ids) for ids in tokenizer(s["prompts"])["input_ids"]] for s in seen]
    result = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "batches": seen,
        "completions_are_targets": [s["completions"] for s in seen] == expected,
        "generated_rows": len(generated),
        "final_buffer": trainer._k15_buffer.state_dict(),
        "off_policy_ess": [h["k15/off_policy/ess"] for h in trainer.state.log_history if "k15/off_policy/ess" in h],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
