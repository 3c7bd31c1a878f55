"""The one atomic-write helper (`drivesim.atomic`): complete or nothing, one WriteError naming the file."""

from __future__ import annotations

import errno
import json

import pytest

from drivesim.atomic import atomic_path, replace_dir, write_bytes_atomic, write_json_atomic
from drivesim.errors import WriteError


def test_atomic_path_puts_the_file_in_place_only_when_complete(tmp_path):
    dst = tmp_path / "a.mp4"
    dst.write_text("old")
    with atomic_path(dst, suffix=".mp4") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".mp4" and tmp != dst
        tmp.write_text("new")
        assert dst.read_text() == "old"  # readers see the old file until the block ends
    assert dst.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]

    with pytest.raises(RuntimeError), atomic_path(dst) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert dst.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


def test_os_errors_become_one_write_error_naming_the_file(tmp_path):
    dst = tmp_path / "x.json"
    with pytest.raises(WriteError) as err, atomic_path(dst) as tmp:
        tmp.write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value).startswith(f"{dst}: write: No space left on device") and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WriteError, match="missing"):
        write_bytes_atomic(tmp_path / "missing" / "f.bin", b"x")


def test_write_json_atomic_round_trip_and_permissions(tmp_path):
    write_json_atomic(tmp_path / "d.json", {"a": [1, 2]}, durable=True)
    assert json.loads((tmp_path / "d.json").read_text()) == {"a": [1, 2]}
    assert (tmp_path / "d.json").stat().st_mode & 0o644 == 0o644  # not mkstemp's 0600


def test_replace_dir_swaps_whole_folders(tmp_path):
    final, new = tmp_path / "model", tmp_path / ".tmp-model"
    final.mkdir()
    (final / "old.txt").write_text("1")
    new.mkdir()
    (new / "new.txt").write_text("2")
    replace_dir(new, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
