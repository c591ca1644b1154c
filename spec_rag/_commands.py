"""Running a parsed command the same way for ``spec-rag`` and ``python -m spec_rag.bench``."""

from __future__ import annotations

import argparse
import os
import sys

from spec_rag.errors import SpecRagError

__all__ = ["BENCH_HELP", "run_command"]

BENCH_HELP = "accuracy and speed benchmarks (RULER-style and RAG tasks)"


def run_command(args: argparse.Namespace, prog: str) -> int:
    """Run the parsed command: errors become one line on stderr (a traceback only with
    ``--debug``), Ctrl-C exits with 130."""
    if args.quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if args.debug:
            raise
        kind = "error" if isinstance(err, SpecRagError | OSError | ValueError) else type(err).__name__
        print(f"{prog}: {kind}: {err}", file=sys.stderr)
        return 1
