"""Engine: optimizers, schedules and the train/eval steps (math only; no files)."""
from distcls.engine.optim import build_optimizer, build_scheduler, lr_factor
from distcls.engine.trainer import AMP_DTYPES, EvalResult, Meter, StepContext, Trainer, evaluate

__all__ = ["AMP_DTYPES", "EvalResult", "Meter", "StepContext", "Trainer", "evaluate", "build_optimizer", "build_scheduler", "lr_factor"]
