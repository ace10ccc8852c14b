"""`model.pretrained`: where the starting weights live, and the preprocessing they were trained with.

`torchvision:<WEIGHTS_ENUM>` (e.g. `torchvision:ResNet18_Weights.IMAGENET1K_V1`) names torchvision's
published weights. They are read from the local torch hub cache, `$TORCH_HOME/hub/checkpoints/`
(torch.hub.get_dir()), under the file name of their URL; nothing is downloaded unless
model.download=true (rank 0 fetches a missing file through torch.hub, checking its hash). Anything
else is a path to a local state_dict or distcls checkpoint file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from distcls.config import Config
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


def weights_url(weights) -> str:
    """Where torchvision publishes a weights enum's file (one function: the tests serve it from a file:// URL)."""
    return weights.url


def resolve(spec: str, download: bool = False) -> Pretrained:
    """Where `model.pretrained` points; a torchvision file missing from the cache is downloaded
    (`download`, model.download: collective under a launcher, rank 0 fetches) or a UserError saying how to get it."""
    if not spec.startswith(PREFIX):
        return Pretrained(Path(spec))
    import torch

    weights = _enum(spec[len(PREFIX):])
    url = weights_url(weights)
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    path = directory / url.rsplit("/", 1)[-1]
    if not path.is_file() and download:
        fetch(spec, url, path)
    if not path.is_file():
        raise UserError(
            f"model.pretrained={spec}: {path.name} is not in {directory}; fetch {url} on a machine with internet and "
            f"copy it to {path} (or set TORCH_HOME), or set model.download=true where this machine may download it"
        )
    return Pretrained(path, *_preprocessing(weights))


def fetch(spec: str, url: str, path: Path) -> None:
    """Collective: rank 0 downloads `url` to `path` through torch.hub, checking the sha256 prefix in its
    name (check_hash), the others wait; a failure is one UserError on every rank."""
    import torch

    from distcls.runtime import dist
    error = None
    if dist.is_main_rank():
        match = HASH_IN_NAME.search(path.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(
                url, str(path), hash_prefix=match.group(1) if match else None, progress=False
            )
        except Exception as exc:  # noqa: BLE001  (no network, HTTP errors, a hash mismatch: one line)
            error = (
                f"model.pretrained={spec}: downloading {url} failed ({' '.join(str(exc).split())[:200]}); fetch it on "
                f"a machine with internet and copy it to {path}, or check the network"
            )
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)


# torchvision's file names: resnet18-f37072fd.pth (torch.hub's HASH_REGEX)
HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")


def verify(spec: str, path: Path) -> None:
    """A torchvision weights file matches the sha256 prefix its name carries; else a UserError naming it."""
    match = HASH_IN_NAME.search(path.name)
    if match is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    got = digest.hexdigest()
    if not got.startswith(match.group(1)):
        raise UserError(
            f"model.pretrained={spec}: {path} is not the file torchvision published: its sha256 starts "
            f"{got[: len(match.group(1))]}, its name says {match.group(1)} (a damaged or different file under that "
            "name); fetch it again, or set model.verify_weights=false for a file you made yourself"
        )


def preprocessing(spec: str) -> Optional[Pretrained]:
    """The preprocessing of torchvision weights `spec` (path None: the file need not exist, e.g.
    when a checkpoint trained from them is evaluated); None for any other `model.pretrained`."""
    if not spec or not spec.startswith(PREFIX):
        return None
    return Pretrained(None, *_preprocessing(_enum(spec[len(PREFIX):])))


def _preprocessing(weights) -> tuple:
    """(mean, std, crop size, resize size) of a torchvision weights enum's transforms."""
    t = weights.transforms()
    crop = getattr(t, "crop_size", None)
    resize = getattr(t, "resize_size", None)
    return tuple(t.mean), tuple(t.std), crop[0] if crop else None, resize[0] if resize else None


def with_pretrained_preprocessing(cfg: Config, pretrained: Optional[str] = None) -> Config:
    """torchvision weights bring their own preprocessing (mean/std, crop and resize sizes);
    keys the config leaves null take those values, keys it sets win. `pretrained` (default
    model.pretrained): the weights a checkpoint was trained from, for evaluate/predict/export,
    which restore the checkpoint's weights instead (the file need not exist any more)."""
    trained_from = cfg.model.pretrained if pretrained is None else pretrained
    # timm's weights (training, or a checkpoint trained from them): their mean/std
    if trained_from == "timm" and cfg.model.name.startswith("timm:"):
        from distcls.models import timm_zoo
        norm = timm_zoo.pretrained_preprocessing(cfg.model.name[len(timm_zoo.PREFIX):]) if cfg.data.mean is None else {}
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **norm))
    if pretrained is None:  # training: the file must be there (resolve says where to put it)
        if not (cfg.model.pretrained or "").startswith(PREFIX):
            return cfg
        w = resolve(cfg.model.pretrained, download=cfg.model.download)
    else:
        w = preprocessing(pretrained)
        if w is None:
            return cfg
    d = cfg.data
    norm = {"mean": list(w.mean), "std": list(w.std)} if d.mean is None and w.mean is not None else {}
    size = {"image_size": w.crop_size} if d.image_size is None and w.crop_size else {}
    # The weights' resize belongs to their crop: only when the evaluation crop is theirs (else
    # e.g. data.eval_crop_size=288 got resize 232 and a zero-padded border).
    eval_crop = d.eval_crop_size or d.image_size
    resize = ({"eval_resize": w.resize_size} if d.eval_resize is None and w.resize_size
              and (eval_crop is None or eval_crop == w.crop_size) else {})
    return dataclasses.replace(cfg, data=dataclasses.replace(d, **norm, **size, **resize))


def normalization_source(user_cfg: Config, prepared: Config) -> Optional[str]:
    """`model.pretrained=...` when the prepared config's data.mean/std came from those weights (the user set none), else
    None."""
    if user_cfg.data.mean is None and prepared.data.mean is not None:
        return f"model.pretrained={user_cfg.model.pretrained}"
    return None
