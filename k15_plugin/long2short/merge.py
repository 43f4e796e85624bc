"""Model merging for long2short (paper section 2.4: "we merge the two models by simply averaging their weights"),
done by mergekit. What this module adds: the checks mergekit leaves to the user (same architecture and sizes, same
tokenizer, same special tokens and chat template: averaging mismatched models is silent and useless) and explicit
choices of what mergekit would pick implicitly (tokenizer, config and generation config come from the long model).

Merging only helps when the two models share an ancestor (a short model fine-tuned from the same base): averaging two
models trained apart from the same random initialization gives a model that answers nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from k15_plugin.long2short.data import Long2ShortError, model_dir
from k15_plugin.long2short.outputs import ModelOutput, model_digest

METHODS = ("linear", "task_arithmetic", "ties")
# config.json fields that must agree (nested text_config fields too, for multimodal wrappers).
_CONFIG_FIELDS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "hidden_act",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def _config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as err:
        raise Long2ShortError(f"{path / 'config.json'}: not JSON ({err})") from None
    return {**config.get("text_config", {}), **config}


def check_compatible(models: dict[str, Path]) -> None:
    """One error naming the first field where the models' configs or tokenizers differ."""
    from transformers import AutoTokenizer

    (first_name, first), *others = models.items()
    reference = _config(first)
    tokenizer = AutoTokenizer.from_pretrained(first)
    for name, path in others:
        config = _config(path)
        for key in _CONFIG_FIELDS:
            if reference.get(key) != config.get(key):
                raise Long2ShortError(
                    f"--{name} {path}: config.json {key}={config.get(key)!r} but --{first_name} has "
                    f"{reference.get(key)!r}; only models of one architecture can be averaged"
                )
        other = AutoTokenizer.from_pretrained(path)
        if other.get_vocab() != tokenizer.get_vocab():
            extra = sorted(set(other.get_vocab()) ^ set(tokenizer.get_vocab()))[:3]
            detail = f"tokens only in one: {extra}" if extra else "the same tokens with other ids"
            raise Long2ShortError(
                f"--{name} {path}: its tokenizer's vocabulary differs from --{first_name}'s ({detail})"
            )
        for attr in ("bos_token", "eos_token", "pad_token", "chat_template"):
            if getattr(other, attr, None) != getattr(tokenizer, attr, None):
                raise Long2ShortError(
                    f"--{name} {path}: tokenizer {attr} {getattr(other, attr, None)!r} differs from "
                    f"--{first_name}'s {getattr(tokenizer, attr, None)!r}"
                )


def merge(
    long: str,
    short: str,
    output: str,
    *,
    weight_long: float = 0.5,
    method: str = "linear",
    base: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge the long and the short model into ``output``; returns the summary.

    ``linear`` (default, the paper's average): ``weight_long * long + (1 - weight_long) * short``, all parameters.
    ``task_arithmetic`` / ``ties`` need ``base`` (the common ancestor) and combine the two models' differences from
    it with the same weights.
    """
    if method not in METHODS:
        raise Long2ShortError(f"--method {method}: not one of {list(METHODS)}")
    if not 0.0 <= weight_long <= 1.0:
        raise Long2ShortError(f"--weight-long must be in [0, 1], got {weight_long}")
    if method != "linear" and base is None:
        raise Long2ShortError(f"--method {method} combines differences from a common ancestor: pass --base")
    if method == "linear" and base is not None:
        raise Long2ShortError("--base is used by --method task_arithmetic or ties only")
    models = {"long": model_dir(long, "--long"), "short": model_dir(short, "--short")}
    if models["long"].resolve() == models["short"].resolve():
        raise Long2ShortError(f"--long and --short are the same model ({models['long']}): nothing to average")
    if base is not None:
        models["base"] = model_dir(base, "--base")
    check_compatible(models)
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except ImportError:
        raise Long2ShortError("merging needs mergekit: pip install 'k15-plugin[merge]'") from None

    job = {
        "command": "merge",
        "method": method,
        "weight_long": weight_long,
        **{name: str(path.resolve()) for name, path in models.items()},
        **{f"{name}_sha256": model_digest(path) for name, path in models.items()},
    }
    out = ModelOutput(output, job, overwrite)
    if out.done:
        return {"command": "merge", "output": str(out.path), "skipped": "already done", **out.stats()}
    spec: dict[str, Any] = {
        "merge_method": method,
        "dtype": "float32",  # average in full precision whatever the checkpoints' dtype
        "models": [
            {"model": str(models["long"]), "parameters": {"weight": weight_long}},
            {"model": str(models["short"]), "parameters": {"weight": 1.0 - weight_long}},
        ],
    }
    if method == "linear":
        spec["parameters"] = {"normalize": False}  # the weights as given (they sum to 1)
    else:
        spec["base_model"] = str(models["base"])
        if method == "ties":
            for m in spec["models"]:
                m["parameters"]["density"] = 0.5
    shutil.rmtree(out.staging, ignore_errors=True)
    run_merge(
        MergeConfiguration.model_validate(spec),
        out_path=str(out.staging),
        options=MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=False, quiet=True),
    )
    # Written explicitly from the long model: mergekit takes the generation config from whichever model it lists
    # last, and the tokenizer only when asked.
    from transformers import AutoTokenizer, GenerationConfig

    AutoTokenizer.from_pretrained(models["long"]).save_pretrained(out.staging)
    if (models["long"] / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(models["long"]).save_pretrained(out.staging)
    stats = {"method": method, "weight_long": weight_long}
    out.commit(stats)
    return {"command": "merge", "output": str(out.path), **stats}
