"""A plug-in model (model.name=stop_model:build) that sends its own process SIGTERM on a chosen
training step: a deterministic mid-epoch preemption for in-process tests."""
import os
import signal

import torch.nn as nn


class StopOnStep(nn.Module):
    def __init__(self, spec, stop_at: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(spec.channels * spec.image_size ** 2, spec.num_classes))
        self.stop_at, self.calls = stop_at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption would
        return self.net(x)


def build(spec, cfg, stop_at: int = 0):
    return StopOnStep(spec, stop_at)
