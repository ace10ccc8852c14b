"""Transfer learning (seed D): start from pretrained weights, train all of it or only a new head.

`model.freeze=backbone` ("fixed feature extraction"): every layer but the classifier head stops
learning, and its BatchNorm layers become FrozenBatchNorm2d (statistics fixed too).
`model.freeze=none` with `optim.backbone_lr_scale` < 1: fine-tuning, the backbone at a lower lr.
The head is the last nn.Linear of the network (torchvision's `fc`, `classifier.3` of MobileNetV3,
`heads.head` of ViT, or the seed nets' final layer); a network without one (SqueezeNet) has its
last 1x1 nn.Conv2d as head.

Loading says what it did: tensors loaded, tensors left at init (the new head), tensors of the
file the model does not have; a same-name tensor of another shape outside the head is an error,
never a silent skip (inside the head it is expected: another number of classes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from distcls.errors import UserError
from distcls.runtime.atomic_files import load_weights_only


def classifier_head(model: nn.Module) -> str:
    """The name of the classifier head: the last nn.Linear, else the last 1x1 nn.Conv2d."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = names or [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    if not names:
        raise UserError(
            "model.freeze=backbone and optim.backbone_lr_scale need a model whose classifier head is an nn.Linear (or "
            "1x1 nn.Conv2d) layer"
        )
    return names[-1]


def head_outputs(model: nn.Module, head: str) -> int:
    layer = model.get_submodule(head)
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def is_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


@dataclass
class LoadReport:
    source: str
    loaded: list = field(default_factory=list)  # model tensors taken from the file
    left_at_init: list = field(default_factory=list)  # model tensors not in the file, or the head with another shape
    unused: list = field(default_factory=list)  # file tensors the model does not have

    def summary(self) -> str:
        init = (
            f": {', '.join(self.left_at_init[:6])}{' ...' if len(self.left_at_init) > 6 else ''}"
            if self.left_at_init
            else ""
        )
        unused = f"; {len(self.unused)} tensors of the file unused (e.g. {self.unused[0]})" if self.unused else ""
        return (
            f"pretrained {self.source}: loaded {len(self.loaded)} tensors, "
            f"{len(self.left_at_init)} left at init{init}{unused}"
        )


def load_pretrained(model: nn.Module, path, source: str | None = None) -> LoadReport:
    """Load the file's tensors into `model` by name; shape mismatches outside the head are an error."""
    source = source or str(path)
    state = load_weights_only(path, what="model.pretrained")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a distcls checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.pretrained={source} is not a state_dict (a mapping of names to tensors)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    head = classifier_head(model)
    report = LoadReport(source)
    for name, tensor in own.items():
        if name not in state:
            report.left_at_init.append(name)
        elif state[name].shape == tensor.shape:
            report.loaded.append(name)
        elif is_head(name, head):
            report.left_at_init.append(name)  # a new head: another number of classes
        else:
            raise UserError(
                f"model.pretrained={source}: tensor {name} has shape {tuple(state[name].shape)} in the file but "
                f"{tuple(tensor.shape)} in model; the weights are for another architecture or model.args/cifar_stem "
                "setting"
            )
    report.unused = sorted(k for k in state if k not in own)
    if not [k for k in report.loaded if not k.endswith("num_batches_tracked")]:
        raise UserError(
            f"model.pretrained={source} shares no tensor of matching name and shape with the model; is it weights for "
            "this model.name?"
        )
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report


def freeze_backbone(model: nn.Module) -> nn.Module:
    head = classifier_head(model)
    for name, p in model.named_parameters():
        p.requires_grad = is_head(name, head)
    return _freeze_batchnorm(model, head)


def _freeze_batchnorm(module: nn.Module, head: str, prefix: str = "") -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d  # lazily: torchvision.ops imports torch._dynamo (~1 s)

    for name, child in module.named_children():
        full = prefix + name
        if isinstance(child, nn.BatchNorm2d) and not full.startswith(head):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child, head, full + ".")
    return module
