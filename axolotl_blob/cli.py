"""What the post-hoc commands (predict, evaluate, bayesianize) share: stdout carries their results and nothing else,
and `--help` gives every option's default."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default: argparse's ``(default: X)``, or the help's own words where the
    default is not a value (it depends on the config or the input, and the help says how)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: {'off' if action.default is False else '%(default)s'})"


@contextlib.contextmanager
def results_only_stdout() -> Iterator[TextIO]:
    """Yields stdout for the results; whatever else prints meanwhile (a library's log, a progress bar) goes to
    stderr, so `command > results.jsonl` holds results only."""
    results = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield results
