"""Config: typed dot-path overrides, validation of every key/type/range, YAML errors."""
import pytest

from distcls import config
from distcls.errors import ConfigError
from conftest import ROOT


def test_overrides_are_typed_by_the_schema():
    cfg = config.load(None, ["optim.lr=1", "train.epochs=3", "data.split=[0.8, 0.1, 0.1]", "train.clip_grad_norm=null",
                             "data.augment.hflip=true", "model.args.width=8"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3 and cfg.data.split == [0.8, 0.1, 0.1]
    assert cfg.train.clip_grad_norm is None and cfg.data.augment.hflip is True
    assert cfg.model.args == {"width": 8}
    assert config.load(None, ["optim.lr=1e-4"]).optim.lr == 1e-4  # YAML 1.1 would read a string


def test_default_yaml_is_the_builtin_default():
    assert config.load(str(ROOT / "configs" / "default.yaml")) == config.load()


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=0.1", "did you mean 'optim.lr'"),
    ("optimizer.lr=0.1", "unknown config key 'optimizer'"),
    ("train.epochs=two", "'train.epochs' must be an integer"),
    ("train.epochs=0", "'train.epochs' must be >= 1"),
    ("optim.lr=0", "'optim.lr' must be > 0"),
    ("train.amp=fp8", "must be one of none | bf16 | fp16"),
    ("data.split=[0.5, 0.5, 0.5]", "summing to 1"),
    ("train.accum_steps=3", "split evenly over 1 processes x 3 accumulation steps"),
    ("data.mean=[0.5]", "set both data.mean and data.std"),
    ("train.sync_bn=1", "must be true or false"),
    ("data", "not of the form key.sub=value"),
    ("data.augment=3", "is a section"),
])
def test_bad_values_are_errors_that_say_what_to_do(override, fragment):
    with pytest.raises(ConfigError, match=".*") as info:
        config.load(None, [override])
    assert fragment in str(info.value)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  name: digits\n   batch_size: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        config.load(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load(str(listy))
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path / "missing.yaml"))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        config.load(str(unknown))


def test_every_key_is_described():
    rows = config.describe()
    keys = {r[0] for r in rows}
    assert {"data.batch_size", "train.amp", "model.cifar_stem", "checkpoint.every_steps", "dist.timeout_s"} <= keys
    assert all(help for _, _, help in rows)


def test_yaml_alias_bombs_and_huge_values_make_a_short_error(tmp_path):
    """A 7-line YAML alias bomb gave a 58 MB error line and 1.44 GB of memory."""
    levels = ['&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 6)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("data:\n  mean: [" + ",\n    ".join(levels) + "]\n")  # 9**6 = 531,441 strings in l5 once expanded
    with pytest.raises(ConfigError) as info:
        config.load(str(bomb))
    assert "expands to more than 100,000 values through YAML aliases" in str(info.value) and len(str(info.value)) < 400
    huge = tmp_path / "huge.yaml"
    huge.write_text(f"optim:\n  lr: \"{'z' * 100_000}\"\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(huge))
    message = str(info.value)
    assert len(message) <= 2000 and message.startswith("config key 'optim.lr' must be a number")
    assert "characters left out" in message


def test_deeply_nested_values_make_a_short_error_not_a_recursion_traceback(tmp_path):
    """A value nested thousands of levels deep ([[[[...]]]]) made PyYAML raise RecursionError: a traceback."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("data:\n  mean: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="config file .*deep.yaml nests its values too deeply"):
        config.load(str(deep))
    with pytest.raises(ConfigError, match=r"override data.mean=\.\.\. nests its value too deeply"):
        config.load(None, ["data.mean=" + "[" * 5000 + "]" * 5000])


def test_a_key_written_twice_in_a_section_is_an_error_not_silently_dropped(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `augment:` line silently dropped the first's keys."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("data:\n  name: synthetic\n  augment: {hflip: true}\n  augment: {policy: trivialaugment}\n")
    with pytest.raises(
        ConfigError, match="dup.yaml is not valid YAML at line 4, column 3: the key 'augment' is written twice"
    ):
        config.load(str(dup))
    merged = tmp_path / "merge.yaml"  # a merge key's values may be overridden: that is what it is for
    merged.write_text("data:\n  <<: {name: synthetic, batch_size: 8}\n  batch_size: 16\n")
    assert config.load(str(merged)).data.batch_size == 16


def test_exponent_numbers_in_lists_are_numbers_as_in_scalars(tmp_path):
    """PyYAML reads `2e-2` (no dot) as a string: scalars took it, list keys said "must be 2 numbers"."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "data:\n  augment:\n    erase_scale: [2e-2, 0.33]\n  mean: [5e-1]\n  std: [25e-2]\noptim:\n  lr: 1e-1\n  "
        "betas: [9e-1, 0.999]\n"
    )
    cfg = config.load(str(path))
    assert cfg.data.augment.erase_scale == [0.02, 0.33] and cfg.data.mean == [0.5] and cfg.data.std == [0.25]
    assert cfg.optim.betas == [0.9, 0.999] and cfg.optim.lr == 0.1
    assert all(isinstance(v, float) for v in [*cfg.data.augment.erase_scale, *cfg.data.mean, *cfg.optim.betas])
    assert config.load(None, ["data.augment.erase_scale=[2e-2,0.4]"]).data.augment.erase_scale == [0.02, 0.4]
    with pytest.raises(ConfigError, match="'data.augment.erase_scale' must be 2 numbers"):
        config.load(None, ["data.augment.erase_scale=[2e-2,abc]"])


def test_what_a_resume_refuses_is_metadata_on_the_schema_and_every_marked_key_is_checked():
    """The refusals derive from the fields' `resume=` marks (a hand-kept table named a key that did not exist)."""
    import copy

    from distcls.run import checks
    keys = {kind: config.resume_keys(kind) for kind in config.RESUME_KINDS}
    described = {path for path, _, _ in config.describe()}
    assert (
        all(set(v) <= described for v in keys.values())
        and "data.batch_size" in keys["position"]
        and "optim.lr" in keys["schedule"]
    )
    saved = config.load(None, ["data.name=synthetic", "train.ema.enabled=true"]).to_dict()
    for key in [*keys["position"], *keys["best"], *keys["ema_rule"], *keys["schedule"]]:
        if key == "data.carve_val":  # an image folder's key: compared for image folders only
            saved["data"]["name"] = "imagefolder"
        current = copy.deepcopy(saved)
        *sections, name = key.split(".")
        node = current
        for section in sections:
            node = node[section]
        node[name] = "changed" if not isinstance(node[name], bool) else not node[name]
        assert [k for k, _, _ in checks.changed_resume_keys(saved, current)] == [key], key
        saved["data"]["name"] = "synthetic"
