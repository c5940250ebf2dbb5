"""Writing beside a target and renaming on success: what every command that writes a user's file relies on."""

from __future__ import annotations

import os
import stat

import pytest

from ds_train.errors import UsageError
from ds_train.fileio import replacing_dir, replacing_file, write_text


def test_a_failed_file_write_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("kept\n")
    with pytest.raises(UnicodeEncodeError):
        write_text(target, "half written \udc80")
    with pytest.raises(RuntimeError), replacing_file(target) as f:
        f.write("partial\n")
        raise RuntimeError("refused halfway")
    assert target.read_text() == "kept\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_a_file_is_replaced_whole_and_keeps_its_mode(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    target.chmod(0o640)
    write_text(target, "new", fsync=True)
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    fresh = tmp_path / "sub" / "new.txt"
    write_text(fresh, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask  # as open(path, "w") would make it


def test_a_directory_given_as_a_file_is_refused(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        write_text(tmp_path, "x")
    a_file = tmp_path / "f"
    a_file.write_text("")
    with pytest.raises(UsageError, match="not a directory"), replacing_dir(a_file):
        pass


def test_a_directory_is_replaced_only_when_complete(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError), replacing_dir(target) as staging:
        (staging / "half.txt").write_text("half")
        raise OSError("disk full")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging left behind
    with replacing_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # the old one is gone
