"""Keyed Mixup/CutMix: soft targets, CutMix's lambda = the box's area, world-size invariance."""
import types

import pytest
import torch
import torch.nn.functional as F

from distcls.config import MixConfig, load
from distcls.data.transforms.mix import Mix
from distcls.engine.loss import TrainingLoss
from distcls.errors import ConfigError

C = 10


def _mix(mixup=0.0, cutmix=0.0, prob=1.0, switch=0.5, mode="pair", smoothing=0.0, size=16, seed=0, n=64):
    return Mix.from_config(MixConfig(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch, mode=mode),
                           smoothing, C, size, seed, n)


def _batch(b=16, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, 3, size, size, generator=g),
        torch.randint(0, C, (b,), generator=g),
        torch.randperm(64, generator=g)[:b],
    )


@pytest.mark.parametrize("mode", ["pair", "elem"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_targets_sum_to_one_and_mix_the_partners_labels(mode, smoothing):
    mix = _mix(mixup=0.2, cutmix=1.0, mode=mode, smoothing=smoothing)
    x, y, keys = _batch()
    _, t = mix(x.clone(), y, keys, epoch=1)
    assert torch.allclose(t.sum(1), torch.ones(len(y)), atol=1e-6) and (t >= 0).all()
    partner = torch.arange(len(y)) ^ 1
    support = t > smoothing / C + 1e-6
    for i in range(len(y)):
        assert set(torch.nonzero(support[i]).flatten().tolist()) <= {int(y[i]), int(y[partner[i]])}


def test_cutmix_lambda_equals_the_kept_area_fraction():
    mix = _mix(cutmix=1.0)
    b, size = 32, 16
    y = torch.arange(b) % C
    y[1::2] = (y[0::2] + 1) % C  # partners have different labels
    keys = torch.arange(b)
    own = torch.arange(b, dtype=torch.float32).view(-1, 1, 1, 1).expand(b, 3, size, size).contiguous()
    out, t = mix(own.clone(), y, keys, epoch=0)
    partner = torch.arange(b) ^ 1
    kept = (out == own).float().mean(dim=(1, 2, 3))
    pasted = (out == own[partner]).float().mean(dim=(1, 2, 3))
    assert torch.allclose(kept + pasted, torch.ones(b))
    lam = t[torch.arange(b), y]
    assert torch.allclose(lam, kept, atol=1e-6)
    assert (kept < 1).sum() > b // 2  # boxes were pasted
    assert torch.equal(kept[0::2], kept[1::2])  # pair mode: one box, both ways


def test_mixup_blends_images_and_targets_with_one_lambda_per_pair():
    mix = _mix(mixup=0.4)
    x, y, keys = _batch()
    y[1::2] = (y[0::2] + 3) % C
    out, t = mix(x.clone(), y, keys, epoch=2)
    partner = torch.arange(len(y)) ^ 1
    lam = t[torch.arange(len(y)), y]
    assert torch.allclose(out, x * lam.view(-1, 1, 1, 1) + x[partner] * (1 - lam.view(-1, 1, 1, 1)), atol=1e-6)
    assert torch.allclose(lam[0::2], lam[1::2])
    assert ((lam > 0) & (lam < 1)).all()


def test_mixing_at_world_size_two_equals_world_size_one():
    """Each rank mixes its contiguous even slice of the global batch: the same pairs and keys."""
    for kwargs in (dict(mixup=0.2, cutmix=1.0), dict(mixup=0.8, cutmix=1.0, mode="elem", prob=0.7)):
        mix = _mix(**kwargs, smoothing=0.1)
        x, y, keys = _batch(b=24)
        one_x, one_t = mix(x.clone(), y, keys, epoch=4)
        for world in (2, 4):
            per = len(y) // world
            parts = [
                mix(
                    x[r * per : (r + 1) * per].clone(),
                    y[r * per : (r + 1) * per],
                    keys[r * per : (r + 1) * per],
                    epoch=4,
                )
                for r in range(world)
            ]
            assert torch.equal(torch.cat([p[0] for p in parts]), one_x)
            assert torch.equal(torch.cat([p[1] for p in parts]), one_t)


def test_the_cpu_rows_path_equals_the_whole_batch_path():
    mix = _mix(mixup=0.4, cutmix=1.0, prob=0.8)
    x, y, keys = _batch(b=32)
    t = mix.table(3, x.device)
    pos = torch.arange(32)
    lam, box = t.lam[keys[pos & ~1]], t.box[keys[pos & ~1]]
    cut = (box[:, 1] > box[:, 0]) & (box[:, 3] > box[:, 2])
    assert cut.any() and (~cut & (lam < 1)).any() and (lam == 1).any()
    assert torch.equal(
        Mix._mix_rows(x.clone(), pos ^ 1, lam, cut, box), Mix._mix_all(x.clone(), pos ^ 1, lam, cut, box)
    )


def test_lambda_follows_beta_and_prob_switch_prob_hold():
    stats = pytest.importorskip("scipy.stats")
    n = 20000
    mix = _mix(mixup=0.2, cutmix=1.0, prob=0.6, switch=0.3, n=n)
    table = mix.hashed(0, torch.arange(n))
    assert table.mixed.float().mean().item() == pytest.approx(0.6, abs=0.015)
    cut = table.mixed & (table.box[:, 1] > table.box[:, 0])
    assert (cut.sum() / table.mixed.sum()).item() == pytest.approx(0.3, abs=0.03)
    mixup_lam = table.lam[table.mixed & ~cut & (table.box.sum(1) == 0)]
    assert stats.kstest(mixup_lam.numpy(), stats.beta(0.2, 0.2).cdf).pvalue > 0.01


def test_unmixed_soft_targets_give_the_label_smoothing_loss():
    logits = torch.randn(8, C)
    y = torch.randint(0, C, (8,))
    mix = _mix(mixup=0.2, prob=0.0, smoothing=0.1)
    _, t = mix(torch.randn(8, 3, 16, 16), y, torch.arange(8), epoch=0)
    loss = TrainingLoss(0.1)
    assert torch.allclose(loss(logits, t), F.cross_entropy(logits, y, label_smoothing=0.1), atol=1e-6)
    assert loss.correct(logits, t) == (logits.argmax(1) == y).sum()


def test_an_odd_per_rank_batch_is_a_clear_error():
    from distcls.train import check_launch
    cfg = load(None, ["data.mix.cutmix_alpha=1.0", "data.batch_size=6"])
    env = types.SimpleNamespace(world_size=2, distributed=True, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="even share of data.batch_size=6; use a multiple of 4"):
        check_launch(cfg, env)
    check_launch(load(None, ["data.mix.cutmix_alpha=1.0", "data.batch_size=8"]), env)
