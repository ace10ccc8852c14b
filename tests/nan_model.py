"""A plug-in model (model.name=nan_model:build) whose loss turns NaN on chosen training steps."""
import os

import torch
import torch.nn as nn


class NaNOnStep(nn.Module):
    def __init__(self, spec, nan_steps, nan_rank):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(spec.channels * spec.image_size ** 2, spec.num_classes))
        self.nan_steps, self.nan_rank = set(nan_steps), nan_rank
        self.calls = 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls in self.nan_steps and int(os.environ.get("RANK", "0")) == self.nan_rank:
                out = out * torch.tensor(float("nan"))
        return out


def build(spec, cfg, nan_steps=(3,), nan_rank=0):
    return NaNOnStep(spec, nan_steps, nan_rank)
