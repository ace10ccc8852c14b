"""evaluate and predict on a trained checkpoint, as a user runs them."""
import json

import pytest
from PIL import Image

import fakedata
from conftest import assert_ok, assert_user_error, cli_in_process, run_distcls, train_in_process


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    summary = train_in_process(out, "train.epochs=3")
    return out, summary


def test_evaluate_reproduces_the_training_test_accuracy(trained, tmp_path, capfd):
    out, summary = trained
    proc = cli_in_process(
        capfd, "evaluate", ["--checkpoint", out / "checkpoints/last.pt", "--out-dir", tmp_path / "eval"]
    )
    assert_ok(proc)
    assert f"test accuracy {summary['test_acc']:.4f}" in proc.stdout
    report = json.loads((tmp_path / "eval/eval_test.json").read_text())
    assert report["count"] == 180 and sum(map(sum, report["confusion"])) == 180
    assert report["acc"] == pytest.approx(summary["test_acc"])
    for name in ("confusion_test.png", "per_class_test.png", "samples_test.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-5 accuracy" in proc.stdout and "images/s at batch 32; latency at batch 1: median" in proc.stdout


def in_process(module: str, args, capfd) -> tuple:
    """(exit code, stdout, stderr) of `python -m distcls.<module> args`, run in this process."""
    proc = cli_in_process(capfd, module, args)
    return proc.returncode, proc.stdout, proc.stderr


def test_evaluate_json_report(trained, capfd):
    out, summary = trained
    code, stdout, _ = in_process("evaluate", ["--checkpoint", out / "checkpoints/last.pt", "--json"], capfd)
    assert code == 0
    report = json.loads(stdout)  # stdout is the JSON report and nothing else
    assert report["acc"] == summary["test_acc"] and report["count"] == 180 and report["world_size"] == 1
    assert report["acc"] <= report["top5_acc"] <= 1.0
    assert report["per_class_acc"] == pytest.approx(summary["per_class_test_acc"])
    assert sum(report["per_class_count"].values()) == 180
    speed = report["speed"]
    assert speed["batch_size"] == 32 and speed["images_per_sec"] > 0 and speed["device"].startswith("cpu")
    assert 0 < speed["latency_ms_batch1"]["median"] <= speed["latency_ms_batch1"]["p95"]


@pytest.mark.slow
def test_evaluate_top1_equals_the_runs_test_accuracy_at_world_size_2(trained):
    out, summary = trained
    proc = run_distcls("evaluate", ["--checkpoint", out / "checkpoints/last.pt", "--json", "--no-speed"], nproc=2)
    assert_ok(proc)
    report = json.loads(proc.stdout)
    assert report["world_size"] == 2 and report["count"] == 180
    assert report["acc"] == summary["test_acc"] and report["per_class_acc"] == pytest.approx(
        summary["per_class_test_acc"]
    )


def write_test_split(checkpoint, folder) -> list:
    """The test split's images as PNG files in nested folders, in split order; returns their labels."""
    from distcls.data import build_data
    from distcls.checkpoint.restore import restore
    data = build_data(restore(str(checkpoint), __import__("torch").device("cpu")).cfg)
    view = data.splits.test
    labels = []
    for n, i in enumerate(view.indices.tolist()):
        sub = folder / f"part{n // 100}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(view.source.images[i, 0].numpy(), mode="L").save(sub / f"{n:04d}.png")
        labels.append(int(view.source.labels[i]))
    return labels


def test_predict_on_a_directory_agrees_with_evaluate(trained, tmp_path, capfd):
    out, summary = trained
    labels = write_test_split(out / "checkpoints/last.pt", tmp_path / "test")
    code, stdout, _ = in_process(
        "predict", ["--checkpoint", out / "checkpoints/last.pt", "--json", tmp_path / "test"], capfd
    )
    assert code == 0
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["path"] for r in rows] == [
        str(tmp_path / "test" / f"part{n // 100}" / f"{n:04d}.png") for n in range(180)
    ]
    correct = sum(r["label"] == str(y) for r, y in zip(rows, labels))
    assert correct == round(summary["test_acc"] * 180)  # exactly the images evaluate counts as correct


def test_predict_reports_a_corrupt_file_and_predicts_the_rest(trained, tmp_path, capfd):
    out, _ = trained
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    Image.new("L", (8, 8), 200).save(folder / "a.png")
    Image.new("L", (8, 8), 10).save(folder / "sub" / "c.png")
    (folder / "b.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image file name: ignored in a directory")
    code, stdout, stderr = in_process("predict", ["--checkpoint", out / "checkpoints/best.pt", folder], capfd)
    assert code == 2 and "Traceback" not in stderr
    errors = stderr.strip().splitlines()
    assert (
        len(errors) == 1
        and errors[0].startswith("distcls: error: cannot read image")
        and str(folder / "b.png") in errors[0]
    )
    assert [line.split("\t")[0] for line in stdout.splitlines()] == [
        str(folder / "a.png"),
        str(folder / "sub" / "c.png"),
    ]
    code, stdout, stderr = in_process(
        "predict", ["--checkpoint", out / "checkpoints/best.pt", folder / "a.png", folder / "sub"], capfd
    )
    assert code == 0 and stderr == "" and len(stdout.splitlines()) == 2


