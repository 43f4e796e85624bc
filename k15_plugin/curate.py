"""``k15-curate``: prompt-set curation as in the paper's section 2.1 (RL prompt set curation).

    k15-curate difficulty   --input train.jsonl --output rated.jsonl --model PATH [--n 10 --temperature 1.0]
    k15-curate easy-to-hack --input rated.jsonl --output kept.jsonl --model PATH [--tries 8]
    k15-curate filter       --input raw.jsonl   --output clean.jsonl
    (``--dataset ID [--config-name C --split S]`` reads a Hub dataset instead of ``--input``)

* ``difficulty`` -- "a model-based approach that leverages the model's own capacity to adaptively assess the
  difficulty of each prompt": ``n`` samples per prompt at a high temperature (paper: 10 samples), scored by the reward;
  writes ``pass_rate`` and ``difficulty = 1 - pass_rate`` (higher is harder), the column ``sampler=curriculum``
  reads (:class:`k15_plugin.trl.samplers.CurriculumSampler`).
* ``easy-to-hack`` -- "prompt the model to guess potential answers without any CoT reasoning steps. If the model
  predicts the correct answer within N attempts, the prompt is considered too easy-to-hack and removed" (paper:
  N = 8). Asks with a no-reasoning template and a short token budget; writes only the prompts it never guessed.
* ``filter`` -- "we exclude some types of questions, such as multiple-choice, true/false, and proof-based
  questions": rule-based, with counts of what was dropped and why.

Every command shows a progress bar, records each finished prompt in an append-only, fsync'd sidecar
``<output>.partial.jsonl`` (keyed by the prompt's index in the input) and, rerun after an interruption with the same
arguments, skips what it has already done. The output is written at the end in one piece (a temporary file in the
same directory, then ``os.replace``), and the sidecar is removed. Generation uses vLLM when it is importable and a
GPU is present, else batched ``transformers.generate`` (left padding); ``--backend vllm`` also runs on vLLM's CPU
build, and the summary names the backend used. The sidecar, the generation and the atomic write are
:mod:`k15_plugin.jobs`, shared with ``k15-long2short``. Scoring uses :class:`MathReward` (default) or, for the
built-in demo model (``--model tiny_demo``), the demo task's :class:`ArithmeticReward`.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from k15_plugin.data.jsonl import read_objects
from k15_plugin.errors import K15Error
from k15_plugin.jobs import (
    DEMO_MODEL,
    Generator,
    Sidecar,
    add_generation_arguments,
    console_main,
    run_chunks,
    write_atomically,
)

COMMANDS = ("difficulty", "easy-to-hack", "filter")
NO_REASONING_TEMPLATE = "{prompt}\n\nGive only the final answer, with no reasoning or explanation."


class CurationError(K15Error):
    """A user-facing error: bad arguments, a missing column, or a sidecar from a different job."""


# ----------------------------------------------------------------------------------------------------------------------
# Rows in, rows out
# ----------------------------------------------------------------------------------------------------------------------


def read_rows(args: argparse.Namespace) -> list[dict]:
    """The input rows as dicts: a JSONL file (``--input``) or a Hub dataset (``--dataset``)."""
    if args.dataset:
        from datasets import load_dataset

        return [dict(row) for row in load_dataset(args.dataset, args.config_name, split=args.split)]
    return read_objects(args.input, "--input", CurationError, allow_empty=True)


# ----------------------------------------------------------------------------------------------------------------------
# Filter rules
# ----------------------------------------------------------------------------------------------------------------------

# Two or more lettered options: "(A) 3 (B) 4", "A. 3\nB. 4", "\textbf{(A) } 3 \qquad \textbf{(B) }", "A) 3".
_OPTION = re.compile(r"(?:^|\s|\\textbf\{|\\text\{|\$)\(?([A-E])(?:\)|\.|:|\)\s*\})(?=\s|\$|\\|\d|$)", re.MULTILINE)
_MC_PHRASES = re.compile(r"answer choices|which of the following|choose the (?:correct|best) (?:answer|option)", re.I)
_LETTER_ANSWER = re.compile(r"^\s*(?:\\text\{|\\textbf\{)?\(?[A-E]\)?\}?\s*$")
_TF_PHRASES = re.compile(
    r"\btrue or false\b|\btrue/false\b|\bT/F\b|\bis (?:the following|this|it) (?:statement )?true\b", re.I
)
_TF_ANSWERS = {"true", "false", "yes", "no", "t", "f", "\\text{true}", "\\text{false}", "\\text{yes}", "\\text{no}"}
_PROOF_PHRASES = re.compile(
    r"\bprove\b|\bproof\b|\bshow that\b|\bdemonstrate that\b|\bjustify (?:that|your)\b|\\begin\{proof\}", re.I
)
FILTER_REASONS = ("multiple_choice", "true_false", "proof")


def question_type(prompt: Any, answer: Any) -> str | None:
    """``multiple_choice``, ``true_false`` or ``proof`` if the question is of a type the paper excludes, else None."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    reference = "" if answer is None else str(answer).strip()
    letters = {m.group(1) for m in _OPTION.finditer(text)}
    if {"A", "B"} <= letters or _MC_PHRASES.search(text) or _LETTER_ANSWER.match(reference):
        return "multiple_choice"
    if _TF_PHRASES.search(text) or reference.lower().rstrip(".") in _TF_ANSWERS:
        return "true_false"
    if _PROOF_PHRASES.search(text):
        return "proof"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


