"""`model.name=timm:<name>`: any model of timm (`timm.create_model`), sized to the data.

Needs the optional extra (`pip install 'distcls[timm]'`); without it the name is one error line that
says so. `<name>` is one of `timm.list_models()` (resnet50, convnext_tiny, efficientnet_b0,
vit_small_patch16_224, ...), optionally with a pretrained tag (`resnet50.a1_in1k`), built with
- `num_classes` = the data's classes and `in_chans` = its channels (timm adapts the stem);
- `model.dropout` -> timm's `drop_rate`, `model.drop_path` -> `drop_path_rate`;
- `model.args` -> any other argument of the model (e.g. `model.args.img_size=32` for a ViT on 32x32 images);
- `model.pretrained=timm`: the weights timm names for it, read from the local Hugging Face cache only
  (HF_HUB_OFFLINE: never the network; `huggingface-cli download timm/<name>.<tag>` fills the cache where
  the network allows it; the error names the repository), the classifier re-initialized when the data has another number
  of classes, and the weights' mean/std used unless data.mean/std are set. A local state_dict or checkpoint file works
  too (`model.pretrained=PATH`), as for every model.
"""
from __future__ import annotations

import difflib
import functools
import os

import torch.nn as nn

from distcls.config import ModelConfig
from distcls.errors import ConfigError, UserError, first_line
from distcls.models.registry import MODELS
from distcls.spec import DataSpec

PREFIX = "timm:"
PRETRAINED = "timm"  # model.pretrained=timm: timm's own weights for model.name, from the local cache
REGULARIZATION_ARGS = {"dropout": "drop_rate", "drop_path": "drop_path_rate"}


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "model.name=timm:<name> needs the timm package: pip install 'distcls[timm]' (or pip install timm)"
        ) from None
    return timm


@functools.lru_cache(maxsize=1)
def model_names() -> tuple:
    return tuple(_timm().list_models())


def resolve(name: str):
    """The builder of `timm:<name>`, or a ConfigError listing close matches."""
    timm = _timm()
    arch = name.split(".", 1)[0]  # a pretrained tag (resnet50.a1_in1k) names weights, not another architecture
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, model_names(), n=4, cutoff=0.6)
        hint = f"close matches: {', '.join(PREFIX + n for n in close)}" if close else \
            "list them with: python -c \"import timm; print(timm.list_models())\""
        raise ConfigError(f"model.name={PREFIX}{name} is not a timm model; {hint}")
    if "." in name and name not in timm.list_pretrained(f"{arch}.*"):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise ConfigError(
            f"model.name={PREFIX}{name}: '{name.split('.', 1)[1]}' is not a pretrained tag of {arch}; "
            + (
                f"its tags: {', '.join(tags[:8])}" + (", ..." if len(tags) > 8 else "")
                if tags
                else f"{arch} has none: use {PREFIX}{arch}"
            )
        )
    return functools.partial(build, name)


def build(name: str, spec: DataSpec, cfg: ModelConfig, **args) -> nn.Module:
    timm = _timm()
    for fixed in ("num_classes", "in_chans", "pretrained"):
        if fixed in args:
            how = (
                "use model.pretrained=timm (the local cache) or a file"
                if fixed == "pretrained"
                else "it comes from the data"
            )
            raise ConfigError(f"model.args.{fixed} cannot be set for model.name={PREFIX}{name}: {how}")
    if cfg.cifar_stem:
        raise ConfigError(
            f"model.cifar_stem applies to model.name=resnet18|resnet34|resnet50, not {PREFIX}{name}; set "
            "model.cifar_stem=false"
        )
    regularization = {
        arg: getattr(cfg, key) for key, arg in REGULARIZATION_ARGS.items() if getattr(cfg, key) is not None
    }
    pretrained = cfg.pretrained == PRETRAINED
    try:
        with _offline():
            return timm.create_model(name, pretrained=pretrained, num_classes=spec.num_classes, in_chans=spec.channels,
                                     **regularization, **args)
    except (TypeError, AssertionError) as exc:  # an argument the model does not take, or a value it refuses
        raise ConfigError(
            f"model.args={args} or model.dropout/drop_path does not fit model.name={PREFIX}{name} ({first_line(exc)}); "
            "leave it unset for this model"
        ) from None
    except (RuntimeError, OSError, ValueError) as exc:
        if pretrained:
            hub = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or f"timm/{name}"
            raise UserError(
                f"model.pretrained=timm: the weights of {PREFIX}{name} are not in the local Hugging Face cache "
                f"({' '.join(first_line(exc).split())[:240]}); fetch them where the network allows "
                f"(huggingface-cli download {hub}), or give a local file: model.pretrained=PATH"
            ) from None
        raise


class _offline:
    """HF_HUB_OFFLINE=1 around a build: a pretrained model is read from the cache, never downloaded."""

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE",)}
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:  # huggingface_hub reads the variable when imported: tell an imported one too
            from huggingface_hub import constants
            self.constant = constants.HF_HUB_OFFLINE
            constants.HF_HUB_OFFLINE = True
        except ImportError:
            self.constant = None

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self.constant is not None:
            from huggingface_hub import constants
            constants.HF_HUB_OFFLINE = self.constant
        return False


def pretrained_preprocessing(name: str) -> dict:
    """{'mean': [...], 'std': [...]} of timm's weights for `name` (its pretrained_cfg), or {} when timm has none."""
    timm = _timm()
    try:
        pcfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001  (timm raises for an untagged name without a default)
        pcfg = None
    if pcfg is None:
        return {}
    return {"mean": list(pcfg.mean), "std": list(pcfg.std)}


# No names for the registry's close matches of other families' typos: listing timm's would import it (seconds);
# resolve() has its own.
MODELS.register_family(PREFIX, resolve, lambda: [])
