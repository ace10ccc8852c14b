"""A plug-in model (model.name=stop_model:build) that sends its own process a signal (SIGTERM, or
model.args.signal=SIGINT for a Ctrl-C) on a chosen training step, in a chosen evaluation forward, or
while the run builds it (model.args.at_build=true: during the setup): a deterministic preemption."""
import os
import signal
import signal as _signal

import torch.nn as nn


class StopOnStep(nn.Module):
    def __init__(self, spec, stop_at: int, stop_at_eval: int, sig=signal.SIGTERM):
        super().__init__()
        self.sig = sig
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(spec.channels * spec.image_size ** 2, spec.num_classes))
        self.stop_at, self.stop_at_eval, self.calls, self.eval_calls = stop_at, stop_at_eval, 0, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.stop_at:
                os.kill(os.getpid(), self.sig)  # as a scheduler's preemption would
        else:
            self.eval_calls += 1  # 1: distcls's check of the model's forward; 2: the first validation batch
            if self.eval_calls == self.stop_at_eval:
                os.kill(os.getpid(), self.sig)
        return self.net(x)


def build(spec, cfg, stop_at: int = 0, stop_at_eval: int = 0, signal: str = "SIGTERM", at_build: bool = False):
    sig = getattr(_signal, signal)
    if at_build:
        os.kill(os.getpid(), sig)  # the run is still in its setup (data built, model being built)
    return StopOnStep(spec, stop_at, stop_at_eval, sig)
