"""The sampler contract and keyed augmentation: independent of world size, rank and batching."""
import dataclasses
import math

import pytest
import torch

from distcls.config import AugmentConfig
from distcls.data.transforms.augment import Preprocess, keyed_uniform
from distcls.data.loader import eval_loader, train_loader
from distcls.data.sampler import EvalShardSampler, GlobalBatchSampler
from distcls.data.sources import SplitView, TensorSource
from distcls.spec import DataSpec
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
    with pytest.raises(ConfigError, match="split evenly over 4 processes"):
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


def test_epoch_draw_table_holds_the_keyed_uniform_draws_of_every_key():
    aug = AugmentConfig(crop_padding=4, hflip=True, rotation_deg=20)
    g = torch.Generator().manual_seed(1)
    for seed, epoch in [(0, 0), (7, 3), (123456789, 41)]:
        pre = Preprocess(3, 8, (0.5,) * 3, (0.25,) * 3, aug, seed, num_keys=3000)
        keys = torch.randint(0, 3000, (257,), generator=g)
        got = pre.epoch_table(epoch, torch.device("cpu")).index(keys)
        u = {s: keyed_uniform(seed, epoch, keys, s) for s in (1, 2, 3, 4)}
        assert torch.equal(got.crop_y, (u[1] * 9).long()) and torch.equal(got.crop_x, (u[2] * 9).long())
        assert torch.equal(got.flip, u[3] < 0.5)
        assert got.angle.dtype == torch.float64 and torch.equal(got.angle, (u[4] * 2 - 1) * 20 * math.pi / 180)
        assert got.crop_y.unique().numel() == 9 and 0.3 < got.flip.float().mean() < 0.7  # real draws, not constants
    only_flip = Preprocess(3, 8, (0.5,) * 3, (0.25,) * 3, AugmentConfig(hflip=True), 0, num_keys=10).epoch_table(
        0, torch.device("cpu")
    )
    assert (
        only_flip.flip is not None and only_flip.crop_y is None and only_flip.crop_x is None and only_flip.angle is None
    )


def test_the_policy_recipe_gives_each_sample_the_same_values_in_any_batch():
    """TrivialAugment + erasing + flip on the CPU (each sample on its own view): bitwise the same
    values whatever else is in the batch and wherever the sample sits in it."""
    aug = AugmentConfig(hflip=True, policy="trivialaugment", erase_prob=0.5)
    pre = Preprocess(3, 24, (0.5,) * 3, (0.25,) * 3, aug, seed=3, num_keys=500)
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (40, 3, 24, 24), dtype=torch.uint8, generator=g)
    keys = torch.randperm(500, generator=g)[:40]
    whole = pre(images, keys, epoch=1, train=True)
    perm = torch.randperm(40, generator=g)
    assert torch.equal(pre(images[perm], keys[perm], 1, True), whole[perm])
    assert torch.equal(torch.cat([pre(images[:7], keys[:7], 1, True), pre(images[7:], keys[7:], 1, True)]), whole)
    ops = pre.draws(keys, 1, torch.device("cpu")).ops
    assert len(set(ops.flatten().tolist())) >= 8  # many op kinds drawn, so the test covers them


def test_a_lent_output_buffer_holds_the_same_batch_and_is_used_only_when_it_fits():
    aug = AugmentConfig(hflip=True, policy="trivialaugment", erase_prob=0.5)
    pre = Preprocess(3, 16, (0.5,) * 3, (0.25,) * 3, aug, seed=3, num_keys=100)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    keys, labels = torch.arange(8), torch.arange(8) % 3
    plain, _ = pre.train_batch(images, labels, keys, 2)
    buffer = torch.full((8, 3, 16, 16), float("nan"))
    lent, _ = pre.train_batch(images, labels, keys, 2, out=buffer)
    assert lent.data_ptr() == buffer.data_ptr() and torch.equal(lent, plain)
    small = images[:, :, :12, :12]  # resized to 16: the buffer of the batch's own shape is not used
    other = torch.zeros(8, 3, 12, 12)
    resized, _ = pre.train_batch(small, labels, keys, 2, out=other)
    assert (
        resized.shape == (8, 3, 16, 16)
        and resized.data_ptr() != other.data_ptr()
        and torch.equal(other, torch.zeros(8, 3, 12, 12))
    )


def test_preprocess_with_the_epoch_table_equals_hashing_per_batch():
    aug = AugmentConfig(crop_padding=3, hflip=True, rotation_deg=15)
    spec = DataSpec(3, 10, 16, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    table = Preprocess.from_spec(spec, aug, seed=5, num_keys=1000)
    per_batch = Preprocess.from_spec(spec, aug, seed=5)
    assert per_batch == Preprocess(3, 16, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), aug, 5)
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (48, 3, 12, 12), dtype=torch.uint8, generator=g)
    for epoch in (0, 1, 0):  # the table follows the epoch (and back)
        keys = torch.randint(0, 1000, (48,), generator=g)
        assert torch.equal(table(images, keys, epoch, train=True), per_batch(images, keys, epoch, train=True))
    assert torch.equal(table(images, keys, 0, train=False), per_batch(images, keys, 0, train=False))
    assert table == Preprocess.from_spec(spec, aug, seed=5, num_keys=1000)  # the device cache is not part of its value


def _in_memory_view(n=40, size=4):
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    source = TensorSource(images, torch.arange(n) % 3)
    return SplitView(source, torch.arange(1, n, 2))  # keys (source indices) differ from positions (split indices)


