"""`model.name=torchvision:<name>`: any classifier of torchvision.models, sized to the data.

The name is one of `torchvision.models.list_models(module=torchvision.models)` (resnet101,
resnext50_32x4d, wide_resnet50_2, convnext_tiny, efficientnet_b0, regnet_y_400mf,
mobilenet_v3_large, vit_b_16, ...), built by `torchvision.models.get_model` with `weights=None`
(`model.pretrained` loads weights afterwards, from a local file, never the network) and
- `num_classes` = the data's classes;
- for architectures whose size depends on the input (ViT: `image_size`, MaxViT: `input_size`)
  that argument = data.image_size;
- `model.dropout` -> the builder's `dropout`, `model.drop_path` -> its `stochastic_depth_prob`
  (an error for builders that take no such argument);
- `model.args` -> any other builder argument (e.g. `model.args.width_mult` is not one: the error says so);
- grayscale data (data.channels=1): the stem, the first Conv2d that takes 3 channels, is replaced by
  one of the same shape taking 1 channel (freshly initialized); with `model.pretrained` that would
  throw the stem's weights away, so it is an error that says to set data.channels=3 (the images are
  then repeated to 3 channels).
"""
from __future__ import annotations

import difflib
import functools
from typing import Optional

import torch.nn as nn

from distcls.config import ModelConfig
from distcls.spec import DataSpec
from distcls.errors import ConfigError, first_line
from distcls.models.registry import MODELS

PREFIX = "torchvision:"

# Architectures whose parameters depend on the input size: the builder argument that sets it.
INPUT_SIZE_ARGS = {
    "vit_": lambda size: {"image_size": size},
    "maxvit_": lambda size: {"input_size": (size, size)},
}
# Builder defaults that do not fit a training loop that takes one tensor of logits.
DEFAULT_ARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
# What torchvision's builders switch on when they load their own weights: googlenet and inception_v3
# take ImageNet-normalized images and map them to the [-1, 1] scale their weights were trained on.
WEIGHTS_ARGS = {
    "googlenet": {"transform_input": True},
    "inception_v3": {"transform_input": True},
}
# model.<key> -> the torchvision builder's argument
REGULARIZATION_ARGS = {"dropout": "dropout", "drop_path": "stochastic_depth_prob"}


@functools.lru_cache(maxsize=1)
def classifier_names() -> tuple:
    import torchvision.models  # here, not at import time: it costs ~1 s

    return tuple(torchvision.models.list_models(module=torchvision.models))


def resolve(arch: str):
    """The builder of `torchvision:<arch>`, or a ConfigError listing the close matches."""
    names = classifier_names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=4, cutoff=0.6)
        hint = (
            f"close matches: {', '.join(PREFIX + n for n in close)}"
            if close
            else "list them with: python -c \"import torchvision; "
                 "print(torchvision.models.list_models(module=torchvision.models))\""
        )
        raise ConfigError(f"model.name={PREFIX}{arch} is not a torchvision classifier; {hint}")
    return functools.partial(build, arch)


def build(arch: str, spec: DataSpec, cfg: ModelConfig, **args) -> nn.Module:
    import torchvision.models

    for fixed in ("num_classes", "weights"):
        if fixed in args:
            how = (
                "they come from the data"
                if fixed == "num_classes"
                else "use model.pretrained=torchvision:<WEIGHTS> (read from the local cache)"
            )
            raise ConfigError(f"model.args.{fixed} cannot be set for model.name={PREFIX}{arch}: {how}")
    if cfg.cifar_stem:
        raise ConfigError(
            f"model.cifar_stem applies to model.name=resnet18|resnet34|resnet50, not {PREFIX}{arch}; set "
            "model.cifar_stem=false"
        )
    if spec.channels != 3 and cfg.pretrained:
        raise ConfigError(
            f"model.name={PREFIX}{arch} with model.pretrained: the weights' stem takes 3 channels, the data has "
            f"{spec.channels}; set data.channels=3 (grayscale images are then repeated to 3 channels)"
        )
    sized = next((make(spec.image_size) for prefix, make in INPUT_SIZE_ARGS.items() if arch.startswith(prefix)), {})
    regularization = {
        arg: getattr(cfg, key) for key, arg in REGULARIZATION_ARGS.items() if getattr(cfg, key) is not None
    }
    kwargs = {**DEFAULT_ARGS.get(arch, {}), **weights_args(arch, cfg.pretrained), **sized, **regularization, **args}
    try:
        net = torchvision.models.get_model(arch, weights=None, num_classes=spec.num_classes, **kwargs)
    except TypeError as exc:  # an argument the architecture does not take
        key = next(
            (
                f"model.{k}"
                for k, arg in REGULARIZATION_ARGS.items()
                if arg in regularization and f"'{arg}'" in str(exc)
            ),
            f"model.args={args}",
        )
        raise ConfigError(
            f"{key} does not fit model.name={PREFIX}{arch} ({first_line(exc)}); leave it null/unset for this "
            "architecture"
        ) from None
    except (AssertionError, ValueError) as exc:  # e.g. ViT: "Input shape indivisible by patch size!"
        raise ConfigError(
            f"model.name={PREFIX}{arch} cannot be built for {spec.image_size}x{spec.image_size} images with {kwargs} "
            f"({first_line(exc)}); change data.image_size or model.args"
        ) from None
    if spec.channels != 3:
        _adapt_stem(net, spec.channels, arch)
    return net


def weights_args(arch: str, pretrained: Optional[str]) -> dict:
    """The builder arguments torchvision sets with its weights (WEIGHTS_ARGS) when `pretrained`
    names torchvision weights; also for a checkpoint trained from them (inference.restore)."""
    return dict(WEIGHTS_ARGS.get(arch, {})) if (pretrained or "").startswith(PREFIX) else {}


def _adapt_stem(net: nn.Module, channels: int, arch: str) -> str:
    """Replace the first Conv2d taking 3 channels by one taking `channels` (same shape otherwise)."""
    for name, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3 and conv.groups == 1:
            stem = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                             bias=conv.bias is not None, padding_mode=conv.padding_mode)
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, stem)
            return name
    raise ConfigError(
        f"model.name={PREFIX}{arch}: no 3-channel stem convolution found to adapt to {channels}-channel data; set "
        "data.channels=3"
    )


MODELS.register_family(PREFIX, resolve, lambda: list(classifier_names()))
