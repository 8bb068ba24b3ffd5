"""IVON: the optimizer (pure torch). The Hugging Face Trainer integration builds on it."""

from axolotl_blob.ivon.optimizer import IVON, ivon_update

__all__ = ["IVON", "ivon_update"]
