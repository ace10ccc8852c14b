"""`model.pretrained`: where the starting weights live, and the preprocessing they were trained with.

`torchvision:<WEIGHTS_ENUM>` (e.g. `torchvision:ResNet18_Weights.IMAGENET1K_V1`) names torchvision's
published weights. They are read from the local torch hub cache, `$TORCH_HOME/hub/checkpoints/`
(torch.hub.get_dir()), under the file name of their URL; nothing is downloaded. Anything else is
a path to a local state_dict or distcls checkpoint file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from distcls.errors import UserError

PREFIX = "torchvision:"


@dataclass(frozen=True)
class Pretrained:
    path: Path
    mean: Optional[tuple] = None  # the weights' own preprocessing (torchvision weights only)
    std: Optional[tuple] = None
    crop_size: Optional[int] = None
    resize_size: Optional[int] = None


def _enum(name: str):
    import torchvision

    try:
        return torchvision.models.get_weight(name)
    except (KeyError, ValueError, AttributeError):
        raise UserError(f"model.pretrained=torchvision:{name} is not a torchvision weights enum; use the form "
                        "torchvision:<Model>_Weights.<NAME>, e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1") from None


def resolve(spec: str) -> Pretrained:
    """Where `model.pretrained` points; a torchvision file missing from the cache is a UserError saying how to get it."""
    if not spec.startswith(PREFIX):
        return Pretrained(Path(spec))
    import torch

    weights = _enum(spec[len(PREFIX):])
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    path = directory / weights.url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise UserError(f"model.pretrained={spec}: {path.name} is not in {directory}; distcls does not download: fetch "
                        f"{weights.url} on a machine with internet and copy it to {path} (or set TORCH_HOME)")
    t = weights.transforms()
    crop, resize = _sizes(t)
    return Pretrained(path, tuple(t.mean), tuple(t.std), crop, resize)


def _sizes(transforms) -> tuple:
    crop = getattr(transforms, "crop_size", None)
    resize = getattr(transforms, "resize_size", None)
    return crop[0] if crop else None, resize[0] if resize else None


def eval_resize(spec: str, image_size: Optional[int]) -> Optional[int]:
    """The evaluation resize that torchvision weights `spec` gave a run whose data.eval_resize was
    null and data.image_size `image_size` (data.with_pretrained_preprocessing's rule), from the
    weights' metadata only (the file need not be here, as for evaluate/predict); None: no such resize."""
    if not spec.startswith(PREFIX):
        return None
    try:
        crop, resize = _sizes(_enum(spec[len(PREFIX):]).transforms())
    except UserError:  # an enum this torchvision lacks: its sizes are unknown here
        return None
    return resize if resize and (image_size is None or image_size == crop) else None
