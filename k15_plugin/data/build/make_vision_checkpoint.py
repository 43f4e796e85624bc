"""Build the shipped checkpoint of the vision-language task (``k15_plugin.data.vision``): ``demo_checkpoint_vision``.

    python -m k15_plugin.data.build.make_vision_checkpoint      # -> k15_plugin/data/demo_checkpoint_vision/

A LLaVA (``LlavaForConditionalGeneration``) built in code, nothing downloaded: a CLIP vision tower (hidden
:data:`VISION_HIDDEN`, 2 layers, 14-pixel patches on the 56x56 picture: 16 patch tokens, the CLS token dropped), a
two-layer projector and a Llama text model (hidden :data:`TEXT_HIDDEN`, 2 layers, tied embeddings). Its processor
is a ``LlavaProcessor`` of ``CLIPImageProcessorPil`` (PIL only: no torchvision) and a character-level tokenizer
with ``<pad> <bos> <eos> <image>`` and the printable ASCII characters, whose chat template renders a user turn as
``<bos><image>How many red squares?\\n`` (the processor expands ``<image>`` to the 16 image tokens).

Why LLaVA: TRL 1.16's GRPOTrainer handles its ``image`` column (``pixel_values`` only), ``AutoProcessor`` and
``AutoModelForImageTextToText`` reload it, vLLM lists the architecture (though vLLM 0.31's LLaVA module imports
torchvision, so it does not load here), and its processor needs no torchvision (Qwen2-VL's processor needs a video
processor that does, and this environment has no torchvision for CPU torch).

Warm start: teacher forcing on ``prompt answer EOS`` (the loss on the answer's tokens only) over a fixed set of
training scenes, AdamW (betas 0.9/0.98, weight decay 0.01), batches of :data:`BATCH`, a linear warm-up then a
constant learning rate. Training stops at the first check (every :data:`CHECK_EVERY` steps) whose greedy accuracy on
a check set of the training distribution (not the held-out set) reaches :data:`TARGET_ACCURACY`, or after
``--max-steps``: the checkpoint is meant to be right sometimes, so RL has something to learn. Measured on a first
build (checks every 50 steps, no stop): 30 % at step 50, 43 % at 100 (answering only 1 or 5: few or many), 62 % at
150 with every answer in use, 72 % held-out at 400 (100 % without clutter, 48 % at the most).

``warm_start.json`` records the build settings, the checks, the greedy held-out accuracy (overall, per clutter level,
the answers' shares) of the checkpoint reloaded from disk, the same on the held-out rows :data:`SUBSET_ROWS` (what
the test re-measures), the same for :data:`SAMPLES` sampled completions per held-out prompt (temperature 1: what
RL starts from) and the accuracy of always answering the most common answer, for comparison.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from k15_plugin.data.build.warm_start import save_measured, seeded_model
from k15_plugin.data.vision import (
    CELL,
    IMAGE_SIZE,
    MAX_NEW_TOKENS,
    VISION_CHECKPOINT_DIR,
    evaluate_vision_greedy,
    load_vision_checkpoint,
    make_vision_datasets,
)

SEED = 0
VISION_HIDDEN = 64
TEXT_HIDDEN = 64
LAYERS = 2
NUM_TRAIN = 5000
BATCH = 32
LR = 1e-3
WARMUP = 50
CHECK_EVERY = 10
CHECK_SIZE = 300
TARGET_ACCURACY = 0.35
MAX_STEPS = 1000
SUBSET_ROWS = list(range(0, 300, 5))  # the held-out rows the test re-measures: 20 of each clutter level
MAX_POSITIONS = 64
SAMPLES = 4  # sampled completions (temperature 1) per held-out prompt in warm_start.json

PAD, BOS, EOS, IMAGE = "<pad>", "<bos>", "<eos>", "<image>"
SPECIALS = [PAD, BOS, EOS, IMAGE]
# A user turn: its image blocks as <image>, its text as is, then a newline; an assistant turn: its text then EOS. The
# generation prompt adds nothing: the newline after the user turn is where the answer starts.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
)


def build_vision_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: ``<pad> <bos> <eos> <image> [UNK]`` then the printable ASCII characters (less
    ``\\r``, ``\\x0b``, ``\\x0c``), one token each; left padding; no special token added when encoding (the chat
    template writes the BOS)."""
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate([*SPECIALS, "[UNK]", *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token="[UNK]",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE},
    )


