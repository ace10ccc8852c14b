"""A plug-in model (model.name=recipe_model:build) for the recipe tests: global average pooling
(so training and evaluation sizes may differ, as FixRes needs), no BatchNorm (so world-size
invariance holds on CPU without SyncBatchNorm), and optionally a SIGTERM to its own process on a
chosen training forward (a deterministic preemption, as stop_model.py)."""
import os
import signal

import torch.nn as nn


class PooledNet(nn.Module):
    def __init__(self, spec, stop_at: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(spec.channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, spec.num_classes),
        )
        self.stop_at, self.calls = stop_at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
        return self.net(x)


def build(spec, cfg, stop_at: int = 0):
    return PooledNet(spec, stop_at)
