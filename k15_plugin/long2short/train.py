"""Fine-tuning for long2short with TRL's own trainers: ``SFTTrainer`` on shortest-rejection-sampling rows and
``DPOTrainer`` on the preference pairs. These wrappers add what a long2short step needs around them: the input checks
(columns, lengths against ``max_length``, so that no pair's length difference is cut away silently), CPU-safe
defaults, checkpoints in ``<output>.partial`` that a rerun resumes from, and the finished model renamed into place
with ``long2short.json`` (see :mod:`k15_plugin.long2short.outputs`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from k15_plugin.long2short.data import Long2ShortError, model_dir, read_jsonl, require_columns
from k15_plugin.long2short.outputs import ModelOutput, file_digest, model_digest

COLUMNS = {"sft": ("prompt", "completion"), "dpo": ("prompt", "chosen", "rejected")}
# DPO loss terms TRL combines (DPOConfig.loss_type); "sft" adds the chosen answer's NLL, which kept the demo model
# from losing its answers under plain DPO (bench/README.md, long2short).
DPO_LOSSES = (
    "sigmoid",
    "sft",
    "ipo",
    "hinge",
    "robust",
    "apo_zero",
    "apo_down",
    "sppo_hard",
    "nca_pair",
    "bco_pair",
    "aot",
    "aot_unpaired",
    "discopop",
    "exo_pair",
    "sigmoid_norm",
)


def _text(value: Any) -> str:
    if isinstance(value, list):  # conversational: the messages' contents
        return "".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value)


def _check_lengths(rows: list[dict], path: str, tokenizer, columns: tuple[str, ...], max_length: int) -> int:
    """The longest ``prompt + answer`` in tokens; an error naming the row when one exceeds ``max_length``."""
    longest = 0
    for number, row in enumerate(rows, 1):
        prompt = len(tokenizer(_text(row["prompt"]))["input_ids"])
        for column in columns[1:]:
            n = prompt + len(tokenizer(_text(row[column]), add_special_tokens=False)["input_ids"]) + 1
            if n > max_length:
                raise Long2ShortError(
                    f"{path}: row {number} ({column}) is {n} tokens, more than --max-length "
                    f"{max_length}: it would be cut; raise --max-length or drop the row"
                )
            longest = max(longest, n)
    return longest


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` pairs, values read as YAML scalars (``1e-4``, ``true``, ``[a, b]``)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Long2ShortError(f"--set {pair}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _config(cls, kind: str, fields: dict[str, Any], overrides: dict[str, Any]):
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:
        if key not in names:
            raise Long2ShortError(f"--set {key}: not a field of TRL's {cls.__name__}")
    try:
        return cls(**{**fields, **overrides})
    except (TypeError, ValueError) as err:
        raise Long2ShortError(
            f"{kind}: TRL's {cls.__name__} refused the settings: {str(err).strip().splitlines()[0]}"
        ) from None


def finetune(
    kind: str,
    model: str,
    data: str,
    output: str,
    *,
    learning_rate: float,
    epochs: float,
    batch_size: int,
    seed: int,
    max_length: int,
    save_steps: int,
    overrides: list[str] | None = None,
    beta: float = 0.1,
    loss: str = "sigmoid",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``data`` (``kind`` ``sft`` or ``dpo``) into ``output``; returns the summary."""
    import torch

    if kind not in COLUMNS:
        raise ValueError(f"kind must be sft or dpo, got {kind!r}")
    if learning_rate <= 0 or epochs <= 0 or batch_size < 1 or max_length < 1 or save_steps < 1:
        raise Long2ShortError(
            "--learning-rate and --epochs must be > 0; --batch-size, --max-length and --save-steps >= 1"
        )
    losses = [x.strip() for x in loss.split(",") if x.strip()]
    if kind == "dpo" and (not losses or any(x not in DPO_LOSSES for x in losses)):
        raise Long2ShortError(f"--loss {loss}: expected a comma-separated list of {list(DPO_LOSSES)}")
    if kind == "dpo" and beta <= 0:
        raise Long2ShortError(f"--beta must be > 0, got {beta}")
    extra = parse_overrides(overrides)
    source = model_dir(model, "--model")
    rows = read_jsonl(data, "--data")
    require_columns(rows, data, COLUMNS[kind])

    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    cls = SFTConfig if kind == "sft" else DPOConfig
    cuda = torch.cuda.is_available()
    fields: dict[str, Any] = {
        "output_dir": "unused",
        "learning_rate": learning_rate,
        "num_train_epochs": epochs,
        "per_device_train_batch_size": batch_size,
        "seed": seed,
        "max_length": max_length,
        "lr_scheduler_type": "constant",
        "report_to": [],
        "use_cpu": not cuda,
        "bf16": False,
        "gradient_checkpointing": False,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": 1,
        "logging_steps": 10,
        "disable_tqdm": not progress,
    }
    if kind == "dpo":
        fields.update(beta=beta, loss_type=losses, loss_weights=[1.0] * len(losses), precompute_ref_log_probs=True)
    _config(cls, kind, fields, extra)  # refuse bad settings before anything loads

    job = {
        "command": kind,
        "model": str(source.resolve()),
        "model_sha256": model_digest(source),
        "data": str(Path(data).resolve()),
        "data_sha256": file_digest(Path(data)),
        "settings": {k: v for k, v in fields.items() if k not in ("output_dir", "disable_tqdm")},
        "overrides": extra,
    }
    out = ModelOutput(output, job, overwrite)
    if out.done:
        return {"command": kind, "output": str(out.path), "skipped": "already done", **out.stats()}

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    longest = _check_lengths(rows, data, tokenizer, COLUMNS[kind], max_length)
    # float32 weights whatever the checkpoint's dtype: bf16=true trains in mixed precision on these (pure bf16 weights
    # would round small updates away)
    policy = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    args = _config(cls, kind, {**fields, "output_dir": str(out.partial / "trainer")}, extra)
    dataset = Dataset.from_list([{c: r[c] for c in COLUMNS[kind]} for r in rows])
    trainer_cls = SFTTrainer if kind == "sft" else DPOTrainer
    trainer = trainer_cls(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer)
    resume = any((out.partial / "trainer").glob("checkpoint-*"))
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(str(out.staging))
    tokenizer.save_pretrained(str(out.staging))
    stats = {
        "rows": len(rows),
        "longest_tokens": longest,
        "steps": trainer.state.global_step,
        "train_loss": round(float(result.training_loss), 6),
        "seconds": round(time.perf_counter() - start, 2),
        "resumed": resume,
    }
    out.commit(stats)
    return {"command": kind, "output": str(out.path), **stats}