def build_vision_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """``LlavaProcessor``: the PIL CLIP image processor at 56x56 (no resize or crop changes the picture) and
    :func:`build_vision_tokenizer`; ``<image>`` becomes 16 image tokens (one per patch, CLS dropped)."""
    tokenizer = tokenizer or build_vision_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=CELL,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_vision_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = SEED,
    vision_hidden: int = VISION_HIDDEN,
    text_hidden: int = TEXT_HIDDEN,
    layers: int = LAYERS,
) -> LlavaForConditionalGeneration:
    """A fresh LLaVA of the module docstring, initialised from ``seed`` without touching the global RNG."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=CELL,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=4 * text_hidden,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    return seeded_model(LlavaForConditionalGeneration, config, seed, tokenizer, MAX_NEW_TOKENS)


def sft_tensors(processor: LlavaProcessor, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, pixel_values)`` of ``prompt answer EOS`` for every row, tokenized as TRL renders the
    prompt; labels are -100 but on the answer and EOS. Every prompt renders alike, so no padding is needed."""
    texts = processor.apply_chat_template(list(rows["prompt"]), add_generation_prompt=True, tokenize=False)
    batch = processor(images=list(rows["image"]), text=texts, return_tensors="pt")
    prompt_ids = batch["input_ids"]  # (N, P)
    tokenizer = processor.tokenizer
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in rows["answer"]]
    if len({len(a) for a in answers}) != 1 or len({tuple(p) for p in prompt_ids.tolist()}) != 1:
        raise ValueError("sft_tensors expects one prompt text and answers of one length")
    answer_ids = torch.tensor(answers)  # (N, A)
    input_ids = torch.cat([prompt_ids, answer_ids], dim=1)  # (N, P+A)
    labels = torch.cat([torch.full_like(prompt_ids, -100), answer_ids], dim=1)  # (N, P+A)
    return input_ids, labels, batch["pixel_values"]


def train(model, processor, train_rows, check_rows, args) -> tuple[int, float, list[dict]]:
    """Teacher forcing until the check set's greedy accuracy reaches ``args.target`` (or ``args.max_steps``);
    returns (steps, seconds, the checks)."""
    input_ids, labels, pixel_values = sft_tensors(processor, train_rows)
    rng = random.Random(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP))
    start, checks = time.perf_counter(), []
    model.train()
    for step in range(1, args.max_steps + 1):
        idx = torch.tensor([rng.randrange(len(input_ids)) for _ in range(args.batch)])
        logits = model(input_ids=input_ids[idx], pixel_values=pixel_values[idx]).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[idx, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % CHECK_EVERY == 0 or step == args.max_steps:
            check = {
                "step": step,
                "loss": round(loss.item(), 4),
                **evaluate_vision_greedy(model, processor, check_rows),
            }
            check["seconds"] = round(time.perf_counter() - start, 1)
            checks.append(check)
            print(json.dumps(check), flush=True)
            if check["accuracy"] >= args.target:
                break
    model.eval()
    return step, time.perf_counter() - start, checks


def majority_accuracy(rows) -> float:
    """The accuracy of always giving the most common answer of ``rows``."""
    answers = list(rows["answer"])
    return round(max(answers.count(a) for a in set(answers)) / len(answers), 4)


def save(model, processor, out: Path, info: dict, heldout) -> dict:
    """Save to ``out`` (via ``<out>.tmp``, renamed over it) with a ``warm_start.json``: ``info`` plus the greedy
    held-out accuracy of the checkpoint reloaded from disk, on all of ``heldout`` and on its rows
    :data:`SUBSET_ROWS` (:func:`~k15_plugin.data.build.warm_start.save_measured`)."""
    subset = heldout.select(SUBSET_ROWS)

    def measured(reloaded, reloaded_processor) -> dict:
        return {
            "heldout_size": len(heldout),
            "heldout": evaluate_vision_greedy(reloaded, reloaded_processor, heldout),
            "heldout_sampled": evaluate_vision_greedy(
                reloaded, reloaded_processor, heldout, num_samples=SAMPLES, temperature=1.0
            ),
            "heldout_majority_accuracy": majority_accuracy(heldout),
            "subset_rows": SUBSET_ROWS,
            "subset": evaluate_vision_greedy(reloaded, reloaded_processor, subset),
        }

    return save_measured(model, processor, out, info, measured, MAX_NEW_TOKENS, load=load_vision_checkpoint)


def main(argv: list[str] | None = None) -> None:
    """Command line of the module docstring; prints ``warm_start.json`` as a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=VISION_CHECKPOINT_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--target", type=float, default=TARGET_ACCURACY)
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--vision-hidden", type=int, default=VISION_HIDDEN)
    parser.add_argument("--text-hidden", type=int, default=TEXT_HIDDEN)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    processor = build_vision_processor()
    train_rows, heldout = make_vision_datasets(num_train=NUM_TRAIN, seed=args.seed)
    check_rows, _ = make_vision_datasets(num_train=CHECK_SIZE, seed=args.seed + 1000, heldout_size=3)
    model = build_vision_model(
        processor.tokenizer, seed=args.seed, vision_hidden=args.vision_hidden, text_hidden=args.text_hidden
    )
    steps, seconds, checks = train(model, processor, train_rows, check_rows, args)
    info = {
        "task": "count the red squares in a 56x56 picture, 1..5 of them, clutter 1..3 (k15_plugin.data.vision)",
        "architecture": "LlavaForConditionalGeneration: CLIP vision tower + Llama text model, built in code",
        "seed": args.seed,
        "num_train": NUM_TRAIN,
        "vision_hidden": args.vision_hidden,
        "text_hidden": args.text_hidden,
        "layers": LAYERS,
        "batch_size": args.batch,
        "lr": args.lr,
        "warmup": WARMUP,
        "check_every": CHECK_EVERY,
        "check_size": CHECK_SIZE,
        "target_accuracy": args.target,
        "max_steps": args.max_steps,
        "steps": steps,
        "seconds": round(seconds, 1),
        "threads": args.threads,
        "checks": checks,
    }
    print(json.dumps(save(model, processor, args.out, info, heldout)), flush=True)


if __name__ == "__main__":
    main()