@pytest.mark.slow  # a real process: if the decoder crashed again, this test fails and pytest goes on
def test_predict_names_a_damaged_png_and_keeps_the_other_predictions(trained, tmp_path):
    """Torchvision's PNG decoder segfaulted (exit 139) and every prediction was lost."""
    out, _ = trained
    good = [tmp_path / "a.png", tmp_path / "c.png"]
    for p in good:
        Image.new("L", (8, 8), 120).save(p)
    bad = fakedata.write_damaged_png(tmp_path / "b.png")
    proc = run_distcls("predict", ["--checkpoint", out / "checkpoints/best.pt", good[0], bad, good[1]])
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("distcls: error: cannot read image") and str(bad) in errors[0]
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [str(p) for p in good]


@pytest.mark.slow
def test_evaluate_on_two_ranks_counts_each_sample_once(trained):
    out, summary = trained
    proc = run_distcls("evaluate", ["--checkpoint", out / "checkpoints/last.pt", "--split", "val"], nproc=2)
    assert_ok(proc)
    assert "/180)" in proc.stdout and proc.stdout.count("val accuracy") == 1


def test_predict_prints_a_line_per_image(trained, tmp_path, capfd):
    out, _ = trained
    paths = []
    for i, color in enumerate([0, 255]):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (20, 20), (color, color, color)).save(p)
        paths.append(p)
    proc = cli_in_process(capfd, "predict", ["--checkpoint", out / "checkpoints/best.pt", "--top-k", "3", *paths])
    assert_ok(proc)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    fields = lines[0].split("\t")
    assert fields[0] == str(paths[0]) and len(fields) == 7 and fields[1] in "0123456789"
    assert sum(float(f) for f in fields[2::2]) <= 1.0 + 1e-6
    missing = cli_in_process(capfd, "predict", ["--checkpoint", out / "checkpoints/best.pt", tmp_path / "nope.png"])
    assert_user_error(missing, "nope.png does not exist")


def test_evaluate_resizes_as_the_run_did_when_torchvision_weights_chose_the_resize(tmp_path):
    """A run from torchvision weights whose eval resize is not data.image_size / 0.875 (ResNet-50 V2:
    crop 224, resize 232) evaluated its test split at the weights' resize (data.eval_resize left null);
    evaluate/predict restore the checkpoint without the weights file and must resize the same way."""
    import torch
    import torchvision

    from distcls import config
    from distcls.checkpoint.restore import restore
    from distcls.spec import DataSpec

    cfg = config.load(None, ["data.name=imagefolder", f"data.root={tmp_path}", "model.name=torchvision:resnet50",
                             "model.pretrained=torchvision:ResNet50_Weights.IMAGENET1K_V2"])
    spec = DataSpec(3, 2, 224, ("a", "b"), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    model = torchvision.models.resnet50(num_classes=2)
    path = tmp_path / "inference.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "data_spec": spec.to_dict(), "version": 2}, path)
    restored = restore(str(path), torch.device("cpu"))
    assert restored.cfg.data.eval_resize == 232  # the weights' (torchvision's Resize(232) + CenterCrop(224)), not 256
    # an explicit value wins
    assert restore(str(path), torch.device("cpu"), ["data.eval_resize=240"]).cfg.data.eval_resize == 240
    cfg = config.load(
        None,
        [
            "data.name=synthetic",
            "model.name=torchvision:resnet50",
            "model.pretrained=torchvision:ResNet50_Weights.IMAGENET1K_V2",
        ],
    )
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "data_spec": spec.to_dict(), "version": 2}, path)
    from distcls.data.file_source import evaluation_resize as eval_resize
    restored = restore(str(path), torch.device("cpu"))
    # in-memory data: resized whole, as in training
    assert eval_resize(restored.cfg.data, restored.spec.image_size) == 224


@pytest.mark.parametrize(
    "fmt, what", [("torchscript", "is a TorchScript model"), ("exported", "is a torch.export archive")]
)
def test_an_exported_model_given_as_checkpoint_says_what_it_is(trained, tmp_path, capfd, fmt, what):
    """distcls's own export files were called "truncated or corrupt"."""
    from distcls import export
    out, _ = trained
    model = tmp_path / ("m.ts" if fmt == "torchscript" else "m.pt2")
    assert (
        export.main(
            [
                "--checkpoint",
                str(out / "checkpoints/last.pt"),
                "--format",
                fmt,
                "--out",
                str(model),
                "--check-images",
                "0",
            ]
        )
        == 0
    )
    for command, args in (("evaluate", ["--checkpoint", model]), ("predict", ["--checkpoint", model, tmp_path])):
        proc = cli_in_process(capfd, command, args)
        assert_user_error(
            proc, f"--checkpoint {model} {what}", "not a training checkpoint",
            "give the checkpoint it was exported from",
        )
    proc = cli_in_process(capfd, "train", [f"run.out_dir={tmp_path / 'r'}", "--resume", model])
    assert_user_error(proc, what)


def test_evaluate_into_a_closed_pipe_ends_quietly(trained):
    """`python -m distcls.evaluate ... | head -1`: a BrokenPipeError traceback and exit 1 before. The
    reader is gone before the first write (its end closed at the start), as `head` is once it has its line."""
    import os
    import subprocess
    import sys
    from conftest import ROOT, child_env
    out, _ = trained
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "distcls.evaluate", "--checkpoint", str(out / "checkpoints/last.pt"), "--no-speed"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=child_env(),
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 141, proc.stderr


def test_a_broken_pipe_that_is_not_stdout_is_a_real_failure():
    """Only a closed stdout ends quietly: a BrokenPipeError from anything else (a socket, a worker's pipe) keeps its
    traceback."""
    from distcls.cli import run_cli

    def main(argv):
        raise BrokenPipeError("a tracker's socket")

    with pytest.raises(BrokenPipeError):
        run_cli(main, [])
