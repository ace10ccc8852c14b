"""Errors a user can fix, and the exit codes distcls documents.

A `UserError` means bad config, bad usage or missing data: the CLI prints ONE line
`distcls: error: <message>` and exits with code 2, never a traceback.
"""
from __future__ import annotations


class ExitCode:
    OK = 0
    CRASH = 1  # an unexpected failure: the real traceback is printed
    USAGE = 2  # bad config / bad usage / missing data or checkpoint
    PREEMPTED = 3  # SIGTERM/SIGUSR1/Ctrl-C: a resumable checkpoint was saved
    DIVERGED = 4  # non-finite loss with train.nonfinite=abort (or skipped steps above train.max_skipped_fraction)
    WRITE_FAILED = 5  # a checkpoint could not be written (disk full, I/O error); the previous one is intact
    CLOSED_PIPE = 141  # stdout's reader went away (`| head -1`): the shell's code for SIGPIPE, as `cat` gives


def first_line(exc: BaseException, default: str | None = None, limit: int = 200) -> str:
    """An exception's first message line for a one-line error (`default`, else its type name, if it has none)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if default is None else default
    return text.splitlines()[0][:limit]


MAX_MESSAGE = 2000  # characters of one error line: a huge value (e.g. from a YAML file) is cut in its middle


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """`message`, or its head and tail with the middle left out when it is longer than `limit`."""
    if len(message) <= limit:
        return message
    keep = (limit - 60) // 2
    return f"{message[:keep]} ... ({len(message) - 2 * keep:,} characters left out) ... {message[-keep:]}"


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it (at most
    MAX_MESSAGE characters: a longer one is cut in its middle, so the fix at its end stays)."""

    def __init__(self, message="", *args):
        super().__init__(bounded(message) if isinstance(message, str) else message, *args)


class ConfigError(UserError):
    """A config problem: every rank meets the same one (cli.run_cli makes rank 0 report it)."""


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C while the first one's stop was under way: interrupt at once."""


class TrainingDiverged(Exception):
    """The loss became non-finite and `train.nonfinite=abort` asked to stop."""


class OutputWriteFailed(UserError):
    """An output could not be written (disk full, quota, I/O error): one line naming the file and the
    disk, and the exit code ExitCode.WRITE_FAILED (not a user's mistake, not a crash)."""


class CheckpointWriteFailed(OutputWriteFailed):
    """A checkpoint save failed in the filesystem (disk full, quota, I/O error): the message names the
    file, the disk and what is still safe. `python -m distcls.train` exits with ExitCode.WRITE_FAILED."""
