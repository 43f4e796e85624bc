"""Generation, resumable chunks and atomic output for the offline commands (``k15-curate``, ``k15-long2short``).

Both commands sample from a model over a list of prompts, keep their progress so that an interrupted run resumes
where it stopped, write their output in one piece at the end and report in the same way on the command line. The
pieces they share live here:

* :class:`Generator` -- ``n`` samples per prompt with vLLM when it is importable and a GPU is present, else batched
  ``transformers.generate`` (left padding); ``--backend vllm`` also on vLLM's CPU build; :data:`DEMO_MODEL` names
  the built-in demo checkpoint;
* :class:`Sidecar` -- the append-only, fsync'd ``<output>.partial.jsonl`` of finished prompts, keyed by index;
* :func:`run_chunks` -- the unfinished indices in chunks, each result saved before the next, with a progress bar;
* :func:`write_atomically` -- JSONL written to a temporary file in the same directory, then ``os.replace``;
* :func:`console_main` -- a command's console entry point: the summary as one JSON line, a
  :class:`~k15_plugin.errors.K15Error` as one line on stderr with exit code 2, 130 on interruption and
  :data:`EXIT_INCOMPLETE` when stopped early.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from k15_plugin.errors import K15Error

DEMO_MODEL = "tiny_demo"
EXIT_INCOMPLETE = 3  # stopped early (--stop-after); the sidecar holds the progress

# ----------------------------------------------------------------------------------------------------------------------
# Output and progress
# ----------------------------------------------------------------------------------------------------------------------


def write_atomically(path: Path, rows: Iterable[dict]) -> None:
    """Write JSONL to ``path`` all at once: a temporary file in the same directory, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the output private; give it a normal file's mode
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Sidecar:
    """``<output>.partial.jsonl``: a header naming the job, then one ``{"index": i, ...}`` line per finished prompt.

    Append-only and fsync'd after every batch, so a crash loses at most the batch in flight; a torn last line (a
    crash mid-write) is cut off on reopening. A sidecar written by a different job (other command, input or options)
    is refused rather than mixed in; ``--restart`` discards it.

    ``error``: the :class:`~k15_plugin.errors.K15Error` subclass raised for such a sidecar (each command its own).
    """

    def __init__(self, output: Path, job: dict, restart: bool = False, error: type[K15Error] = K15Error):
        self.path = output.with_name(output.name + ".partial.jsonl")
        self.done: dict[int, dict] = {}
        self.error = error
        if restart:
            self.path.unlink(missing_ok=True)
        if self.path.exists():
            self._load(job)
        else:
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"k15_curate_job": job}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.file = open(self.path, "a", encoding="utf-8")  # closed by close()

    def _load(self, job: dict) -> None:
        good_bytes = 0
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f):
                if not raw.endswith(b"\n"):
                    break  # torn last line
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    break
                if number == 0:
                    if record.get("k15_curate_job") != job:
                        raise self.error(
                            f"{self.path} belongs to a different job ({record.get('k15_curate_job')}); rerun with the "
                            "same arguments to resume it, or pass --restart to discard it"
                        )
                else:
                    self.done[int(record.pop("index"))] = record
                good_bytes += len(raw)
        if good_bytes == 0:
            raise self.error(f"{self.path} has no readable header; delete it or pass --restart")
        with open(self.path, "r+b") as f:
            f.truncate(good_bytes)

    def add(self, results: dict[int, dict]) -> None:
        """Record finished prompts (``{index: record}``) and fsync them before returning."""
        for index, record in results.items():
            self.file.write(json.dumps({"index": index, **record}, ensure_ascii=False, default=str) + "\n")
            self.done[index] = record
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        """Close the sidecar file; what it holds stays for the next run."""
        self.file.close()

    def remove(self) -> None:
        """Close and delete the sidecar (the job is complete)."""
        self.close()
        self.path.unlink(missing_ok=True)


def run_chunks(
    sidecar: Sidecar,
    total: int,
    work: Callable[[list[int]], dict[int, dict]],
    chunk: int,
    stop_after: int | None,
    desc: str,
    unit: str,
    progress: bool,
) -> bool:
    """``work(indices) -> {index: record}`` over the indices ``0..total-1`` the sidecar does not hold yet, ``chunk``
    at a time, each result saved before the next; at most ``stop_after`` indices (None: all). Returns False when
    stopped early by ``stop_after``."""
    from tqdm.auto import tqdm

    pending = [i for i in range(total) if i not in sidecar.done]
    stopped = stop_after is not None and len(pending) > stop_after
    todo = pending if stop_after is None else pending[:stop_after]
    bar = tqdm(
        total=total, initial=total - len(pending), desc=desc, unit=unit, disable=not progress, dynamic_ncols=True
    )
    try:
        for start in range(0, len(todo), chunk):
            indices = todo[start : start + chunk]
            sidecar.add(work(indices))
            bar.update(len(indices))
    finally:
        bar.close()
    return not stopped


# ----------------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------------


BACKENDS = ("auto", "transformers", "vllm")


def add_generation_arguments(parser, batch_size: int, batch_help: str) -> None:
    """The generation options every offline command shares (``--backend``, ``--batch-size``, ``--chat``, ``--seed``),
    as :class:`Generator` takes them; ``batch_size`` is the command's default."""
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="auto",
        help="auto: vLLM when importable and a GPU is present (never for tiny_demo), else transformers; vllm: also on "
        "vLLM's CPU build",
    )
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    parser.add_argument("--chat", action="store_true", help="send string prompts as a user chat message")
    parser.add_argument("--seed", type=int, default=0)


