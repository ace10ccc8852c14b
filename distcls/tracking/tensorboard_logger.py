"""TensorBoard from rank 0 (log.tensorboard=true): every record of metrics.jsonl as scalars in
run.out_dir/tensorboard/ (`tensorboard --logdir runs/`), through torch's own SummaryWriter (it needs
the tensorboard package).

Tags: `train_step/<metric>` for the log.every_steps records, `train/`, `val/` and `test/` for the
epoch and evaluation records (`ema_acc` and the like beside them), at the record's global step.
A resumed run (--resume, torchrun restart, SLURM requeue) writes into the same folder with
`purge_step` = the checkpoint's step + 1: TensorBoard drops what the stopped process logged after
the checkpoint, so every step appears once, as in metrics.jsonl (a finished run that is extended
keeps its earlier final test point there too: metrics.jsonl keeps only the last).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from distcls.errors import UserError

SKIPPED = ("step", "epoch", "time", "epoch_step", "split")


def summary_writer_class():
    """torch's SummaryWriter, or the one-line error when the tensorboard package is missing (checked at launch, before
    anything is written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "log.tensorboard=true needs the tensorboard package: pip install 'distcls[tensorboard]' (or tensorboard), "
            "or set log.tensorboard=false"
        ) from None
    return SummaryWriter


class TensorBoardLogger:
    def __init__(self, out_dir, enabled: bool, resumed_step: Optional[int] = None):
        """`resumed_step`: the checkpoint's global step, or None for a fresh start (which drops whatever an
        earlier attempt that saved no checkpoint logged: purge_step 0, as metrics.jsonl is started anew)."""
        self.writer = None
        if not enabled:
            return
        self.writer = summary_writer_class()(log_dir=str(Path(out_dir) / "tensorboard"),
                                             purge_step=resumed_step + 1 if resumed_step is not None else 0)

    def log(self, record: dict) -> None:
        if self.writer is None:
            return
        group = "train_step" if record["split"] == "train" and "epoch_step" in record else record["split"]
        for key, value in record.items():
            if key not in SKIPPED and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{key}", value, record["step"])

    def finish(self, summary: dict, step: Optional[int] = None, images: Optional[dict] = None) -> None:
        """The per-class test accuracy as scalars at the last step, then close."""
        if self.writer is not None:
            for name, acc in (summary.get("per_class_test_acc") or {}).items():
                self.writer.add_scalar(f"per_class_test_acc/{name}", acc, step)
        self._close()

    def stop(self, preempted: bool) -> None:
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
