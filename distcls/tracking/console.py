"""What a person sees: rank 0 prints progress; other ranks print only warnings and errors.

On a terminal (log.console=auto, or rich) a progress bar per epoch carries the running train loss
and accuracy, the learning rate, images/s and the epoch's ETA; each epoch ends with one line
(train/val loss and accuracy, epoch time, images/s, best so far) and the run with a summary table.
In CI or a log file (log.console=plain, or auto without a terminal) every line is plain text with a
timestamp and no control characters, so it greps well.

The bar shows values the training loop has already read to the host (the running sums it keeps
for logging), so drawing it adds no host-device synchronization.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from distcls.tracking.metrics import other_targets, target_name


def epoch_line(epoch: int, epochs: int, train: dict, val: Optional[dict], seconds: float, best: Optional[float],
               is_best: bool = False) -> str:
    """One line per epoch, e.g.
    `epoch 3/15 train loss 0.41 acc 0.875 | val loss 0.30 acc 0.910 (best 0.910, new best) | 1.9 s, 950 img/s, lr 0.048`
    """
    text = f"epoch {epoch}/{epochs} train loss {train['loss']:.4f} acc {train['acc']:.4f}"
    if val is not None:
        text += f" | val loss {val['loss']:.4f} acc {val['acc']:.4f}"
        for prefix in other_targets(val):  # e.g. the model EMA: ", ema loss 0.31 acc 0.905"
            name = prefix.rstrip("_")
            if f"{prefix}acc" in val:
                text += f", {name} loss {val[f'{prefix}loss']:.4f} acc {val[f'{prefix}acc']:.4f}"
            elif val.get(f"{prefix}updates") == 0:
                text += f", {name} not updated yet" + (" (train.ema.every_steps)" if name.startswith("ema") else "")
        if best is not None:
            text += f" (best {best:.4f}{', new best' if is_best else ''})"
    return text + f" | {seconds:.1f} s, {train['images_per_sec']:.0f} img/s, lr {train['lr']:.3g}"


def summary_rows(summary: dict, out_dir, plots: dict) -> list:
    """The final table's rows from summary.json's fields."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    # best.pt follows val_<prefix>acc: "" the weights, "ema_" the model EMA
    followed = str(summary.get("best_metric") or "val_acc").removeprefix("val_").removesuffix("acc")
    best_val = num(summary.get("best_val_acc"), ".4f")
    rows = [
        ("test accuracy", f"{summary['test_acc']:.4f} ({summary['test_count']} images)"),
        ("best val accuracy" + (f" ({target_name(followed)})" if followed else ""), best_val),
        *[
            (f"{target_name(prefix)} test accuracy", num(summary[f"{prefix}test_acc"], ".4f"))
            for prefix in other_targets(summary, summary=True)
        ],
        ("epochs / steps", f"{summary['epochs_completed']} / {summary['global_step']}"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        (
            "train images/s",
            num(summary.get("train_images_per_sec"), ",.0f")
            + f" (world size {summary['world_size']}, global batch {summary['global_batch_size']})",
        ),
    ]
    if summary.get("skipped_steps"):
        rows.append(("skipped steps (non-finite loss)", str(summary["skipped_steps"])))
    rows.append(("outputs", f"{out_dir}/ (summary.json, metrics.jsonl, checkpoints/)"))
    if plots:
        rows.append(("plots", f"{out_dir}/plots/ ({', '.join(Path(p).name for p in plots.values())})"))
    return rows


class Console:
    def __init__(self, rank: int, mode: str = "auto"):
        self.rank = rank
        self.fancy = rank == 0 and (mode == "rich" or (mode == "auto" and sys.stdout.isatty()))
        self._progress = None
        self._task = None
        self._shown = None  # (loss, acc) on the bar
        if self.fancy:
            from rich.console import Console as RichConsole
            self._rich = RichConsole()

    def info(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.fancy:
            self._rich.print(msg, highlight=False, markup=False, soft_wrap=True)  # the terminal wraps, not rich
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def warn(self, msg: str) -> None:
        tag = f"[rank {self.rank}] " if self.rank else ""
        print(f"distcls: warning: {tag}{msg}", file=sys.stderr, flush=True)

    # ----------------------------------------------------------- progress bar (terminal only)

    def start_epoch(self, epoch: int, epochs: int, total_steps: int, done: int = 0, global_batch: int = 0) -> None:
        if not self.fancy:
            return
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        self._progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                                  TimeRemainingColumn(), console=self._rich, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=done, status="")
        self._batch, self._steps, self._t0, self._shown = global_batch, 0, time.perf_counter(), None

    def advance(self, loss_sum=0.0, correct=0.0, count=0.0, lr=None) -> None:
        """One optimizer step done. The running sums are shown only when they are host numbers the
        loop already read; a device tensor would cost a sync per step, so then the bar shows the
        last `log.every_steps` record instead (see `logged`)."""
        if self._progress is None:
            return
        self._steps += 1
        rate = self._steps * self._batch / max(time.perf_counter() - self._t0, 1e-9)
        if all(isinstance(v, (int, float)) for v in (loss_sum, correct, count)) and count:
            self._shown = (loss_sum / count, correct / count)
        status = ""
        if self._shown is not None:
            status = f"loss {self._shown[0]:.4f} acc {self._shown[1]:.3f}"
        if isinstance(lr, (int, float)):
            status += f" lr {lr:.3g}"
        self._progress.update(self._task, advance=1, status=f"{status} {rate:,.0f} img/s".strip())

    def logged(self, record: dict) -> None:
        """A `log.every_steps` record (already reduced and read for metrics.jsonl): the bar's fallback."""
        self._shown = (record["loss"], record["acc"])

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # ----------------------------------------------------------- epoch lines and the final table

    def epoch_end(
        self,
        epoch: int,
        epochs: int,
        train: dict,
        val: Optional[dict],
        seconds: float,
        best: Optional[float],
        is_best: bool = False,
    ) -> None:
        self.info(epoch_line(epoch, epochs, train, val, seconds, best, is_best))

    def summary(self, rows: Sequence[tuple[str, str]]) -> None:
        """The run's final numbers: a table on a terminal, `summary: <name>: <value>` lines otherwise."""
        if self.rank != 0:
            return
        if not self.fancy:
            for name, value in rows:
                self.info(f"summary: {name}: {value}")
            return
        from rich.table import Table
        table = Table(title="distcls run summary", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for name, value in rows:
            table.add_row(name, value)
        self._rich.print(table)
