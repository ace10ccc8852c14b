"""metrics.jsonl and summary.json, written by rank 0 only.

metrics.jsonl: one JSON object per line, each appended with a single write() and fsync'ed,
so a crash leaves at most a torn last line (ignored when read back). On resume the file is
rewritten atomically without the records past the checkpoint's step, so a resumed run's log
reads as if it had never stopped.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from distcls.runtime.atomic_files import atomic_write_text
from distcls.tracking.json_out import dumps

REQUIRED = ("epoch", "step", "split", "loss", "acc", "lr", "images_per_sec", "time")

# The other evaluation targets' numbers (run.components.EvalTarget: the model EMA, ...): a val/test
# record carries <prefix>loss, <prefix>acc and the target's own fields (<prefix>updates: 0 while
# it has nothing to evaluate); summary.json <prefix>test_acc. A prefix is one lowercase word and "_".
TARGET_PREFIX = r"[a-z][a-z0-9]*_"
_RECORD_KEY = re.compile(rf"({TARGET_PREFIX})(?:acc|updates)")
_SUMMARY_KEY = re.compile(rf"({TARGET_PREFIX})test_acc")


def other_targets(record: dict, summary: bool = False) -> list[str]:
    """The prefixes of the other evaluation targets in a val/test record (or summary.json), in its order."""
    pattern = _SUMMARY_KEY if summary else _RECORD_KEY
    return list(dict.fromkeys(m.group(1) for key in record if (m := pattern.fullmatch(key))))


def target_name(prefix: str) -> str:
    """A target's name in tables and legends: "EMA" for "ema_"."""
    return prefix.rstrip("_").upper()


def metric_record(split: str, epoch: int, step: int, loss: float, acc: float, lr: float, images_per_sec: float = 0.0,
                  **extra) -> dict:
    """One record of metrics.jsonl. `extra`: `epoch_step` (a log.every_steps train record),
    `skipped_steps` (an epoch's train record), `count` (val/test)."""
    return {"epoch": epoch, "step": step, "split": split, "loss": loss, "acc": acc, "lr": lr,
            "images_per_sec": images_per_sec, **extra, "time": time.time()}


_INTEGERS = ("epoch", "step", "epoch_step", "skipped_steps", "count")
_NUMBERS = ("loss", "acc", "lr", "images_per_sec", "time")


def is_record(r) -> bool:
    """A line distcls could have written: an object with a split, integer epoch/step and numbers
    (or null) where numbers belong. Anything else (a list, a text loss, a hand-added note) is
    skipped when the file is read, like a torn last line."""
    if not isinstance(r, dict) or r.get("split") not in ("train", "val", "test"):
        return False
    if any(not isinstance(r.get(k, 0), int) or isinstance(r.get(k), bool) for k in _INTEGERS) or "step" not in r:
        return False
    return all(r.get(k) is None or isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for k in _NUMBERS)


def read_jsonl(path) -> list[dict]:
    """metrics.jsonl's records, without the lines that are not records (see is_record); a line
    that is not JSON (the torn last line of a crash) is skipped too."""
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError: the torn last line of a crash; also an
            continue  # integer of over 4,300 digits (ValueError) and a line nested past Python's recursion limit
        if is_record(r):
            records.append(r)
    return records


class MetricsLog:
    def __init__(self, out_dir, enabled: bool):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Keep only records up to global step `step` (resume); a fresh run passes -1."""
        if not self.enabled:
            return
        # a test record comes after the final checkpoint: a resumed run writes it again
        kept = (
            [r for r in read_jsonl(self.path) if r.get("step", 0) <= step and r.get("split") != "test"]
            if step >= 0
            else []
        )
        atomic_write_text(self.path, "".join(dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        missing = [k for k in REQUIRED if k not in record]
        assert not missing, f"metrics record lacks {missing}"
        line = (dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def write_summary(out_dir, summary: dict) -> None:
    atomic_write_text(Path(out_dir) / "summary.json", dumps(summary, indent=2) + "\n")
