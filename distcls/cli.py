"""What every distcls command shares: argument errors as one line, exit codes, tracebacks.

A `UserError` anywhere -> `distcls: error: <message>` on stderr and exit 2 (no traceback).
A run stopped by a signal returns exit 3 itself; divergence -> exit 4; a closed stdout pipe (`| head`)
-> exit 141 without a word, as `cat` ends; anything else -> the real traceback, exit 1.

Under a launcher (torchrun, srun) every rank usually meets the same error, but one line must reach
the user whichever rank fails first. Rank 0 reports at once and exits; any other rank waits up to
PEER_REPORT_GRACE_S before it reports and exits itself. When rank 0 exits first, the launcher
(torchrun's agent, srun --kill-on-bad-exit) ends the waiting ranks, so only rank 0's line is
printed; an error that only a non-zero rank meets still gets that rank's line after the wait.
Exiting at once on rank 1 (the old way) let the launcher kill rank 0 before it had printed.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from typing import Callable, Sequence

from distcls.errors import ExitCode, OutputWriteFailed, SecondInterrupt, TrainingDiverged, UserError


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


# How long a non-zero rank leaves rank 0 to report an error that every rank meets (seconds).
PEER_REPORT_GRACE_S = 20.0


def _env_int(*names: str, default: int) -> int:
    """The first of `names` set to a non-negative integer (torchrun's before srun's), else `default`."""
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def _rank() -> int:
    return _env_int("RANK", "SLURM_PROCID", default=0)


def _world_size() -> int:
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def leave_rank_0_time_to_report() -> None:
    """On a non-zero rank of a multi-process launch: wait (bounded) so that rank 0 reports the shared
    error first and the launcher ends this rank; the default signal actions apply while waiting,
    so the launcher's SIGTERM ends it at once even if a stop handler was still installed."""
    if _rank() == 0 or _world_size() < 2:
        return
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except ValueError:  # not the main thread: nothing was installed here either
                pass
    time.sleep(PEER_REPORT_GRACE_S)


def report(prefix: str, message: str) -> None:
    """`distcls: <prefix>: [rank N] <message>` on stderr, one line."""
    rank = _rank()
    tag = f"[rank {rank}] " if rank else ""
    print(f"distcls: {prefix}: {tag}{' '.join(str(message).split())}", file=sys.stderr, flush=True)


def run_cli(
    main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None, debug_flag: str = "--debug"
) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(args) or ExitCode.OK
    except OutputWriteFailed as exc:  # a full disk, quota or I/O error: its own exit code
        leave_rank_0_time_to_report()
        report("error", exc)
        return ExitCode.WRITE_FAILED
    except UserError as exc:  # ConfigError included
        if debug_flag in args:
            traceback.print_exc()
        leave_rank_0_time_to_report()
        report("error", exc)
        return ExitCode.USAGE
    except TrainingDiverged as exc:  # every rank agreed on it: rank 0 reports it
        leave_rank_0_time_to_report()
        report("error", exc)
        return ExitCode.DIVERGED
    except SecondInterrupt:
        report(
            "stopped",
            "interrupted (second Ctrl-C) before a checkpoint could be saved; the previous checkpoint, if any, "
            "is intact: resume with --resume auto",
        )
        return 130
    # a first Ctrl-C before the run caught signals: while starting up or waiting for the other ranks
    except KeyboardInterrupt:
        report("stopped", "interrupted (Ctrl-C) while starting up, before training began; nothing was written")
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket broke: a real failure, with its traceback
        _quiet_stdout()  # stdout's reader left (`... --json | head -1`): end quietly, as `cat` does
        return ExitCode.CLOSED_PIPE


def _stdout_reader_gone() -> bool:
    """stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    import select
    import stat
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of the closed pipe says nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout has no descriptor (replaced in-process)
        pass


def exit_with(main: Callable[[Sequence[str]], int]) -> None:
    sys.exit(run_cli(main))
