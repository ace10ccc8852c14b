"""python -m distcls.export: each format reloads and agrees with the eager model on real validation
images (digits, offline), takes uint8 [N, C, S, S] with a dynamic batch, has its normalization
baked in, and every bad input is one line with exit 2 and nothing written."""
import importlib.util

import pytest
import torch

from conftest import train_in_process
from distcls import export
from distcls.cli import run_cli
from distcls.data import build_data, eval_loader
from distcls.inference import restore

# the stated tolerance of each format on real images (the CLI's default --tolerance is 1e-3)
TOLERANCE = {"torchscript": 1e-5, "exported": 1e-5, "onnx": 1e-4}
SUFFIX = {"torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """cnn3 with BatchNorm on digits (1 channel, 8x8): eval mode matters, the data is bundled."""
    out = tmp_path_factory.mktemp("exp") / "run"
    train_in_process(out, "model.args.batch_norm=true", "train.epochs=1", "train.max_steps_per_epoch=3")
    return out / "checkpoints" / "last.pt"


def _real_images(ckpt, n):
    restored = restore(str(ckpt), torch.device("cpu"))
    view = build_data(restored.cfg).splits.val.truncated(n)
    return restored, next(iter(eval_loader(view, n, 1, 0, torch.device("cpu")))).images


def _load(fmt, path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    return export.EXPORTERS[fmt][1](path)


@pytest.mark.parametrize("fmt", ["torchscript", "exported", "onnx"])
def test_export_reloads_and_agrees_with_eager(tmp_path, checkpoint, fmt, capsys):
    if fmt == "onnx":
        for name in export.ONNX_PACKAGES:
            pytest.importorskip(name)
    out = tmp_path / f"model{SUFFIX[fmt]}"
    assert export.main(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} ({fmt}): input uint8 [N, 1, 8, 8] (0..255, batch N dynamic), output float32 logits [N, 10]" in printed
    assert "check: max abs difference of the logits from the eager model" in printed and "on 16 val images of digits" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no staging directory left
    model = _load(fmt, out)
    restored, images = _real_images(checkpoint, 24)
    with torch.no_grad():
        eager = restored.model(restored.preprocess(images, torch.arange(len(images)), 0, train=False))
        for rows in (slice(0, 1), slice(0, 5), slice(0, 24)):  # dynamic batch: 1, 5 and 24 images
            got = model(images[rows].contiguous())
            assert got.dtype == torch.float32 and got.shape == (len(images[rows]), 10)
            assert (got - eager[rows]).abs().max().item() <= TOLERANCE[fmt]


def test_the_input_contract_uint8_0_255_normalization_baked_in(tmp_path, checkpoint):
    """Independent of Preprocess: logits(uint8 x) == network((x / 255 - mean) / std) in eval mode."""
    out = tmp_path / "m.pt2"
    assert export.main(["--checkpoint", str(checkpoint), "--format", "exported", "--out", str(out), "--check-images", "0"]) == 0
    restored, images = _real_images(checkpoint, 8)
    mean, std = torch.tensor(restored.spec.mean).view(1, -1, 1, 1), torch.tensor(restored.spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        want = restored.model.eval()((images.float() / 255 - mean) / std)
        got = _load("exported", out)(images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if all(importlib.util.find_spec(n) for n in export.ONNX_PACKAGES):
        import onnxruntime
        onnx_file = tmp_path / "m.onnx"
        assert export.main(["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(onnx_file), "--check-images", "0"]) == 0
        (inp,) = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).get_inputs()
        assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [1, 8, 8] and not isinstance(inp.shape[0], int)


def _one_line_error(capsys, argv, *fragments):
    assert run_cli(export.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distcls: error: "), err
    for f in fragments:
        assert f in err[0]


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, checkpoint, capsys, monkeypatch):
    ck = ["--checkpoint", str(checkpoint)]
    _one_line_error(capsys, [*ck, "--format", "exported", "--out", str(tmp_path / "m.ts")], "must end in .pt2")
    _one_line_error(capsys, [*ck, "--format", "torchscript", "--out", str(tmp_path / "no/dir/m.ts")], "does not exist; create it first")
    _one_line_error(capsys, [*ck, "--format", "torchscript", "--out", str(tmp_path)], "is a directory")
    _one_line_error(capsys, [*ck, "--format", "tflite", "--out", str(tmp_path / "m")], "invalid choice: 'tflite'")
    _one_line_error(capsys, ["--checkpoint", str(tmp_path / "none.pt"), "--format", "torchscript", "--out", str(tmp_path / "m.ts")], "does not exist")
    _one_line_error(capsys, [*ck, "--format", "torchscript", "--out", str(tmp_path / "m.ts"), "data.name=synthetic"], "10 classes", "--check-images 0")
    _one_line_error(capsys, [*ck, "--format", "torchscript", "--out", str(tmp_path / "m.ts"), "--tolerance", "-1"], "--tolerance must be a positive")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    _one_line_error(capsys, [*ck, "--format", "onnx", "--out", str(tmp_path / "m.onnx")], "needs the packages onnxscript", "pip install 'distcls[export]'")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_leaves_nothing_behind(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(export, "ExportedClassifier", _Off)
    _one_line_error(capsys, ["--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(tmp_path / "m.ts")],
                    "differs from the eager one by up to", "nothing was written")
    assert list(tmp_path.iterdir()) == []


class _Off(export.ExportedClassifier):
    """A wrong export: the logits shifted by 0.5 (what a forgotten normalization detail looks like to the check)."""

    def forward(self, images):
        return super().forward(images) + 0.5


def test_an_out_name_too_long_for_the_filesystem_is_one_line_and_a_long_legal_one_exports(tmp_path, checkpoint, capsys):
    """--out with a 300-byte name raised OSError (File name too long) from is_dir; a legal 250-byte one
    failed in the staging folder's name (.NAME.xxxxxxxx, over 255 bytes)."""
    ck = ["--checkpoint", str(checkpoint), "--format", "torchscript", "--check-images", "0"]
    _one_line_error(capsys, [*ck, "--out", str(tmp_path / ("a" * 300 + ".ts"))], "is 303 bytes long", "choose a shorter path")
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / ("b" * 247 + ".ts")
    assert export.main([*ck, "--out", str(out)]) == 0
    assert list(tmp_path.iterdir()) == [out] and _load("torchscript", out)(torch.zeros(1, 1, 8, 8, dtype=torch.uint8)).shape == (1, 10)
