"""What a model needs to know about its inputs (channels, classes, size, normalization): the one
piece of the data that models, checkpoints and inference share, importable without the data package."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


def printable_name(name: str) -> str:
    """A class name any console, JSON file or font can show: a folder name that is not valid UTF-8
    (Python reads its bytes as surrogate escapes) gets them as \\xNN, e.g. b'caf\\xe9' -> 'caf\\xe9'."""
    if not isinstance(name, str):
        return str(name)
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def class_labels(names: Sequence[str], num_classes: int) -> list:
    """`names` (printable) when there is one per class, else "0".."num_classes-1"."""
    return [printable_name(n) for n in names] if len(names) == num_classes else [str(i) for i in range(num_classes)]


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its inputs; stored in every checkpoint."""
    channels: int
    num_classes: int
    image_size: int
    class_names: tuple = field(default=())
    mean: tuple = ()
    std: tuple = ()

    @property
    def labels(self) -> list:
        """The class names to print: `class_names`, or "0".."n-1" when the dataset names no classes."""
        return class_labels(self.class_names, self.num_classes)

    def to_dict(self) -> dict:
        return {"channels": self.channels, "num_classes": self.num_classes, "image_size": self.image_size,
                "class_names": list(self.class_names), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(int(d["channels"]), int(d["num_classes"]), int(d["image_size"]),
                   tuple(d.get("class_names", ())), tuple(d.get("mean", ())), tuple(d.get("std", ())))
