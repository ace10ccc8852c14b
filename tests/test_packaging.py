"""What `pip install` gives a user without a clone: the configs, SLURM scripts and launchers in the
wheel (<venv>/share/distcls/), found by --config NAME and by the sbatch scripts."""
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT
from distcls import config


def test_an_installed_distcls_finds_its_configs_under_the_prefix(tmp_path):
    installed = tmp_path / "venv" / "share" / "distcls" / "configs"
    installed.mkdir(parents=True)
    assert config.shipped_dir("configs", repository=tmp_path / "no-clone", prefix=str(tmp_path / "venv")) == installed
    (tmp_path / "site-packages" / "configs").mkdir(parents=True)  # another package's folder beside an installed distcls
    assert (
        config.shipped_dir("configs", repository=tmp_path / "site-packages", prefix=str(tmp_path / "venv")) == installed
    )
    assert config.shipped_dir("configs") == ROOT / "configs"  # a clone: its own


@pytest.mark.slow
def test_the_wheel_carries_the_configs_slurm_scripts_and_launchers(tmp_path):
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("distcls-*.whl")
    names = {
        n.split("/data/share/distcls/", 1)[1] for n in zipfile.ZipFile(wheel).namelist() if "/data/share/distcls/" in n
    }
    shipped = {f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    shipped |= {f"slurm/{p.name}" for p in (ROOT / "slurm").iterdir() if p.suffix in (".sbatch", ".sh", ".md")}
    shipped |= {f"launch/{p.name}" for p in (ROOT / "launch").glob("*.sh")}
    assert shipped <= names and "configs/default.yaml" in names and "slurm/requeue_on_signal.sh" in names
    # the sbatch scripts look for their helper in the checkout, then under the prefix
    assert all(
        "share/distcls" in (ROOT / "slurm" / s).read_text()
        for s in ("single_node.sbatch", "multi_node.sbatch", "srun_tasks.sbatch")
    )
