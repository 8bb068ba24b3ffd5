"""axolotl_blob: Bayesian LoRA (BLoB), IVON and calibration evaluation for Axolotl."""

from axolotl_blob.ivon import IVON
from axolotl_blob.plugin import BlobPlugin

__all__ = ["IVON", "BlobPlugin"]
