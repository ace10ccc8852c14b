"""What a person sees: rank 0 prints progress; other ranks print only warnings and errors.

On a terminal (log.console=auto) a rich progress bar shows the epoch; in CI or a log file
every line is plain text with a timestamp.
"""
from __future__ import annotations

import sys
import time
from typing import Optional


class Console:
    def __init__(self, rank: int, mode: str = "auto"):
        self.rank = rank
        self.fancy = rank == 0 and (mode == "rich" or (mode == "auto" and sys.stdout.isatty()))
        self._progress = None
        self._task = None
        if self.fancy:
            from rich.console import Console as RichConsole
            self._rich = RichConsole()

    def info(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.fancy:
            self._rich.print(msg, highlight=False, markup=False)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def warn(self, msg: str) -> None:
        tag = f"[rank {self.rank}] " if self.rank else ""
        print(f"distcls: warning: {tag}{msg}", file=sys.stderr, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total_steps: int, done: int = 0) -> None:
        if not self.fancy:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self._progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=self._rich, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=done, status="")

    def advance(self, status: Optional[str] = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, **({"status": status} if status else {}))

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
