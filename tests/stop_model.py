"""A plug-in model (model.name=stop_model:build) that sends its own process SIGTERM on a chosen
training step, or in a chosen evaluation forward: a deterministic preemption for in-process tests."""
import os
import signal

import torch.nn as nn


class StopOnStep(nn.Module):
    def __init__(self, spec, stop_at: int, stop_at_eval: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(spec.channels * spec.image_size ** 2, spec.num_classes))
        self.stop_at, self.stop_at_eval, self.calls, self.eval_calls = stop_at, stop_at_eval, 0, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption would
        else:
            self.eval_calls += 1  # 1: distcls's check of the model's forward; 2: the first validation batch
            if self.eval_calls == self.stop_at_eval:
                os.kill(os.getpid(), signal.SIGTERM)
        return self.net(x)


def build(spec, cfg, stop_at: int = 0, stop_at_eval: int = 0):
    return StopOnStep(spec, stop_at, stop_at_eval)
