"""What every distcls command shares: argument errors as one line, exit codes, tracebacks.

A `UserError` anywhere -> `distcls: error: <message>` on stderr and exit 2 (no traceback).
A `ConfigError` is printed by rank 0 only (every rank sees the same one).
A run stopped by a signal returns exit 3 itself; divergence -> exit 4; anything else -> the real traceback, exit 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Sequence

from distcls.errors import ConfigError, ExitCode, TrainingDiverged, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors (one line, exit 2) instead of usage dumps.

    Options and positionals (key.sub=value overrides, image paths) may come in any order.
    """

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")

    def parse_args(self, args=None, namespace=None):
        if any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._get_positional_actions()):
            return super().parse_args(args, namespace)  # sub-commands (bench MODE): argparse cannot intermix those
        return self.parse_intermixed_args(args, namespace)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _rank() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def report(prefix: str, message: str) -> None:
    """`distcls: <prefix>: [rank N] <message>` on stderr, one line."""
    rank = _rank()
    tag = f"[rank {rank}] " if rank else ""
    print(f"distcls: {prefix}: {tag}{' '.join(str(message).split())}", file=sys.stderr, flush=True)


def run_cli(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None, debug_flag: str = "--debug") -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(args) or ExitCode.OK
    except ConfigError as exc:
        if _rank() == 0:
            report("error", exc)
        return ExitCode.USAGE
    except UserError as exc:
        if debug_flag in args:
            traceback.print_exc()
        report("error", exc)
        return ExitCode.USAGE
    except TrainingDiverged as exc:
        report("error", exc)
        return ExitCode.DIVERGED
    except KeyboardInterrupt:
        report("stopped", "interrupted (second Ctrl-C) before a checkpoint could be saved")
        return 130


def exit_with(main: Callable[[Sequence[str]], int]) -> None:
    sys.exit(run_cli(main))
