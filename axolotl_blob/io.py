"""Files written whole: every file the plugin writes is written to a temporary name in its own directory and
renamed into place, so a process killed mid-write leaves the previous file (or none), never a truncated one.

`os.replace` within one directory is atomic on POSIX and Windows. JSON is strict (RFC 8259): a non-finite number
is refused here, at the writer, so `jq`, JavaScript and dashboards can always read what we write.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def replaced_whole(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it is flushed to disk and renamed onto `path`,
    on failure removed. The temporary name keeps the suffix, so writers that infer a format from it still work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())  # the rename must not reach the disk before the data does
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with replaced_whole(path) as temporary:
        temporary.write_text(text)


def non_finite_as_null(payload):
    """`payload` with every NaN / ±Infinity float replaced by None, for reports where a statistic can be undefined
    (an empty confidence bin has no accuracy): JSON's `null`."""
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {key: non_finite_as_null(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [non_finite_as_null(value) for value in payload]
    return payload


def write_json(path: str | Path, payload) -> None:
    """Indented strict JSON; NaN or ±Infinity anywhere in `payload` is a ValueError naming the file."""
    try:
        text = json.dumps(payload, indent=2, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"{path}: refusing to write a non-finite number, which is not JSON ({error})") from error
    write_text(path, text + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, written whole."""
    from safetensors.torch import save_file

    with replaced_whole(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
