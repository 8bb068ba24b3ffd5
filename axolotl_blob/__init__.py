"""axolotl_blob: Bayesian LoRA (BLoB), IVON and calibration evaluation for Axolotl.

The names below are loaded on first use (PEP 562), so ``from axolotl_blob import IVON`` or
``import axolotl_blob.blob.layer`` needs torch and PEFT only; Axolotl is imported when the plugin is.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from axolotl_blob.ivon import IVON
    from axolotl_blob.plugin import BlobPlugin

_HOME = {"IVON": "axolotl_blob.ivon", "BlobPlugin": "axolotl_blob.plugin"}

__all__ = ["IVON", "BlobPlugin"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
