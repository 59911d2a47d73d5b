"""The command line: `blocklora SUBCOMMAND` (main.py: parsers and subcommands; flags.py: options generated from the
config dataclasses; signals.py: Ctrl-C and SIGTERM as one line and an exit status). Nothing here imports torch
before a subcommand needs it."""

from __future__ import annotations

from .main import main

__all__ = ["main"]
