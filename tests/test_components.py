"""The component builder: what a run, bench compare and the tests train with, built in one place."""
import torch

from distcls import config
from distcls.runtime import dist
from distcls.checkpoint.format import COMPONENTS
from distcls.run.components import DEBUG_STEPS_PER_EPOCH, LoaderSettings, build_components


def test_loader_settings_follow_the_config_and_debug():
    cfg = config.load(None, ["data.num_workers=3", "data.prefetch_factor=2"])
    assert LoaderSettings.from_config(cfg) == LoaderSettings(
        num_workers=3, prefetch_factor=2, gpu_decode=False, max_steps_per_epoch=None
    )
    assert LoaderSettings.from_config(cfg, debug=True) == LoaderSettings(0, 2, False, DEBUG_STEPS_PER_EPOCH)
    cfg = config.load(None, ["train.max_steps_per_epoch=7"])
    assert LoaderSettings.from_config(cfg, debug=True).max_steps_per_epoch == 7


def test_the_builder_wires_every_checkpoint_component_and_writes_nothing(tmp_path):
    cfg = config.load(None, [f"run.out_dir={tmp_path / 'run'}", "model.args.width=2", "train.max_steps_per_epoch=3",
                                   "train.ema.enabled=true"])
    parts = build_components(cfg, dist.detect(cfg.dist.device, cfg.dist.backend))
    assert parts.train.sampler.steps_per_epoch == parts.progress.steps_per_epoch == 3
    # model, optimizer, scheduler, scaler, rng, progress, ema
    assert set(parts.checkpointer.components) == set(COMPONENTS)
    # saved, and updated by the step hook
    assert parts.checkpointer.components["ema"] is parts.ema is parts.trainer.hooks[0].ema
    # and evaluated
    assert [t.prefix for t in parts.targets] == ["", "ema_"] and parts.targets[1].module is parts.ema.module
    plain = build_components(
        config.load(None, [f"run.out_dir={tmp_path / 'run'}", "model.args.width=2"]), dist.detect("cpu", "auto")
    )
    # train.ema off: no entry
    assert set(plain.checkpointer.components) == set(COMPONENTS) - {"ema"} and plain.ema is None
    assert [t.prefix for t in plain.targets] == [""] and plain.trainer.hooks == []
    assert parts.checkpointer.before_save == parts.trainer.check_diverged  # a save first checks the unread steps
    assert parts.module is parts.model and parts.trainer.module is parts.module  # one process: no DDP wrapper
    assert parts.val is not None and len(parts.loaders) == 3
    assert not (tmp_path / "run").exists()
    again = build_components(cfg, dist.detect(cfg.dist.device, cfg.dist.backend))  # seeded: the same initial weights
    assert all(
        torch.equal(a, b) for a, b in zip(parts.module.state_dict().values(), again.module.state_dict().values())
    )
