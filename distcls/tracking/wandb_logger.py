"""Weights & Biases from rank 0 (log.wandb.enabled=true); every wandb file stays inside run.out_dir.

- The mode: `WANDB_MODE` (or `WANDB_DISABLED=true`) in the environment wins over log.wandb.mode,
  as in every wandb tool; `disabled` starts nothing and writes nothing.
- Online without an API key (no `WANDB_API_KEY`, no netrc entry): one warning, then offline, so
  a batch job never waits at an interactive login prompt. `wandb sync <out_dir>/wandb/offline-run-*`
  uploads later.
- wandb's run, cache, config, data and artifact folders are pointed into `<out_dir>/wandb/`
  unless the user set those variables.
- The run id is kept in every checkpoint; a resumed run (--resume, torchrun restart, SLURM requeue)
  continues the SAME wandb run (offline: one `offline-run-*` folder per process start, same id,
  steps continuing; `wandb sync` joins them).
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Callable, Mapping, Optional
from urllib.parse import urlparse

from distcls.errors import UserError

# environment variable -> sub-folder of <out_dir>/wandb
WANDB_DIRS = {
    "WANDB_CACHE_DIR": "cache",
    "WANDB_CONFIG_DIR": "config",
    "WANDB_DATA_DIR": "data",
    "WANDB_ARTIFACT_DIR": "artifacts",
}
_MODES = {"online": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def has_api_key(environ: Mapping[str, str]) -> bool:
    """A wandb API key is available without asking: WANDB_API_KEY, or a netrc entry for the wandb host."""
    if environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(configured: str, environ: Mapping[str, str]) -> tuple[str, Optional[str]]:
    """(mode to use, warning to print or None)."""
    if environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled", None
    mode = _MODES.get(environ.get("WANDB_MODE", "").strip().lower(), configured)
    if mode == "online" and not has_api_key(environ):
        return "offline", ("wandb has no API key (set WANDB_API_KEY or run `wandb login`); logging offline instead, "
                           "upload later with `wandb sync <run.out_dir>/wandb/offline-run-*`")
    return mode, None


class WandbLogger:
    def __init__(self, cfg, out_dir: str, run_config: dict, enabled: bool, resume_id: str | None = None,
                 warn: Callable[[str], None] = print, info: Callable[[str], None] = print):
        self.run = None
        self.warn = warn
        self._set_env: list = []  # the variables set here, removed again when the run closes
        if not (enabled and cfg.enabled):
            return
        mode, warning = resolve_mode(cfg.mode, os.environ)
        if mode == "disabled":
            return
        if warning:
            warn(warning)
        try:
            import wandb
        except ImportError:
            raise UserError(
                "log.wandb.enabled=true but wandb is not installed; pip install wandb, or set log.wandb.enabled=false"
            ) from None
        root = Path(out_dir) / "wandb"
        for var, sub in WANDB_DIRS.items():
            if not os.environ.get(var):
                os.environ[var] = str(root / sub)
                self._set_env.append(var)
        root.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(mode=mode, disable_git=True, save_code=False, silent=True, x_disable_stats=True)
        try:
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, dir=out_dir, config=run_config,
                                  name=cfg.name, tags=list(cfg.tags) or None, group=cfg.group, notes=cfg.notes,
                                  id=resume_id, resume="allow" if resume_id else None, settings=settings)
        except Exception as exc:  # network, auth or server trouble must not stop training
            warn(
                f"wandb could not start ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); training continues "
                "without wandb"
            )
            self._close(None)
            return
        try:
            info(self._where(mode))
        except Exception:  # (a wandb attribute missing in some version: not worth stopping training for)
            pass

    def _where(self, mode: str) -> str:
        """One console line: where the run is (its page), or how to upload an offline run."""
        if mode == "offline":
            return (f"wandb: offline run {self.run.id} in {Path(self.run.dir).parent}; upload it with "
                    f"`wandb sync {Path(self.run.dir).parent}`")
        return f"wandb: {getattr(self.run, 'url', None) or self.run.path}"

    @property
    def run_id(self):
        return self.run.id if self.run is not None else None

    def log(self, record: dict) -> None:
        if self.run is not None:
            split = record["split"]
            self.run.log(
                {
                    f"{split}/{k}": v
                    for k, v in record.items()
                    if isinstance(v, (int, float)) and k not in ("step", "epoch", "time")
                }
                | {"epoch": record["epoch"]},
                step=record["step"],
            )

    def finish(self, summary: dict, step: Optional[int] = None, images: Optional[dict] = None) -> None:
        """Final test metrics and per-class accuracy into the run summary, the plots as images, then close."""
        if self.run is None:
            return
        import wandb
        if images:
            self.run.log({f"plots/{name}": wandb.Image(str(path)) for name, path in images.items()}, step=step)
        flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        flat.update(
            {f"per_class_test_acc/{name}": acc for name, acc in (summary.get("per_class_test_acc") or {}).items()}
        )
        self.run.summary.update(flat)
        self._close(0)

    def stop(self, preempted: bool) -> None:
        """The run ends early (a stop signal, an error): close the wandb run so a resume continues it."""
        if self.run is not None:
            if preempted:
                self.run.mark_preempting()
            self._close(3 if preempted else 1)

    def _close(self, exit_code: Optional[int]) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
        for var in self._set_env:
            os.environ.pop(var, None)
        self._set_env.clear()
