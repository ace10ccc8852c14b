"""Tracking: console output, metrics.jsonl / summary.json, wandb, plots (rank 0 writes)."""
from distcls.tracking.console import Console, summary_rows
from distcls.tracking.metrics import MetricsLog, metric_record, read_jsonl, write_summary
from distcls.tracking.wandb_logger import WandbLogger

__all__ = ["Console", "MetricsLog", "metric_record", "WandbLogger", "read_jsonl", "summary_rows", "write_summary"]