class Generator:
    """``sample(prompts, n) -> [[(text, token_ids), ...n], ...]``: vLLM when usable, else ``transformers``.

    ``temperature`` 0 decodes greedily. A sample that stopped by itself ends with EOS; one cut at ``max_new_tokens``
    does not.
    """

    def __init__(
        self, model: str, backend: str, temperature: float, max_new_tokens: int, batch_size: int, chat: bool, seed: int
    ):
        import torch

        self.temperature, self.max_new_tokens, self.batch_size = temperature, max_new_tokens, batch_size
        self.chat, self.seed = chat, seed
        use_vllm = backend == "vllm" or (backend == "auto" and model != DEMO_MODEL and _vllm_usable())
        if use_vllm:
            from vllm import LLM

            from k15_plugin.data.arithmetic import DEMO_CHECKPOINT_DIR
            from k15_plugin.trl.vllm_cpu import run_vllm_cpu_eagerly

            if run_vllm_cpu_eagerly():
                # vLLM's CPU build: the engine core in this process, so the eager switch reaches it and a script that
                # calls the command without a __main__ guard does not fail spawning it
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            self.llm = LLM(model=str(DEMO_CHECKPOINT_DIR) if model == DEMO_MODEL else model, seed=seed)
            self.tokenizer = self.llm.get_tokenizer()
        elif model == DEMO_MODEL:
            from k15_plugin.data.arithmetic import load_demo_checkpoint

            self.model, self.tokenizer = load_demo_checkpoint()
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model)
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
            if torch.cuda.is_available():
                self.model.to("cuda")
        self.backend = "vllm" if use_vllm else "transformers"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.backend == "transformers":
            self.model.eval()

    def _text(self, prompt: Any) -> str:
        if isinstance(prompt, list) or self.chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    def sample(self, prompts: Sequence[Any], n: int, seed: int) -> list[list[tuple[str, list[int]]]]:
        """``n`` samples ``(text, token_ids)`` per prompt (a string, or chat messages), seeded with ``seed``."""
        texts = [self._text(p) for p in prompts]
        if self.backend == "vllm":
            return self._sample_vllm(texts, n, seed)
        return self._sample_transformers(texts, n, seed)

    def _sample_vllm(self, texts: list[str], n: int, seed: int) -> list[list[tuple[str, list[int]]]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=self.temperature, max_tokens=self.max_new_tokens, seed=seed)
        eos = self.tokenizer.eos_token_id
        out = []
        for request in self.llm.generate(texts, params, use_tqdm=False):
            samples = []
            for o in request.outputs:
                ids = list(o.token_ids)
                if o.finish_reason == "stop" and eos is not None and (not ids or ids[-1] != eos):
                    ids.append(eos)  # stopped by EOS: keep it, as TRL's completion_ids do
                samples.append((o.text, ids))
            out.append(samples)
        return out

    def _sample_transformers(self, texts: list[str], n: int, seed: int) -> list[list[tuple[str, list[int]]]]:
        import torch

        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        device = next(self.model.parameters()).device
        out: list[list[tuple[str, list[int]]]] = []
        per_call = max(1, self.batch_size // n)
        for start in range(0, len(texts), per_call):
            batch = tok(texts[start : start + per_call], return_tensors="pt", padding=True, padding_side="left")
            batch = {k: v.to(device) for k, v in batch.items()}
            torch.manual_seed(seed + start)  # the same prompts in the same chunks give the same samples
            # temperature 0: greedy decoding (every other option plain, whatever the generation config says)
            options = {"do_sample": True, "temperature": self.temperature, "top_p": 1.0, "top_k": 0}
            if self.temperature == 0:
                options = {"do_sample": False, "num_beams": 1}
            with torch.no_grad():
                generated = self.model.generate(
                    **batch,
                    **options,
                    repetition_penalty=1.0,
                    no_repeat_ngram_size=0,
                    max_new_tokens=self.max_new_tokens,
                    num_return_sequences=n,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=eos,
                )
            completions = generated[:, batch["input_ids"].shape[1] :].tolist()
            for i in range(len(completions) // n):
                samples = []
                for ids in completions[i * n : (i + 1) * n]:
                    if eos in ids:
                        ids = ids[: ids.index(eos) + 1]  # generate pads finished rows after EOS
                    samples.append((tok.decode(ids, skip_special_tokens=True), ids))
                out.append(samples)
        return out


def _vllm_usable() -> bool:
    try:
        import importlib.util

        import torch

        return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def console_main(prog: str, run: Callable[[Sequence[str] | None], dict], argv: Sequence[str] | None = None) -> None:
    """A resumable command's console entry point: ``run(argv)``'s summary printed as one JSON line. A
    :class:`~k15_plugin.errors.K15Error` (the user-facing errors: each command raises its own subclass) is one line
    on stderr and exit code 2, an interruption exit code 130, and a run stopped early (``complete`` false)
    :data:`EXIT_INCOMPLETE`."""
    try:
        summary = run(argv)
    except K15Error as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    print(json.dumps(summary, default=str))
    if summary.get("complete") is False:
        print(f"{prog}: stopped early (--stop-after); rerun the same command to continue", file=sys.stderr)
        sys.exit(EXIT_INCOMPLETE)
