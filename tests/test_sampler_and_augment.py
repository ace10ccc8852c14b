"""The sampler contract and keyed augmentation: independent of world size, rank and batching."""
import pytest
import torch

from distcls.config import AugmentConfig
from distcls.data.augment import Preprocess
from distcls.data.sampler import EvalShardSampler, GlobalBatchSampler
from distcls.errors import ConfigError


def _epoch(n, g, world, seed=0, epoch=3):
    per_rank = []
    for r in range(world):
        s = GlobalBatchSampler(n, g, world, r, seed)
        s.set_epoch(epoch)
        per_rank.append(list(s))
    # Concatenate rank slices of each step back into the global batch.
    return [sum((per_rank[r][i] for r in range(world)), []) for i in range(len(per_rank[0]))]


@pytest.mark.parametrize("world", [2, 4])
def test_same_global_batches_in_same_order_at_any_world_size(world):
    one = _epoch(103, 8, 1)
    many = _epoch(103, 8, world)
    assert one == many
    assert len(one) == 103 // 8  # last partial batch dropped
    flat = sum(one, [])
    assert len(set(flat)) == len(flat) == 12 * 8


def test_epochs_shuffle_differently_and_resume_continues_at_the_next_batch():
    assert _epoch(64, 8, 1, epoch=0) != _epoch(64, 8, 1, epoch=1)
    s = GlobalBatchSampler(64, 8, 2, 1, seed=5)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_step=3)
    assert list(s) == full[3:] and len(s) == len(full) - 3


def test_global_batch_must_divide_by_world_size():
    with pytest.raises(ConfigError, match="divisible by the world size 4"):
        GlobalBatchSampler(100, 10, 4, 0, 0)


@pytest.mark.parametrize("n, world, batch", [(101, 1, 7), (101, 2, 7), (101, 3, 16), (5, 4, 2), (2, 3, 4)])
def test_evaluation_counts_every_sample_exactly_once(n, world, batch):
    seen = []
    for r in range(world):
        seen += [i for b in EvalShardSampler(n, batch, world, r) for i in b]
    assert sorted(seen) == list(range(n))


def test_augmentation_is_keyed_by_sample_not_by_batch_position():
    pre = Preprocess(3, 16, (0.5,) * 3, (0.25,) * 3, AugmentConfig(crop_padding=3, hflip=True, rotation_deg=15), seed=7)
    images = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    keys = torch.tensor([40, 11, 5, 99, 3, 1000])
    whole = pre(images, keys, epoch=2, train=True)
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    shuffled = pre(images[perm], keys[perm], epoch=2, train=True)
    torch.testing.assert_close(shuffled, whole[perm])
    halves = torch.cat([pre(images[:3], keys[:3], 2, True), pre(images[3:], keys[3:], 2, True)])
    torch.testing.assert_close(halves, whole)
    assert not torch.allclose(pre(images, keys, epoch=3, train=True), whole)  # a new epoch, new draws
    plain = pre(images, keys, epoch=2, train=False)
    assert plain.shape == (6, 3, 16, 16) and not torch.allclose(plain, whole)


def test_crop_flip_are_real_transforms():
    img = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1) * 10
    keys = torch.arange(64)
    flip_only = Preprocess(1, 4, (0.0,), (1 / 255,), AugmentConfig(hflip=True), 0)(img, keys, 0, True)
    flipped = [torch.allclose(o, img[0, 0].float().flip(-1), atol=1e-3) for o in flip_only[:, 0]]
    same = [torch.allclose(o, img[0, 0].float(), atol=1e-3) for o in flip_only[:, 0]]
    assert all(f or s for f, s in zip(flipped, same)) and 10 < sum(flipped) < 54
    crop = Preprocess(1, 4, (0.0,), (1 / 255,), AugmentConfig(crop_padding=1), 0)(img, keys, 0, True)
    # every output is a 1-pixel (or zero) shift of the input with zero padding
    shifted = {tuple(o.round().long().flatten().tolist()) for o in crop[:, 0]}
    assert 3 <= len(shifted) <= 9