def test_in_memory_batches_carry_device_keys_equal_to_the_split_indices_of_their_positions():
    view = _in_memory_view()
    loader = train_loader(view, 6, 2, 1, seed=4, device=torch.device("cpu"))
    loader.sampler.set_epoch(2)
    positions = list(loader.sampler)
    batches = list(loader)
    assert len(batches) == len(positions) == 3
    for batch, pos in zip(batches, positions):
        assert torch.equal(batch.keys, view.indices[pos])
        assert torch.equal(batch.images, view.source.images[batch.keys]) and torch.equal(
            batch.labels, view.source.labels[batch.keys]
        )
    # On another device every field of a batch is there (the meta device stands in for a GPU).
    meta = train_loader(view, 6, 2, 1, seed=4, device=torch.device("meta"))
    assert all(t.device.type == "meta" for b in meta for t in (b.images, b.labels, b.keys))
    assert [len(b.keys) for b in eval_loader(view, 8, 1, 0, torch.device("meta"))] == [8, 8, 4]


def _epoch_repeats(n, g, world, k, seed=0, epoch=1):
    per_rank = []
    for r in range(world):
        s = GlobalBatchSampler(n, g, world, r, seed, repeats=k)
        s.set_epoch(epoch)
        per_rank.append(list(s))
    return per_rank


@pytest.mark.parametrize("k, world", [(2, 2), (3, 3), (4, 2), (2, 4)])
def test_repeated_augmentation_copies_have_own_keys_land_on_different_ranks_in_one_global_order(k, world):
    n, g = 240, 24
    one = [sum(batches, []) for batches in zip(*_epoch_repeats(n, g, 1, k))]
    per_rank = _epoch_repeats(n, g, world, k)
    assert [sum(parts, []) for parts in zip(*per_rank)] == one  # same global order at any world size
    assert len(one) == n // g  # epochs keep their number of steps (torchvision's RASampler)
    for step, batch in enumerate(one):
        samples = [p % n for p in batch]
        copies = [p // n for p in batch]
        assert all(samples.count(s) == k for s in samples)  # each sample k times per batch
        assert sorted({(s, c) for s, c in zip(samples, copies)}) == sorted(zip(samples, copies))  # k distinct keys
        for s in set(samples):
            ranks = {r for r in range(world) for p in per_rank[r][step] if p % n == s}
            assert len(ranks) == min(k, world)  # spread over as many ranks as there are copies
    flat = [p % n for b in one for p in b]
    assert len(set(flat)) == len(flat) // k  # distinct samples this epoch: N // k


def test_repeats_must_divide_the_global_batch():
    with pytest.raises(ConfigError, match="data.batch_size=10 must be a multiple of 4"):
        GlobalBatchSampler(100, 10, 1, 0, 0, repeats=4)


def test_repeated_copies_get_different_augmentation_keys_in_memory():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    view = SplitView(TensorSource(images, torch.arange(40) % 10), torch.arange(5, 35))
    loader = train_loader(view, 8, 1, 0, seed=3, device=torch.device("cpu"), repeats=2)
    loader.sampler.set_epoch(0)
    for batch in loader:
        first, second = batch.keys[:4], batch.keys[4:]
        assert torch.equal(second, first + 40)  # copy 1: key + source size
        assert torch.equal(batch.images[:4], batch.images[4:]) and torch.equal(batch.labels[:4], batch.labels[4:])
        assert torch.equal(batch.images[:4], images[first])


def test_repeated_copies_of_image_files_are_cropped_by_their_own_keys(tmp_path):
    from fakedata import write_imagefolder

    from distcls.data import folder_index
    from distcls.data.file_source import CropPolicy, FileSource
    root = write_imagefolder(tmp_path / "flowers", per_class=4)
    samples = folder_index.walk(root).source_pairs("train")
    source = FileSource(samples, 16, 3, CropPolicy(16, 18, ((0.08, 1.0), (0.75, 4 / 3)), hflip=True))
    view = SplitView(source, torch.arange(len(samples)))
    loader = train_loader(view, 4, 1, 0, seed=1, device=torch.device("cpu"), repeats=2)
    loader.sampler.set_epoch(2)
    batches = list(loader)
    for batch in batches:
        assert torch.equal(batch.keys[2:], batch.keys[:2] + len(samples))
        assert torch.equal(batch.labels[2:], batch.labels[:2])
    key = int(batches[0].keys[2])
    img = source.load(key % len(samples), True, 1, 2, key=key)[0]
    assert torch.equal(batches[0].images[2], img)  # the copy's crop is keyed by its own key
    assert any(not torch.equal(b.images[:2], b.images[2:]) for b in batches)


def test_the_hash_streams_are_one_table_with_disjoint_blocks_that_hold_their_draws():
    """Every op draws from its own block of stream ids (keys.Stream): two ops sharing an id would draw
    the same numbers. No call passes a bare number as its stream."""
    import ast
    from pathlib import Path

    from distcls.config import AugmentConfig
    from distcls.data.transforms import images
    from distcls.data.transforms import policies
    from distcls.data.transforms.keys import BLOCKS, Stream

    spans = sorted((int(start), int(start) + size) for start, size in BLOCKS.items())
    assert set(BLOCKS) == set(Stream) and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    max_ops = next(f for f in dataclasses.fields(AugmentConfig) if f.name == "num_ops").metadata["max"]
    assert 4 * images.RRC_TRIES <= BLOCKS[Stream.RESIZED_CROP]
    assert 1 + 4 * policies.ERASE_TRIES <= BLOCKS[Stream.ERASE]
    assert 3 * max_ops <= BLOCKS[Stream.POLICY]
    bare = []
    for path in Path(images.__file__).parents[1].rglob("*.py"):  # all of distcls/data
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "keyed_uniform",
                "keyed_uniform_scalar",
            ):
                stream = node.args[3] if len(node.args) > 3 else None
                if isinstance(stream, ast.Constant):
                    bare.append(f"{path.name}:{node.lineno}")
    assert bare == []
