"""The atomic writer's fault-injection seam: a failed write keeps the old file and leaves no temp behind."""
import os
import stat
import pytest

from distcls.runtime import atomic_files
from distcls.runtime.atomic_files import atomic_write_bytes, atomic_write_text, inject_fault


class Fault(Exception):
    pass


def _fail_at(stage_wanted, name):
    seen = []

    def hook(stage, path, tmp):
        seen.append((stage, path.name, tmp.exists()))
        if stage == stage_wanted and path.name == name:
            raise Fault(stage)
    return hook, seen


def test_fault_after_the_bytes_are_written_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "last.pt"
    atomic_write_bytes(target, b"old")
    hook, seen = _fail_at("written", "last.pt")
    with inject_fault(hook), pytest.raises(Fault):
        atomic_write_bytes(target, b"new bytes")
    assert seen == [("written", "last.pt", True)]  # the temp file existed, full, when the fault hit
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the writer's own cleanup


def test_fault_after_the_rename_leaves_the_new_file_complete(tmp_path):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old")
    hook, seen = _fail_at("replaced", "config.yaml")
    with inject_fault(hook), pytest.raises(Fault):
        atomic_write_text(target, "new")
    assert seen == [("written", "config.yaml", True), ("replaced", "config.yaml", False)]
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_hook_sees_only_writes_inside_the_context_and_other_files_pass_through(tmp_path):
    hook, seen = _fail_at("written", "last.pt")
    atomic_write_text(tmp_path / "before.txt", "x")
    with inject_fault(hook):
        atomic_write_text(tmp_path / "summary.json", "{}")  # not the targeted name: written normally
    atomic_write_bytes(tmp_path / "last.pt", b"after")  # the hook is uninstalled: no fault
    assert seen == [("written", "summary.json", True), ("replaced", "summary.json", False)]
    assert (tmp_path / "summary.json").read_text() == "{}"
    assert (tmp_path / "last.pt").read_bytes() == b"after"
    assert atomic_files._fault_hook is None


def test_hook_is_uninstalled_when_the_context_exits_by_an_exception(tmp_path):
    hook, _ = _fail_at("written", "last.pt")
    with pytest.raises(Fault):
        with inject_fault(hook):
            atomic_write_bytes(tmp_path / "last.pt", b"x")
    assert atomic_files._fault_hook is None
    atomic_write_bytes(tmp_path / "last.pt", b"y")
    assert (tmp_path / "last.pt").read_bytes() == b"y"


def test_nested_hooks_restore_the_outer_one(tmp_path):
    outer, outer_seen = _fail_at("never", "")
    inner, inner_seen = _fail_at("never", "")
    with inject_fault(outer):
        with inject_fault(inner):
            atomic_write_text(tmp_path / "a", "1")
        atomic_write_text(tmp_path / "b", "2")
    assert [name for _, name, _ in inner_seen] == ["a", "a"]
    assert [name for _, name, _ in outer_seen] == ["b", "b"]
    assert atomic_files._fault_hook is None


@pytest.fixture
def umask():
    """Set the process's umask for one test (pytest runs tests in one thread), restored after."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_and_links_keep_the_umasks_mode(tmp_path, umask, mask, mode):
    umask(mask)
    assert atomic_files.current_umask() == mask
    atomic_write_bytes(tmp_path / "a.pt", b"x")
    atomic_write_text(tmp_path / "b.json", "{}")
    atomic_files.atomic_link(tmp_path / "a.pt", tmp_path / "best.pt")
    for name in ("a.pt", "b.json", "best.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


@pytest.mark.parametrize(
    "given, hint",
    [("run", "run/checkpoints/last.pt"), ("run/checkpoints", "run/checkpoints/last.pt"), ("other", "other/last.pt")],
)
def test_a_directory_given_as_a_checkpoint_hints_at_its_last_pt(tmp_path, given, hint):
    """`--checkpoint RUN/checkpoints` suggested RUN/checkpoints/checkpoints/last.pt."""
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other/last.pt").write_bytes(b"")
    with pytest.raises(
        atomic_files.UserError, match=rf"is a directory; give the path of a \.pt file \(e\.g\. {tmp_path / hint}\)$"
    ):
        atomic_files.load_weights_only(tmp_path / given)
