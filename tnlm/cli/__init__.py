"""Command-line interface: ``tnlm <command> [MODEL_DIR] ...``.

Commands default to the embedded MiniLM when MODEL_DIR is omitted. User
mistakes print one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tnlm.cli.common import HealingDiverged, UserError
from tnlm.cli.parser import COMMANDS, HEAL_TRAIN_CHOICES, HEAL_TRAIN_RENAMED, build_parser

__all__ = ["main", "build_parser", "COMMANDS", "HEAL_TRAIN_CHOICES", "HEAL_TRAIN_RENAMED"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["compress", *argv]  # the main job: compress the default model
    elif argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        if Path(argv[0]).exists():
            argv = ["compress", *argv]  # ``tnlm MODEL_DIR ...`` compresses that model
        else:
            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            print(f"tnlm: error: {argv[0]!r} is neither a command {COMMANDS} nor an existing "
                  f"model folder{hint}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    error = _error_prefix()
    try:
        return args.func(args)
    except (UserError, OSError, ValueError, KeyError, TypeError) as err:
        print(f"{error}{err}", file=sys.stderr)
        return 2
    except HealingDiverged as err:
        print(f"{error}{err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tnlm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; the traceback on request
        if os.environ.get("TNLM_DEBUG"):
            raise
        from tnlm.compress.distributed import RankFailure

        if isinstance(err, RankFailure):  # its message names the rank and the step
            print(f"tnlm: error: {err}", file=sys.stderr)
            return 1
        print(f"{error}{type(err).__name__}: {err} (TNLM_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


def _error_prefix() -> str:
    """``"tnlm: error: "``; in one of several processes (torchrun) it names the rank."""
    rank, size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if size not in ("", "1", "0"):
        return f"tnlm: error (rank {rank} of {size}): "
    return "tnlm: error: "
