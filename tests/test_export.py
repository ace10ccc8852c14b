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
from distcls.checkpoint.restore import restore

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
    assert (
        f"wrote {out} ({fmt}): input uint8 [N, 1, 8, 8] (0..255, batch N dynamic), output float32 logits [N, 10]"
        in printed
    )
    assert (
        "check: max abs difference of the logits from the eager model" in printed
        and "on 16 val images of digits" in printed
    )
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
    assert (
        export.main(["--checkpoint", str(checkpoint), "--format", "exported", "--out", str(out), "--check-images", "0"])
        == 0
    )
    restored, images = _real_images(checkpoint, 8)
    mean, std = torch.tensor(restored.spec.mean).view(1, -1, 1, 1), torch.tensor(restored.spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        want = restored.model.eval()((images.float() / 255 - mean) / std)
        got = _load("exported", out)(images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if all(importlib.util.find_spec(n) for n in export.ONNX_PACKAGES):
        import onnxruntime
        onnx_file = tmp_path / "m.onnx"
        assert (
            export.main(
                ["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(onnx_file), "--check-images", "0"]
            )
            == 0
        )
        (inp,) = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).get_inputs()
        assert (
            inp.name == "images"
            and inp.type == "tensor(uint8)"
            and inp.shape[1:] == [1, 8, 8]
            and not isinstance(inp.shape[0], int)
        )


def _one_line_error(capsys, argv, *fragments):
    assert run_cli(export.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distcls: error: "), err
    for f in fragments:
        assert f in err[0]


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, checkpoint, capsys, monkeypatch):
    ck = ["--checkpoint", str(checkpoint)]
    _one_line_error(capsys, [*ck, "--format", "exported", "--out", str(tmp_path / "m.ts")], "must end in .pt2")
    _one_line_error(
        capsys,
        [*ck, "--format", "torchscript", "--out", str(tmp_path / "no/dir/m.ts")],
        "does not exist; create it first",
    )
    _one_line_error(capsys, [*ck, "--format", "torchscript", "--out", str(tmp_path)], "is a directory")
    _one_line_error(capsys, [*ck, "--format", "tflite", "--out", str(tmp_path / "m")], "invalid choice: 'tflite'")
    _one_line_error(
        capsys,
        ["--checkpoint", str(tmp_path / "none.pt"), "--format", "torchscript", "--out", str(tmp_path / "m.ts")],
        "does not exist",
    )
    _one_line_error(
        capsys,
        [*ck, "--format", "torchscript", "--out", str(tmp_path / "m.ts"), "data.name=synthetic"],
        "10 classes",
        "--check-images 0",
    )
    _one_line_error(
        capsys,
        [*ck, "--format", "torchscript", "--out", str(tmp_path / "m.ts"), "--tolerance", "-1"],
        "--tolerance must be a positive",
    )
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a)
    )
    _one_line_error(
        capsys,
        [*ck, "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
        "needs the packages onnxscript",
        "pip install 'distcls[export]'",
    )
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_leaves_nothing_behind(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(export, "ExportedClassifier", _Off)
    _one_line_error(
        capsys,
        ["--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(tmp_path / "m.ts")],
        "differs from the eager one by up to",
        "nothing was written",
    )
    assert list(tmp_path.iterdir()) == []


class _Off(export.ExportedClassifier):
    """A wrong export: the logits shifted by 0.5 (what a forgotten normalization detail looks like to the check)."""

    def forward(self, images):
        return super().forward(images) + 0.5


def test_an_out_name_too_long_for_the_filesystem_is_one_line_and_a_long_legal_one_exports(tmp_path, checkpoint, capsys):
    """--out with a 300-byte name raised OSError (File name too long) from is_dir; a legal 250-byte one
    failed in the staging folder's name (.NAME.xxxxxxxx, over 255 bytes)."""
    ck = ["--checkpoint", str(checkpoint), "--format", "torchscript", "--check-images", "0"]
    _one_line_error(
        capsys, [*ck, "--out", str(tmp_path / ("a" * 300 + ".ts"))], "is 303 bytes long", "choose a shorter path"
    )
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / ("b" * 247 + ".ts")
    assert export.main([*ck, "--out", str(out)]) == 0
    assert list(tmp_path.iterdir()) == [out] and _load("torchscript", out)(
        torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    ).shape == (1, 10)


# --------------------------------------------------------------------------- what --out may name


def test_out_never_names_the_checkpoint_being_read(tmp_path, checkpoint, capsys):
    """`--out CHECKPOINT` replaced the checkpoint with the ONNX file (exit 0): any spelling of the same file is
    refused."""
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    ck = run / "best.pt"
    ck.write_bytes(checkpoint.read_bytes())
    before = ck.read_bytes()
    (tmp_path / "link.onnx").symlink_to(ck)
    (tmp_path / "hard.ts").hardlink_to(ck)
    for fmt, out in [
        ("onnx", ck),
        ("torchscript", run / ".." / "checkpoints" / "best.pt"),
        ("onnx", tmp_path / "link.onnx"),
        ("torchscript", tmp_path / "hard.ts"),
    ]:
        _one_line_error(
            capsys,
            ["--checkpoint", str(ck), "--format", fmt, "--out", str(out)],
            "is the checkpoint being exported",
            "choose another name",
        )
    assert ck.read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["best.pt"]


def test_out_replaces_only_an_earlier_export_of_the_same_format(tmp_path, checkpoint, capsys):
    ck = ["--checkpoint", str(checkpoint), "--check-images", "0"]
    other_checkpoint = tmp_path / "other.ts"
    other_checkpoint.write_bytes(checkpoint.read_bytes())  # a checkpoint under an export's name
    notes = tmp_path / "notes.ts"
    notes.write_text("my notes\n")
    _one_line_error(
        capsys,
        [*ck, "--format", "torchscript", "--out", str(other_checkpoint)],
        "exists and is a distcls/torch checkpoint",
    )
    _one_line_error(
        capsys, [*ck, "--format", "torchscript", "--out", str(notes)], "exists and is not a model file distcls wrote"
    )
    assert notes.read_text() == "my notes\n"
    ts, pt2 = tmp_path / "m.ts", tmp_path / "m.pt2"
    assert export.main([*ck, "--format", "torchscript", "--out", str(ts)]) == 0
    # again: an earlier torchscript export is replaced
    assert export.main([*ck, "--format", "torchscript", "--out", str(ts)]) == 0
    assert export.main([*ck, "--format", "exported", "--out", str(pt2)]) == 0
    capsys.readouterr()
    pt2_as_ts = tmp_path / "x.pt2"
    pt2_as_ts.write_bytes(ts.read_bytes())
    _one_line_error(capsys, [*ck, "--format", "exported", "--out", str(pt2_as_ts)], "exists and is a TorchScript model")


def test_out_is_never_a_device_or_fifo(tmp_path, checkpoint, capsys):
    import os
    import stat
    ck = ["--checkpoint", str(checkpoint), "--format", "torchscript", "--check-images", "0"]
    # (never the system's /dev/null itself: were this to regress, the test would replace it)
    fifo = tmp_path / "pipe.ts"
    os.mkfifo(fifo)
    _one_line_error(capsys, [*ck, "--out", str(fifo)], "is a FIFO, not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    node = tmp_path / "null.ts"
    try:  # a copy of /dev/null's node (root): refused, not replaced
        os.mknod(node, 0o666 | stat.S_IFCHR, os.stat(os.devnull).st_rdev)
    except PermissionError:
        pytest.skip("making a device node needs root (the FIFO above was checked)")
    else:
        _one_line_error(capsys, [*ck, "--out", str(node)], "is a device, not a regular file")
        assert stat.S_ISCHR(os.stat(node).st_mode)


def test_a_directory_that_refuses_new_files_is_one_line_before_the_work(tmp_path, checkpoint, capsys, monkeypatch):
    """/proc passes os.access(W_OK) as root but refuses new entries: the staging folder is made first."""
    import os
    if not (os.path.isdir("/proc") and os.access("/proc", os.W_OK)):
        pytest.skip("needs a /proc that os.access calls writable (root)")
    called = []
    monkeypatch.setattr("distcls.checkpoint.restore.restore", lambda *a, **k: called.append(1))
    _one_line_error(capsys, ["--checkpoint", str(checkpoint), "--format", "torchscript", "--out", "/proc/m.ts"],
                    "cannot create files in /proc")
    assert not called  # the checkpoint was not even read


def test_a_full_disk_is_one_line_exit_5_and_leaves_nothing(tmp_path, checkpoint, capsys):
    """On a 64 KiB tmpfs torchscript/exported aborted in C++ (exit 134) and onnx gave a traceback, the staging folder
    left behind."""
    import os
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        formats = ["torchscript", "exported"] + (
            ["onnx"] if all(importlib.util.find_spec(n) for n in export.ONNX_PACKAGES) else []
        )
        for fmt in formats:
            out = disk / f"m{SUFFIX[fmt]}"
            assert run_cli(export.main, ["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]) == 5, fmt
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(
                f"distcls: error: could not write {out}: No space left on device"
            ), err
            assert "nothing was written" in err[0]
            assert list(disk.iterdir()) == [], fmt
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_model_the_format_cannot_capture_is_one_line(tmp_path, capsys):
    out_dir = tmp_path / "run"
    train_in_process(out_dir, "model.name=branching_model:build", "train.epochs=1", "train.max_steps_per_epoch=2")
    ck = ["--checkpoint", str(out_dir / "checkpoints/last.pt"), "model.name=branching_model:build"]
    formats = ["exported"] + (["onnx"] if all(importlib.util.find_spec(n) for n in export.ONNX_PACKAGES) else [])
    for fmt in formats:
        _one_line_error(
            capsys,
            [*ck, "--format", fmt, "--out", str(tmp_path / f"m{SUFFIX[fmt]}")],
            f"--format {fmt} cannot capture model branching_model:build",
            "try --format torchscript",
            "nothing was written",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("when", ["restore", "written"])
def test_an_export_stopped_by_a_signal_leaves_no_staging_folder_and_stale_ones_go(
    tmp_path, checkpoint, capsys, monkeypatch, when
):
    """SIGTERM during the export left `.NAME.<random>/` (45.7 MB for ResNet-18) that nothing removed; one
    while the checkpoint loaded was reported as a corrupt checkpoint (torch's `except Exception` caught it)."""
    import os
    import signal as signal_mod
    from distcls.checkpoint import restore as restore_mod
    out = tmp_path / "m.ts"
    prefix = export._staging_prefix(out)
    stale = tmp_path / f"{prefix}{2 ** 22 + 12345}.abcdefgh"  # a pid above Linux's pid_max: a process that is gone
    alive = tmp_path / f"{prefix}{os.getppid()}.abcdefgh"  # a running process's: another export of the same file
    other = tmp_path / f"{prefix}{2 ** 22 + 12346}.user-data"  # not mkdtemp's name: not an export's
    foreign = tmp_path / f"{prefix}{2 ** 22 + 12347}.ijklmnop"  # an export's name, but something else in it
    for folder in (stale, alive, other, foreign):
        folder.mkdir()
        (folder / "m.ts").write_bytes(b"partial")
    (foreign / "notes.txt").write_text("mine")
    if when == "restore":  # the signal comes while the checkpoint is read (inside torch.load's own try/except)
        real_load = torch.load
        monkeypatch.setattr(
            torch, "load", lambda *a, **k: (os.kill(os.getpid(), signal_mod.SIGTERM), real_load(*a, **k))[1]
        )
    else:  # the staged file is complete, the check not yet done
        real_write = export.EXPORTERS["torchscript"][0]

        def write_then_terminated(module, example, path, meta):
            real_write(module, example, path, meta)
            os.kill(os.getpid(), signal_mod.SIGTERM)

        monkeypatch.setitem(
            export.EXPORTERS, "torchscript", (write_then_terminated, export.EXPORTERS["torchscript"][1])
        )
    before = {
        sig: signal_mod.getsignal(sig)
        for sig in (signal_mod.SIGTERM, signal_mod.SIGINT, signal_mod.SIGHUP, signal_mod.SIGUSR1)
    }
    code = run_cli(export.main, ["--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(out)])
    assert code == 128 + signal_mod.SIGTERM
    assert capsys.readouterr().err.strip() == "distcls: stopped: export interrupted by SIGTERM; nothing was written"
    # only the stale one removed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, foreign.name])
    assert {sig: signal_mod.getsignal(sig) for sig in before} == before  # the handlers given back
    assert restore_mod is not None


def test_signal_handlers_are_given_back_after_an_early_error(tmp_path, checkpoint, capsys):
    import signal as signal_mod
    before = signal_mod.getsignal(signal_mod.SIGTERM)
    _one_line_error(
        capsys,
        [
            "--checkpoint",
            str(checkpoint),
            "--format",
            "torchscript",
            "--out",
            str(tmp_path / "m.ts"),
            "data.name=synthetic",
        ],
        "10 classes",
    )
    assert signal_mod.getsignal(signal_mod.SIGTERM) is before


@pytest.mark.parametrize("fmt", ["torchscript", "exported", "onnx"])
def test_an_export_describes_itself_and_predict_runs_it_as_the_checkpoint(tmp_path, checkpoint, fmt, capsys):
    """Class names, sizes, resize and interpolation inside the file (ONNX metadata_props read with onnx's API;
    TorchScript/torch.export extra files); `predict --model FILE` gives the checkpoint's answers."""
    import json

    from PIL import Image
    from sklearn.datasets import load_digits
    from conftest import cli_in_process
    if fmt == "onnx":
        for name in export.ONNX_PACKAGES:
            pytest.importorskip(name)
    out = tmp_path / f"model{SUFFIX[fmt]}"
    assert (
        export.main(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out), "--check-images", "0"]) == 0
    )
    if fmt == "onnx":
        import onnx
        props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
        meta = {k.removeprefix("distcls."): v for k, v in props.items()}
    else:
        meta = export.read_metadata(out)
    assert meta["class_names"] == [str(i) for i in range(10)] and (
        meta["channels"],
        meta["image_size"],
        meta["resize"],
    ) == (1, 8, 8)
    assert meta["interpolation"] == "bilinear" and "uint8 [N, 1, 8, 8]" in meta["input"] and len(meta["mean"]) == 1
    images = tmp_path / "images"
    images.mkdir()
    for i, digit in enumerate(load_digits().images[:6]):
        Image.fromarray((digit * 255 / 16).astype("uint8")).save(images / f"{i}.png")
    answers = {}
    for source in (["--checkpoint", checkpoint], ["--model", out]):
        proc = cli_in_process(capsys, "predict", [*source, "--json", "--top-k", "3", images])
        assert proc.returncode == 0, proc.stderr
        answers[source[0]] = [json.loads(line) for line in proc.stdout.splitlines()]
    for a, b in zip(answers["--checkpoint"], answers["--model"], strict=True):
        assert a["path"] == b["path"] and [g["label"] for g in a["top_k"]] == [g["label"] for g in b["top_k"]]
        assert all(abs(g["prob"] - h["prob"]) <= 1e-4 for g, h in zip(a["top_k"], b["top_k"]))
    if fmt == "torchscript":
        from conftest import assert_user_error

        assert_user_error(
            cli_in_process(capsys, "predict", ["--model", checkpoint, images]), "is not a file distcls.export writes"
        )
        assert_user_error(
            cli_in_process(capsys, "predict", ["--model", out, "--ema", images]),
            "--ema and --override apply to --checkpoint",
        )
