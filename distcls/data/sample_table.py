"""`SampleTable`: an image folder's (path, label) list as flat arrays.

A list of Python tuples would be read by every DataLoader worker, and reading an object touches its
reference count, so each worker's copy-on-write pages become private: 12-18 MB per 100k files touched
in an epoch, about 200 MB per worker at ImageNet size. Here the paths are one uint8 buffer with
offsets and the labels an int32 array: a few objects in all, whatever the number of files, so a
worker's private memory stays flat over an epoch.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import numpy as np


class SampleTable:
    """Paths (relative to `root`, or absolute when root is "") and labels, indexable as (path, label)."""

    def __init__(self, paths: np.ndarray, offsets: np.ndarray, labels: np.ndarray, root: str = ""):
        self.paths = np.ascontiguousarray(paths, dtype=np.uint8)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.labels = np.ascontiguousarray(labels, dtype=np.int32)
        self.root = root
        if len(self.offsets) != len(self.labels) + 1:
            raise ValueError(f"{len(self.offsets)} offsets for {len(self.labels)} samples")

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple], root: str = "") -> "SampleTable":
        pairs = list(pairs)
        encoded = [os.fsencode(path) for path, _ in pairs]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        paths = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, dtype=np.uint8)
        return cls(paths, offsets, np.array([label for _, label in pairs], dtype=np.int32), root)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        start, end = self.offsets[index], self.offsets[index + 1]
        name = os.fsdecode(self.paths[start:end].tobytes())
        return os.path.join(self.root, name) if self.root else name

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def __getitem__(self, index: int) -> tuple:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.path(index), self.label(index)

    def __iter__(self) -> Iterator[tuple]:
        return (self[i] for i in range(len(self)))

    def select(self, indices: Sequence[int]) -> "SampleTable":
        """The samples at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.offsets[indices + 1] - self.offsets[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(indices):
            gather = np.repeat(self.offsets[indices] - offsets[:-1], lengths) + np.arange(offsets[-1])
            paths = self.paths[gather]
        else:
            paths = np.zeros(0, dtype=np.uint8)
        return SampleTable(paths, offsets, self.labels[indices], self.root)

    def concat(self, other: "SampleTable") -> "SampleTable":
        if self.root != other.root:  # different roots: absolute paths
            return SampleTable.from_pairs([*self, *other])
        return SampleTable(np.concatenate([self.paths, other.paths]),
                           np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]]),
                           np.concatenate([self.labels, other.labels]), self.root)

    def __eq__(self, other) -> bool:
        return isinstance(other, SampleTable) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"SampleTable({len(self)} samples, root={self.root!r})"