def make_scorer(kind: str, tokenizer, extraction: str) -> Callable[[list[tuple[str, list[int]]], Any], list[float]]:
    """``score(samples, answer) -> rewards``: the math verifier (:mod:`k15_plugin.rewards.registry`), or the demo
    task's own arithmetic checker on the token ids."""
    if kind == "arithmetic":
        from k15_plugin.data.arithmetic import ArithmeticReward

        arithmetic = ArithmeticReward(tokenizer)

        def score_ids(samples: list[tuple[str, list[int]]], answer: Any) -> list[float]:
            return arithmetic(completion_ids=[ids for _, ids in samples], answer=[answer] * len(samples))

        return score_ids
    from k15_plugin.rewards.registry import scorer

    score = scorer({"verifier": "math", "extraction": extraction})

    def score_text(samples: list[tuple[str, list[int]]], answer: Any) -> list[float]:
        return score([text for text, _ in samples], [answer] * len(samples))

    return score_text


# ----------------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------------


def _job(args: argparse.Namespace) -> dict:
    """What identifies a job for resuming: the command, the input and every option that changes the results."""
    ignore = {"output", "restart", "stop_after", "func", "batch_size", "quiet"}
    job = {k: v for k, v in sorted(vars(args).items()) if k not in ignore}
    if args.input:
        job["input"] = str(Path(args.input).resolve())
    return job


def _columns(rows: list[dict], args: argparse.Namespace, need_answer: bool) -> None:
    if not rows:
        return
    needed = [args.prompt_column] + ([args.answer_column] if need_answer else [])
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise CurationError(
            f"column(s) {missing} not in the input (columns: {sorted(rows[0])}); see --prompt-column "
            "and --answer-column"
        )


def _process(
    args, rows: list[dict], sidecar: Sidecar, work: Callable[[list[int]], dict[int, dict]], chunk: int, progress: bool
) -> bool:
    """Run ``work`` over the unfinished prompts in chunks; returns False when stopped by ``--stop-after``."""
    return run_chunks(sidecar, len(rows), work, chunk, args.stop_after, args.command, "prompt", progress)


def _model_defaults(args: argparse.Namespace, command: str) -> None:
    demo = args.model == DEMO_MODEL
    if args.reward is None:
        args.reward = "arithmetic" if demo else "math"
    if args.template is None:  # the demo tokenizer knows only digits, '+', '=' and '.'
        args.template = "{prompt}" if demo or command == "difficulty" else NO_REASONING_TEMPLATE
    if args.max_new_tokens is None:
        args.max_new_tokens = 4 if demo else (1024 if command == "difficulty" else 32)


def _correct_counts(args, rows: list[dict], n: int) -> tuple[Callable[[list[int]], dict[int, int]], str]:
    """``(correct, backend)``: ``correct(indices)`` gives, for each row index, how many of ``n`` samples of its prompt
    are scored correct (reward >= ``--correct-threshold``), what both ``difficulty`` and ``easy-to-hack`` count;
    ``backend`` is the generator's (``vllm`` or ``transformers``)."""
    generator = Generator(
        args.model, args.backend, args.temperature, args.max_new_tokens, args.batch_size, args.chat, args.seed
    )
    score = make_scorer(args.reward, generator.tokenizer, args.extraction)

    def correct(indices: list[int]) -> dict[int, int]:
        prompts = [_prompt(rows[i], args) for i in indices]
        samples = generator.sample(prompts, n, args.seed + indices[0])
        return {
            i: int(sum(r >= args.correct_threshold for r in score(group, rows[i][args.answer_column])))
            for i, group in zip(indices, samples, strict=True)
        }

    return correct, generator.backend


