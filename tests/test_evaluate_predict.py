"""evaluate and predict on a trained checkpoint, as a user runs them."""
import json

import pytest
from PIL import Image

from conftest import assert_ok, assert_user_error, run_distcls, train_in_process


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    summary = train_in_process(out, "train.epochs=3")
    return out, summary


def test_evaluate_reproduces_the_training_test_accuracy(trained, tmp_path):
    out, summary = trained
    proc = run_distcls("evaluate", ["--checkpoint", out / "checkpoints/last.pt", "--out-dir", tmp_path / "eval"])
    assert_ok(proc)
    assert f"test accuracy {summary['test_acc']:.4f}" in proc.stdout
    report = json.loads((tmp_path / "eval/eval_test.json").read_text())
    assert report["count"] == 180 and sum(map(sum, report["confusion"])) == 180
    assert report["acc"] == pytest.approx(summary["test_acc"])
    assert (tmp_path / "eval/confusion_test.png").stat().st_size > 1000
    assert (tmp_path / "eval/samples_test.png").stat().st_size > 1000


@pytest.mark.slow
def test_evaluate_on_two_ranks_counts_each_sample_once(trained):
    out, summary = trained
    proc = run_distcls("evaluate", ["--checkpoint", out / "checkpoints/last.pt", "--split", "val"], nproc=2)
    assert_ok(proc)
    assert "/180)" in proc.stdout and proc.stdout.count("val accuracy") == 1


def test_predict_prints_a_line_per_image(trained, tmp_path):
    out, _ = trained
    paths = []
    for i, color in enumerate([0, 255]):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (20, 20), (color, color, color)).save(p)
        paths.append(p)
    proc = run_distcls("predict", ["--checkpoint", out / "checkpoints/best.pt", "--top-k", "3", *paths])
    assert_ok(proc)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    fields = lines[0].split("\t")
    assert fields[0] == str(paths[0]) and len(fields) == 7 and fields[1] in "0123456789"
    assert sum(float(f) for f in fields[2::2]) <= 1.0 + 1e-6
    missing = run_distcls("predict", ["--checkpoint", out / "checkpoints/best.pt", tmp_path / "nope.png"])
    assert_user_error(missing, "nope.png does not exist")
