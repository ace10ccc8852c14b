"""Engine: optimizers and schedules, precision, progress, and the train/eval steps (math only; no files)."""
from distcls.engine.ema import EMAHook, EMASchedule, ModelEMA, adjusted_decay
from distcls.engine.optim import build_optimizer, build_scheduler, lr_factor
from distcls.engine.precision import Precision, autocast
from distcls.engine.progress import Progress, RunningSums, Totals
from distcls.engine.trainer import EvalResult, Trainer, evaluate

__all__ = [
    "EMAHook", "EMASchedule", "ModelEMA", "adjusted_decay", "EvalResult", "Precision", "Progress", "RunningSums",
    "Totals", "Trainer", "autocast", "evaluate", "build_optimizer", "build_scheduler", "lr_factor",
]
