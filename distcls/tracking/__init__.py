"""Tracking: console output, metrics.jsonl / summary.json, wandb, TensorBoard, plots (rank 0 writes)."""
from distcls.tracking.console import Console, summary_rows
from distcls.tracking.metrics import MetricsLog, metric_record, read_jsonl, write_summary
from distcls.tracking.tensorboard_logger import TensorBoardLogger
from distcls.tracking.wandb_logger import WandbLogger

__all__ = [
    "Console", "MetricsLog", "metric_record", "TensorBoardLogger", "WandbLogger", "read_jsonl", "summary_rows",
    "write_summary",
]
