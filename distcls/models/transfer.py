"""Transfer learning (seed D): start from a local weights file, optionally freeze the backbone.

"Fixed feature extraction": every layer but the classifier head stops learning, and its
BatchNorm layers become FrozenBatchNorm2d (statistics fixed too). The head is the last
nn.Linear of the network (torchvision's `fc`, or the seed nets' final layer).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from distcls.errors import UserError
from distcls.io import load_weights_only


def classifier_head(model: nn.Module) -> str:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError("model.freeze_backbone needs a model whose classifier head is an nn.Linear layer")
    return names[-1]


def load_pretrained(model: nn.Module, path: str) -> list[str]:
    """Load matching tensors from `path`; returns the keys left at their fresh init (e.g. a new head)."""
    state = load_weights_only(path, what="model.pretrained")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a distcls checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.pretrained={path} is not a state_dict (a mapping of names to tensors)")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not any(k in usable for k in own if not k.endswith("num_batches_tracked")):
        raise UserError(f"model.pretrained={path} shares no tensor of matching name and shape with the model; is it weights for this model.name?")
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in own if k not in usable)


def freeze_backbone(model: nn.Module) -> nn.Module:
    head = classifier_head(model)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(head + ".")
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
