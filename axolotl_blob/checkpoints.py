"""Which checkpoint a run may resume from.

Axolotl's `auto_resume_from_checkpoints` resumes from the newest `checkpoint-N` directory in `output_dir`, whether
or not its writing finished. A checkpoint is *complete* when the Trainer's `trainer_state.json` — the last file the
HF Trainer writes into it, after the model, the posterior, the optimizer and the RNG states — is there, every file
the run's features need is there, and every JSON and safetensors file in it reads back. A process killed while
writing a checkpoint leaves it incomplete; resuming from it is refused with the previous complete checkpoint named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` directories of `output_dir`, oldest first (by N, as Axolotl and the HF Trainer sort them)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def resume_checkpoint(resume_from_checkpoint: str | None, auto_resume: bool, output_dir: str | Path) -> Path | None:
    """The checkpoint Axolotl will resume from (`axolotl.utils.train.determine_last_checkpoint`'s choice)."""
    if resume_from_checkpoint:
        return Path(resume_from_checkpoint)
    if auto_resume:
        found = checkpoints(output_dir)
        return found[-1] if found else None
    return None


def _unreadable(path: Path) -> str | None:
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as opened:
                opened.keys()
    except Exception as error:  # noqa: BLE001  (any failure to read back means the file is not whole)
        return f"{path.name} does not read back ({type(error).__name__}: {error})"
    return None


def incompleteness(checkpoint: Path, required: Iterable[str] = ()) -> str | None:
    """Why `checkpoint` is incomplete, or None when it is complete."""
    if not checkpoint.is_dir():
        return "it is not a directory"
    for name in (TRAINER_STATE_FILE, *required):
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    for path in sorted(checkpoint.iterdir()):
        if path.is_file() and not path.name.startswith("."):  # dot-files: our writers' temporaries
            problem = _unreadable(path)
            if problem:
                return problem
    return None


def check_resumable(checkpoint: Path, required: Iterable[str] = ()) -> None:
    """Raise a ValueError naming the previous complete checkpoint when `checkpoint` is incomplete."""
    required = tuple(required)
    problem = incompleteness(checkpoint, required)
    if problem is None:
        return
    earlier = [c for c in checkpoints(checkpoint.parent) if c.name != checkpoint.name and _before(c, checkpoint)]
    previous = next((c for c in reversed(earlier) if incompleteness(c, required) is None), None)
    message = f"cannot resume from {checkpoint}: the checkpoint is incomplete ({problem}); the process that wrote it probably stopped while saving. "
    if previous is None:
        message += f"No earlier complete checkpoint is in {checkpoint.parent}: delete {checkpoint} to start the run over."
    else:
        message += (
            f"The previous complete checkpoint is {previous}: delete {checkpoint} (auto_resume_from_checkpoints then "
            f"picks {previous.name}) or set 'resume_from_checkpoint: {previous}'."
        )
    raise ValueError(message)


def _before(candidate: Path, checkpoint: Path) -> bool:
    match = CHECKPOINT_NAME.fullmatch(checkpoint.name)
    return match is None or int(CHECKPOINT_NAME.fullmatch(candidate.name).group(1)) < int(match.group(1))
