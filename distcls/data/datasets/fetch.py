"""Opt-in downloads (data.download=true) through torchvision's own downloaders.

Rank 0 downloads, the other ranks wait at a barrier, then everyone reads the files with
distcls' readers. Without internet this fails with a clear error.
"""
from __future__ import annotations

from distcls.runtime import dist
from distcls.errors import UserError


def download_with_torchvision(dataset: str, root: str) -> None:
    """Collective (every rank): rank 0 downloads, all wait at a barrier, rank 0's error (if any)
    is broadcast, so every rank raises the same UserError."""
    import torchvision.datasets as tvd

    classes = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST}
    error = None
    if not dist.active() or dist.is_main_rank():
        try:
            for train in (True, False):
                classes[dataset](root, train=train, download=True)
        except Exception as exc:  # network errors come in many types
            error = (
                f"downloading {dataset} into {root} failed ({type(exc).__name__}: {exc}); "
                "put the official files there by hand"
            )
    dist.barrier()
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)
