"""Weights & Biases from rank 0 (log.wandb.enabled=true); files stay inside run.out_dir."""
from __future__ import annotations

import os

from distcls.errors import UserError


class WandbLogger:
    def __init__(self, cfg, out_dir: str, run_config: dict, enabled: bool, resume_id: str | None = None):
        self.run = None
        if not (enabled and cfg.enabled and cfg.mode != "disabled"):
            return
        try:
            import wandb
        except ImportError:
            raise UserError("log.wandb.enabled=true but wandb is not installed; pip install wandb, or set log.wandb.enabled=false") from None
        os.makedirs(os.path.join(out_dir, "wandb"), exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=out_dir, config=run_config,
                              id=resume_id, resume="allow" if resume_id else None)

    @property
    def run_id(self):
        return self.run.id if self.run is not None else None

    def log(self, record: dict) -> None:
        if self.run is not None:
            split = record["split"]
            self.run.log({f"{split}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
                         | {"epoch": record["epoch"]}, step=record["step"])

    def finish(self, summary: dict) -> None:
        if self.run is not None:
            self.run.summary.update(summary)
            self.run.finish()
