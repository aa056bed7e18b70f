"""The command line's entry point: ``mrprune.cli`` pulls in torch and transformers, seconds of imports during
which Ctrl-C must still end in the one-line message, not a traceback."""

from __future__ import annotations

import sys


def run() -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("mrprune: interrupted by SIGINT while starting; no output was written", file=sys.stderr)
        return 130
    return main()
