"""How the long2short commands write models: into ``<output>.partial/``, renamed into place when complete, with a
``long2short.json`` that records the job. A rerun of a finished job is a no-op; a different job over an existing
output is refused unless ``--overwrite``; an interrupted training resumes from its last checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from k15_plugin.long2short.data import Long2ShortError

PROVENANCE = "long2short.json"


def file_digest(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_digest(directory: Path) -> str:
    """sha256 over a saved model's weight files (safetensors or bin, sharded or not), in name order."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise Long2ShortError(f"{directory}: no weight files (*.safetensors or *.bin)")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


class ModelOutput:
    """The output directory of a model-producing command (see the module)."""

    def __init__(self, output: str | Path, job: dict[str, Any], overwrite: bool = False):
        self.path = Path(output)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.job = job
        self.done = False
        recorded = self.path / PROVENANCE
        if self.path.exists():
            previous = json.loads(recorded.read_text()).get("job") if recorded.is_file() else None
            if previous == job:
                self.done = True
            elif not overwrite:
                raise Long2ShortError(
                    f"--output {self.path} exists and holds "
                    f"{'another job' if previous else 'no long2short job'}: pass --overwrite to "
                    "replace it or choose another directory"
                )
        if not self.done and self.partial.exists():
            marker = self.partial / "job.json"
            if not marker.is_file() or json.loads(marker.read_text()) != job:
                shutil.rmtree(self.partial)  # an interrupted *different* job: nothing of it can be reused
        if not self.done:
            self.partial.mkdir(parents=True, exist_ok=True)
            (self.partial / "job.json").write_text(json.dumps(job, indent=1) + "\n")

    @property
    def staging(self) -> Path:
        """Where the finished model is written before the rename."""
        return self.partial / "model"

    def commit(self, stats: dict[str, Any]) -> None:
        """Record the job in the staged model and rename it into place (replacing an older output)."""
        (self.staging / PROVENANCE).write_text(json.dumps({"job": self.job, "stats": stats}, indent=1) + "\n")
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.staging, self.path)
        shutil.rmtree(self.partial, ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        """The ``stats`` recorded by :meth:`commit` in the finished output's ``long2short.json`` (``{}`` if none)."""
        return json.loads((self.path / PROVENANCE).read_text()).get("stats", {})