def run_difficulty(args, rows: list[dict], sidecar: Sidecar, progress: bool) -> tuple[bool, dict]:
    """``difficulty``: ``--n`` samples per prompt, scored; writes every row with ``pass_rate`` (share of samples with a
    reward >= ``--correct-threshold``) and ``difficulty = 1 - pass_rate``.

    Returns ``(complete, summary)``; ``(False, {})`` when ``--stop-after`` stopped it before the last prompt (nothing
    written yet). The summary names the generation backend and counts the rows, the mean pass rate, and the unsolved
    and always-solved prompts.
    """
    correct, backend = _correct_counts(args, rows, args.n)

    def work(indices: list[int]) -> dict[int, dict]:
        return {i: {"pass_rate": count / args.n} for i, count in correct(indices).items()}

    finished = _process(args, rows, sidecar, work, max(1, args.batch_size // args.n), progress)
    if not finished:
        return False, {}
    out = [
        {**row, "pass_rate": sidecar.done[i]["pass_rate"], "difficulty": 1.0 - sidecar.done[i]["pass_rate"]}
        for i, row in enumerate(rows)
    ]
    write_atomically(Path(args.output), out)
    rates = [r["pass_rate"] for r in out]
    return True, {
        "backend": backend,
        "rows": len(out),
        "mean_pass_rate": sum(rates) / max(len(rates), 1),
        "unsolved": sum(r == 0 for r in rates),
        "always_solved": sum(r == 1 for r in rates),
    }


def run_easy_to_hack(args, rows: list[dict], sidecar: Sidecar, progress: bool) -> tuple[bool, dict]:
    """``easy-to-hack``: ``--tries`` answers per prompt without reasoning; writes only the rows never guessed right.

    Returns ``(complete, summary)`` as :func:`run_difficulty` does; the summary counts the rows, the rows kept and
    those dropped as easy to hack.
    """
    correct, backend = _correct_counts(args, rows, args.tries)

    def work(indices: list[int]) -> dict[int, dict]:
        return {i: {"guessed": count} for i, count in correct(indices).items()}

    finished = _process(args, rows, sidecar, work, max(1, args.batch_size // args.tries), progress)
    if not finished:
        return False, {}
    kept = [row for i, row in enumerate(rows) if sidecar.done[i]["guessed"] == 0]
    write_atomically(Path(args.output), kept)
    return True, {
        "backend": backend,
        "rows": len(rows),
        "kept": len(kept),
        "dropped_easy_to_hack": len(rows) - len(kept),
    }


def run_filter(args, rows: list[dict], sidecar: Sidecar, progress: bool) -> tuple[bool, dict]:
    """``filter``: drops the rows :func:`question_type` classifies (multiple-choice, true/false, proof); no model.

    Returns ``(complete, summary)`` as :func:`run_difficulty` does; the summary counts the rows, the rows kept and,
    per :data:`FILTER_REASONS` entry, the rows dropped for it.
    """

    def work(indices: list[int]) -> dict[int, dict]:
        return {
            i: {"reason": question_type(rows[i][args.prompt_column], rows[i].get(args.answer_column))} for i in indices
        }

    if not _process(args, rows, sidecar, work, 1024, progress):
        return False, {}
    kept = [row for i, row in enumerate(rows) if sidecar.done[i]["reason"] is None]
    write_atomically(Path(args.output), kept)
    reasons = Counter(r["reason"] for r in sidecar.done.values() if r["reason"] is not None)
    return True, {"rows": len(rows), "kept": len(kept), "dropped": {k: reasons.get(k, 0) for k in FILTER_REASONS}}


def _prompt(row: dict, args: argparse.Namespace) -> Any:
    prompt = row[args.prompt_column]
    if isinstance(prompt, list):  # already chat messages: the template applies to the last user turn
        *head, last = prompt
        return [*head, {**last, "content": args.template.format(prompt=last["content"])}]
    return args.template.format(prompt=prompt)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``k15-curate`` argument parser: one subcommand per :data:`COMMANDS` entry, each with its ``run_*``
    function as ``func``."""
    parser = argparse.ArgumentParser(prog="k15-curate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--input", help="JSONL file, one JSON object per line")
        source.add_argument("--dataset", help="Hub dataset id (datasets.load_dataset)")
        p.add_argument("--config-name", default=None, help="Hub dataset configuration")
        p.add_argument("--split", default="train", help="Hub dataset split (default: train)")
        p.add_argument("--output", required=True, help="JSONL file to write (atomically, at the end)")
        p.add_argument("--prompt-column", default="prompt")
        p.add_argument("--answer-column", default="answer")
        p.add_argument("--restart", action="store_true", help="discard the progress of an earlier, different job")
        p.add_argument(
            "--stop-after",
            type=int,
            default=None,
            metavar="N",
            help="process at most N more prompts, then stop; rerun the same command to continue",
        )
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    def sampling(p: argparse.ArgumentParser, temperature: float) -> None:
        p.add_argument("--model", required=True, help=f"model path or Hub id; {DEMO_MODEL!r}: the built-in demo model")
        p.add_argument(
            "--reward",
            choices=["math", "arithmetic"],
            default=None,
            help="scoring: math (math-verify) or arithmetic (demo task); default: arithmetic for "
            f"{DEMO_MODEL}, math otherwise",
        )
        p.add_argument(
            "--extraction",
            default="auto",
            choices=["auto", "boxed", "gsm8k", "last_number"],
            help="where the math reward finds the final answer (default: auto)",
        )
        p.add_argument("--correct-threshold", type=float, default=1.0, help="reward counted as a success (1.0)")
        p.add_argument("--temperature", type=float, default=temperature)
        p.add_argument(
            "--max-new-tokens",
            type=int,
            default=None,
            help="default: 4 for the demo model; 1024 (difficulty) or 32 (easy-to-hack) otherwise",
        )
        p.add_argument("--template", default=None, help="prompt template with {prompt}")
        add_generation_arguments(p, 64, "sequences per generate call (prompts x samples)")

    p = commands.add_parser("difficulty", help="sample n answers per prompt; write pass_rate and difficulty")
    common(p)
    sampling(p, temperature=1.0)  # "high temperature" (paper, section 2.1)
    p.add_argument("--n", type=int, default=10, help="samples per prompt (paper: 10)")
    p.set_defaults(func=run_difficulty)

    p = commands.add_parser("easy-to-hack", help="drop prompts the model answers right without reasoning")
    common(p)
    sampling(p, temperature=1.0)
    p.add_argument("--tries", type=int, default=8, help="guesses per prompt (paper: 8)")
    p.set_defaults(func=run_easy_to_hack)

    p = commands.add_parser("filter", help="drop multiple-choice, true/false and proof questions")
    common(p)
    p.set_defaults(func=run_filter)
    return parser


def curate(argv: Sequence[str] | None = None) -> dict:
    """Run one ``k15-curate`` command; returns its summary (``complete`` False when stopped by ``--stop-after``)."""
    args = build_parser().parse_args(argv)
    model_based = args.command != "filter"
    if model_based:
        _model_defaults(args, args.command)
        samples = args.n if args.command == "difficulty" else args.tries
        if samples < 1 or args.batch_size < 1 or args.temperature <= 0:
            raise CurationError("--n/--tries and --batch-size must be >= 1 and --temperature > 0")
    if args.stop_after is not None and args.stop_after < 0:
        raise CurationError("--stop-after must be >= 0")
    rows = read_rows(args)
    _columns(rows, args, need_answer=model_based)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    sidecar = Sidecar(output, _job(args), restart=args.restart, error=CurationError)
    resumed = len(sidecar.done)
    try:
        complete, summary = args.func(args, rows, sidecar, progress=not args.quiet)
    finally:
        sidecar.close()
    new = len(sidecar.done) - resumed
    if complete:
        sidecar.remove()
    return {
        "command": args.command,
        "complete": complete,
        "processed": new,
        "resumed": resumed,
        "output": str(output) if complete else None,
        **summary,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``k15-curate``: prints the summary as one JSON line."""
    console_main("k15-curate", curate, argv)


if __name__ == "__main__":
    main()
