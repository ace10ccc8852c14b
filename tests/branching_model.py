"""A plug-in model (model.name=branching_model:build) with data-dependent control flow: which layer
runs depends on the input's values, which torch.export and the ONNX exporter cannot capture."""
import torch.nn as nn


class Branching(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.a = nn.Sequential(nn.Flatten(), nn.Linear(spec.channels * spec.image_size ** 2, spec.num_classes))
        self.b = nn.Sequential(nn.Flatten(), nn.Linear(spec.channels * spec.image_size ** 2, spec.num_classes))

    def forward(self, x):
        if x.mean() > 0:  # decided by the data, at run time
            return self.a(x)
        return self.b(x)


def build(spec, cfg):
    return Branching(spec)
