"""TrivialAugmentWide / RandAugment / AutoAugment ops and random erasing, batched and keyed,
against torchvision.transforms.v2 on the same uint8 images."""
import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from distcls.config import AugmentConfig
from distcls.data.transforms import policies as P
from distcls.data.transforms.augment import Draws, Preprocess, keyed_uniform


def _images(b=6, c=3, h=30, w=38, seed=0):
    """Smooth images with noise (non-square, to catch height/width mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = []
    for i in range(b):
        phase = torch.rand(c, 1, 1, generator=g) * 6
        img = (
            127.5
            + 110 * torch.sin(xx * 3 * (i + 1) + phase) * torch.cos(yy * 2 + phase)
            + torch.randn(c, h, w, generator=g) * 12
        )
        out.append(img.clamp(0, 255).round())
    return torch.stack(out).to(torch.uint8)


MAGNITUDES = {
    "Identity": [0.0], "AutoContrast": [0.0], "Equalize": [0.0], "Invert": [0.0],
    "Posterize": [1, 2, 4, 6, 8], "Solarize": [0.0, 0.3, 0.6, 0.77, 1.0],
    "TranslateX": [-32.0, -17.7, 0.0, 5.2, 30.0], "TranslateY": [-32.0, -3.5, 0.0, 12.9, 30.0],
    "Rotate": [-135.0, -45.0, -4.5, 0.0, 10.0, 90.0, 180.0],
}
BLEND_AND_SHEAR = [-0.99, -0.5, -0.1, 0.0, 0.3, 0.9, 0.99]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "masked"])
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("op", P.OPS)
def test_each_op_equals_torchvision_within_one_level(op, interpolation, grouped):
    """Every sample of a batch draws `op` at a different magnitude (and one sample draws
    Identity), and each equals torchvision's uint8 op on that image alone within 1 level; both
    ways of running a batch (CPU: per op kind on its samples; accelerators: masked whole batch)."""
    images = torch.cat([_images(), _images(c=3, seed=1)])
    mags = MAGNITUDES.get(op, BLEND_AND_SHEAR)
    mags = (mags * math.ceil(len(images) / len(mags)))[:len(images)]
    ops = torch.full((len(images),), P.OP_ID[op])
    ops[-1] = P.OP_ID["Identity"]  # a neighbour that did not draw the op stays untouched
    ref = v2.AutoAugment(interpolation=interpolation)  # its _apply_image_or_video_transform calls v2.functional
    got = P.apply_ops(images.float(), ops, torch.tensor(mags, dtype=torch.float64), interpolation, grouped)
    for i, img in enumerate(images):
        name = P.OPS[int(ops[i])]
        want = ref._apply_image_or_video_transform(
            img, name, float(mags[i]), interpolation=ref.interpolation, fill=ref._fill
        )
        diff = (got[i] - want.float()).abs().max().item()
        assert diff <= 1, f"{name} at magnitude {mags[i]}: differs by {diff} levels"
    assert torch.equal(got[-1], images[-1].float())


def test_grouped_and_masked_batches_agree_on_mixed_ops():
    images = torch.cat([_images(seed=s) for s in range(4)])
    g = torch.Generator().manual_seed(0)
    ops = torch.randint(0, len(P.OPS), (len(images),), generator=g)
    mags = torch.rand(len(images), generator=g, dtype=torch.float64) * 0.9
    mags = torch.where(ops == P.OP_ID["Posterize"], torch.randint(1, 9, (len(images),), generator=g).double(), mags)
    a = P.apply_ops(images.float(), ops, mags, grouped=True)
    b = P.apply_ops(images.float(), ops, mags, grouped=False)
    assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 0.001


@pytest.mark.parametrize("grouped", [True, False], ids=["per-sample", "masked"])
@pytest.mark.parametrize("h, w", [(2, 5), (1, 7), (3, 3)])
def test_sharpness_of_a_tiny_image_equals_torchvision(grouped, h, w):
    """Images of 1-2 rows or columns have no inner pixels: torchvision returns them as they are (the
    per-sample path blended such an image with itself after scaling it, off by up to 230 levels)."""
    images = _images(b=3, h=h, w=w)
    ops = torch.full((3,), P.OP_ID["Sharpness"])
    mags = torch.tensor([0.5, -0.9, 0.99], dtype=torch.float64)
    got = P.apply_ops(images.float(), ops, mags, grouped=grouped)
    for i, img in enumerate(images):
        want = TF.adjust_sharpness(img, 1.0 + float(mags[i]))
        if min(h, w) <= 2:
            assert torch.equal(got[i], want.float()), (h, w, float(mags[i]))
        else:  # one inner pixel, within one level as every op
            assert (got[i] - want.float()).abs().max() <= 1, (h, w, float(mags[i]))


def test_one_channel_images_equal_torchvision():
    gray = _images(c=1)
    ref = v2.AutoAugment()
    for name in ("Color", "Contrast", "Sharpness", "Equalize", "AutoContrast", "Solarize"):
        ops = torch.full((len(gray),), P.OP_ID[name])
        got = P.apply_ops(gray.float(), ops, torch.full((len(gray),), 0.6, dtype=torch.float64))
        for i, img in enumerate(gray):
            want = ref._apply_image_or_video_transform(img, name, 0.6, interpolation=ref.interpolation, fill=ref._fill)
            assert (got[i] - want.float()).abs().max() <= 1, name


def _uniform(keys, seed=0, epoch=0):
    return lambda stream, rows=None: keyed_uniform(
        seed, epoch, keys if rows is None else keys[torch.from_numpy(rows)], stream
    ).numpy()


def test_trivialaugment_draws_cover_torchvision_space_uniformly():
    keys = torch.arange(28_000)
    ops, mags = P.PolicySpec("trivialaugment", height=32, width=32).draw(_uniform(keys))
    assert ops.shape == (len(keys), 1)
    counts = torch.bincount(ops[:, 0], minlength=len(P.OPS))
    names = list(P.TRIVIAL_WIDE)
    assert {P.OPS[i] for i in range(len(P.OPS)) if counts[i] > 0} == set(names)
    assert counts[counts > 0].min() > 1700 and counts.max() < 2300  # 2000 each expected
    rot = mags[ops[:, 0] == P.OP_ID["Rotate"], 0]
    assert rot.abs().max() <= 135.0 and (rot < 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    allowed = set(torch.linspace(0.0, 135.0, 31).double().tolist())
    assert set(rot.abs().tolist()) <= allowed


def test_randaugment_uses_the_fixed_magnitude_and_num_ops():
    ops, mags = P.PolicySpec("randaugment", num_ops=3, magnitude=9, height=40, width=20).draw(
        _uniform(torch.arange(5000))
    )
    assert ops.shape == (5000, 3)
    tx = mags[ops == P.OP_ID["TranslateX"]].abs()
    assert torch.allclose(tx, torch.full_like(tx, float(torch.linspace(0.0, 150.0 / 331.0 * 20, 31)[9])))
    post = mags[ops == P.OP_ID["Posterize"]]
    assert set(post.tolist()) == {float((8 - (torch.arange(31) / 7.5)).round().int()[9])}


def test_randaugment_with_zero_ops_is_the_identity():
    """num_ops=0 is in the schema (torchvision's RandAugment(num_ops=0) returns the image): it raised
    ValueError (np.stack of no layers) in the first training batch."""
    aug = AugmentConfig(policy="randaugment", num_ops=0)
    images = _images(b=4, h=24, w=24)
    pre = Preprocess(3, 24, (0.5,) * 3, (0.25,) * 3, aug, seed=3, num_keys=10)
    plain = Preprocess(3, 24, (0.5,) * 3, (0.25,) * 3, AugmentConfig(), seed=3, num_keys=10)
    assert torch.equal(pre(images, torch.arange(4), 0, train=True), plain(images, torch.arange(4), 0, train=True))


def test_autoaugment_draws_only_imagenet_sub_policies():
    ops, mags = P.PolicySpec("autoaugment", height=32, width=32).draw(_uniform(torch.arange(4000)))
    pairs = {(P.OP_ID[a[0]], P.OP_ID[b[0]]) for a, b in P.IMAGENET_POLICY}
    firsts = {P.OP_ID[a[0]] for a, _ in P.IMAGENET_POLICY} | {0}
    seconds = {P.OP_ID[b[0]] for _, b in P.IMAGENET_POLICY} | {0}
    both = [(int(a), int(b)) for a, b in ops.tolist() if a and b]
    assert set(both) <= pairs and len(set(both)) > 10
    assert set(ops[:, 0].tolist()) <= firsts and set(ops[:, 1].tolist()) <= seconds
    # ("Equalize", 0.0, ...) never applies its first op; ("Equalize", 1.0) always applies
    assert (ops == 0).any()


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "autoaugment"])
def test_policy_in_preprocess_is_keyed_by_sample_not_batch(policy):
    aug = AugmentConfig(policy=policy, erase_prob=0.5)
    pre = Preprocess(3, 24, (0.5,) * 3, (0.25,) * 3, aug, seed=3, num_keys=50)
    images = _images(b=8, h=24, w=24)
    keys = torch.tensor([4, 9, 17, 23, 31, 40, 45, 49])
    whole = pre(images, keys, epoch=2, train=True)
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    shuffled = pre(images[perm], keys[perm], epoch=2, train=True)
    assert torch.equal(whole[perm], shuffled)
    assert not torch.equal(whole, pre(images, keys, epoch=3, train=True))
    host = Preprocess(3, 24, (0.5,) * 3, (0.25,) * 3, aug, seed=3)  # hashed per batch, same numbers
    assert torch.equal(whole, host(images, keys, epoch=2, train=True))


# --------------------------------------------------------------------------- random erasing


def test_erase_box_distribution_matches_torchvision():
    stats = pytest.importorskip("scipy.stats")
    h, w, n = 32, 48, 6000
    boxes = P.erase_boxes(_uniform(torch.arange(n), seed=11), 1.0, (0.02, 0.33), (0.3, 3.3), h, w)
    torch.manual_seed(0)
    ref = v2.RandomErasing(p=1.0)
    theirs = []
    for _ in range(n):
        p = ref.make_params([torch.zeros(3, h, w)])
        theirs.append((p["i"], p["j"], p["h"], p["w"]) if p["v"] is not None else (0, 0, 0, 0))
    theirs = torch.tensor(theirs)
    for name, f in (("area", lambda b: (b[:, 2] * b[:, 3]).double() / (h * w)),
                    ("aspect", lambda b: b[:, 2].double() / b[:, 3].clamp(min=1)),
                    ("top", lambda b: b[:, 0].double()), ("left", lambda b: b[:, 1].double())):
        mine_v, theirs_v = f(boxes[boxes[:, 2] > 0]), f(theirs[theirs[:, 2] > 0])
        p = stats.ks_2samp(mine_v.numpy(), theirs_v.numpy()).pvalue
        assert p > 0.01, f"{name}: KS p={p:.4f}"
    assert (boxes[:, 2] > 0).float().mean().item() == pytest.approx((theirs[:, 2] > 0).float().mean().item(), abs=0.02)
    fits = boxes[boxes[:, 2] > 0]
    assert (fits[:, 0] + fits[:, 2] <= h).all() and (fits[:, 1] + fits[:, 3] <= w).all() and (fits[:, 2] < h).all()


def test_erase_probability_and_batched_erase_equal_torchvision_erase():
    boxes = P.erase_boxes(_uniform(torch.arange(4000), seed=2), 0.25, (0.02, 0.33), (0.3, 3.3), 20, 20)
    assert (boxes[:, 2] > 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    x = torch.randn(6, 3, 20, 20)
    some = P.erase_boxes(_uniform(torch.arange(6), seed=5), 1.0, (0.02, 0.33), (0.3, 3.3), 20, 20)
    some[0] = 0  # one sample not erased
    got = P.erase(x.clone(), some, 0.5)
    for i in range(6):
        t, l, bh, bw = some[i].tolist()
        want = TF.erase(x[i], t, l, bh, bw, torch.tensor(0.5)) if bh else x[i]
        assert torch.equal(got[i], want)


def test_erasing_in_preprocess_writes_the_value_after_normalization():
    aug = AugmentConfig(erase_prob=1.0, erase_value=0.0)
    pre = Preprocess(3, 16, (0.5,) * 3, (0.25,) * 3, aug, seed=0, num_keys=10)
    out = pre(torch.full((4, 3, 16, 16), 200, dtype=torch.uint8), torch.arange(4), epoch=0, train=True)
    draws = Draws.hashed(aug, 0, 0, torch.arange(4), 16)
    for i in range(4):
        t, l, h, w = draws.erase[i].tolist()
        assert h > 0 and (out[i, :, t:t + h, l:l + w] == 0).all()
        assert (out[i] != 0).sum() == 3 * (16 * 16 - h * w)


def test_config_rejects_a_magnitude_outside_the_bins():
    from distcls.config import load
    from distcls.errors import ConfigError
    with pytest.raises(ConfigError, match="magnitude=31 must be below"):
        load(None, ["data.augment.policy=randaugment", "data.augment.magnitude=31"])
    with pytest.raises(ConfigError, match="must be one of"):
        load(None, ["data.augment.policy=augmix"])


def test_bicubic_geometry_stays_on_the_uint8_grid():
    """policy_interpolation=bicubic (torchvision's recipes with --interpolation bicubic): the kernel overshoots,
    the result is rounded and clamped back to 0..255, and it differs from bilinear."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 24, 20), generator=g).double()
    ops = torch.tensor([P.OP_ID[name] for name in P.GEOMETRIC] * 2)
    mags = torch.tensor([0.3, -0.2, 5.0, -4.0, 25.0, -0.3, 0.2, -5.0, 4.0, -25.0], dtype=torch.float64)
    bicubic = P.apply_ops(images.clone(), ops, mags, "bicubic")  # (it may write into its input)
    bilinear = P.apply_ops(images.clone(), ops, mags, "bilinear")
    assert bicubic.min() >= 0 and bicubic.max() <= 255 and torch.equal(bicubic, bicubic.round())
    assert not torch.equal(bicubic, bilinear)
    assert AugmentConfig(policy="trivialaugment", policy_interpolation="bicubic").policy_interpolation == "bicubic"
