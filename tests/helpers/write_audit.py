"""Test-only Axolotl plugin: which process writes which file. A Python audit hook records every file this process
opens for writing and every rename onto a path (the plugin writes each file to a temporary name and renames it
into place); at exit the list goes to `output_dir/writes-rank<RANK>.json`."""

import atexit
import json
import os
import sys
from pathlib import Path

from axolotl.integrations.base import BasePlugin

WRITE_MODES = ("w", "a", "x", "+")


def start_audit(log: Path) -> None:
    written: set[str] = set()

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and any(m in str(args[1] or "") for m in WRITE_MODES):
            written.add(os.path.abspath(args[0]))
        elif event == "os.rename" and isinstance(args[1], (str, os.PathLike)):
            written.add(os.path.abspath(args[1]))

    sys.addaudithook(hook)
    atexit.register(lambda: log.write_text(json.dumps(sorted(written))))


class WriteAuditPlugin(BasePlugin):
    def register(self, cfg):
        Path(cfg["output_dir"]).mkdir(parents=True, exist_ok=True)
        start_audit(Path(cfg["output_dir"]).resolve() / f"writes-rank{os.environ.get('RANK', '0')}.json")
