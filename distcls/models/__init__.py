"""Models: registry of the seed CNNs, torchvision ResNets, any torchvision classifier by name
(`torchvision:<name>`) and any timm model (`timm:<name>`, the optional extra), plus transfer learning."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from distcls.models import weights

from distcls.config import ModelConfig
from distcls.spec import DataSpec
from distcls.errors import ConfigError, UserError, first_line
from distcls.models import resnet, small_cnns, timm_zoo, torchvision_zoo  # noqa: F401  (register builders)
from distcls.models.registry import MODELS, register_model
from distcls.models.transfer import classifier_head, freeze_backbone, head_outputs, load_pretrained

__all__ = ["MODELS", "register_model", "build_model"]


def build_model(cfg: ModelConfig, spec: DataSpec, log: Callable[[str], None] = lambda msg: None) -> nn.Module:
    """The registered network for `spec`, with model.pretrained loaded (reported through `log`) and model.freeze
    applied."""
    try:
        model = MODELS.build(cfg.name, spec, cfg, kwargs=cfg.args, kwargs_key="model.args")
    except (ValueError, RuntimeError) as exc:
        if not cfg.args:
            raise  # a builder's own failure on its defaults: the real traceback
        raise UserError(
            f"model.name={cfg.name} cannot be built with model.args={cfg.args} ({first_line(exc)}); fix model.args"
        ) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.name={cfg.name}: the builder returned {type(model).__name__}, not an nn.Module")
    if cfg.pretrained == timm_zoo.PRETRAINED:  # timm's own weights: loaded by its builder, from the local cache
        if not cfg.name.startswith(timm_zoo.PREFIX):
            raise ConfigError(
                f"model.pretrained=timm loads timm's weights for a timm model; model.name={cfg.name} is not one "
                "(model.name=timm:<name>), or give a weights file: model.pretrained=PATH"
            )
        log(f"pretrained {cfg.name}: timm's weights from the local Hugging Face cache")
    elif cfg.pretrained:
        found = weights.resolve(cfg.pretrained)
        if cfg.pretrained.startswith(weights.PREFIX) and cfg.verify_weights:
            weights.verify(cfg.pretrained, found.path)
        report = load_pretrained(model, found.path, cfg.pretrained)
        log(report.summary())
    if cfg.frozen:
        head = classifier_head(model)
        if head_outputs(model, head) != spec.num_classes:
            raise UserError(
                f"model.name={cfg.name}: its classifier head, the last nn.Linear ({head}), outputs "
                f"{head_outputs(model, head)} values, not the data's {spec.num_classes} classes; model.freeze=backbone "
                "cannot tell which layer to train"
            )
        model = freeze_backbone(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(
            f"model.freeze=backbone: only the classifier head {head} trains ({trainable:,} of "
            f"{sum(p.numel() for p in model.parameters()):,} parameters)"
        )
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# What a network raises for an input size it does not take: torch's shape errors (RuntimeError), and
# the checks models write themselves (torchvision's ViT: AssertionError; others ValueError, IndexError).
SHAPE_ERRORS = (RuntimeError, AssertionError, ValueError, IndexError)


@torch.no_grad()
def check_forward(model: nn.Module, spec: DataSpec, name: str, train_size: Optional[int] = None) -> None:
    """One tiny forward pass so a shape mistake is a clear error before training starts; also at
    the training size when it differs (FixRes: data.train_crop_size, e.g. a fixed-size classifier)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = model(torch.zeros(1, spec.channels, spec.image_size, spec.image_size, device=device))
    except SHAPE_ERRORS as exc:
        raise UserError(
            f"model.name={name} does not accept {spec.channels}x{spec.image_size}x{spec.image_size} inputs "
            f"({first_line(exc)}); change data.image_size"
        ) from None
    try:
        if train_size and train_size != spec.image_size:
            model(torch.zeros(1, spec.channels, train_size, train_size, device=device))
    except SHAPE_ERRORS as exc:
        raise UserError(
            f"model.name={name} takes {spec.image_size}x{spec.image_size} evaluation inputs but not the "
            f"{train_size}x{train_size} training images ({first_line(exc)}); training and evaluation at different "
            "sizes (data.train_crop_size, data.eval_crop_size) need a network with global pooling (e.g. the ResNets): "
            "use one size, or such a network"
        ) from None
    finally:
        model.train(was_training)
    if out.shape[-1] != spec.num_classes:
        raise UserError(f"model.name={name} outputs {out.shape[-1]} logits but the data has {spec.num_classes} classes")
