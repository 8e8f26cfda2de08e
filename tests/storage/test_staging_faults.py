"""Unit tests for the staging module's fault paths: errno lines, in-place commits (a mount point as
OUT, simulated here; real tmpfs mounts are in test_bad_inputs.py), parents, fallbacks."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from adapterfmt.storage import staging
from adapterfmt.errors import DiskSpaceError, OutputPathError
from adapterfmt.storage.staging import StagedDirectory, clean_stale, output_error


@pytest.mark.parametrize(
    ("code", "cls", "text"),
    [
        (errno.EROFS, OutputPathError, "Read-only file system [EROFS]"),
        (errno.EACCES, OutputPathError, "Permission denied [EACCES]"),
        (errno.ENOSPC, DiskSpaceError, "No space left on device [ENOSPC]"),
        (errno.EFBIG, DiskSpaceError, "File too large [EFBIG]"),
        (errno.ENAMETOOLONG, OutputPathError, "File name too long [ENAMETOOLONG]"),
        (errno.EIO, OutputPathError, "Input/output error [EIO]"),
    ],
)
def test_an_errno_is_one_line_naming_the_out_path(tmp_path: Path, code: int, cls: type, text: str) -> None:
    out = str(tmp_path / "OUT")
    stage = str(tmp_path / ".OUT.adapterfmt-tmp-1")
    err = output_error(OSError(code, os.strerror(code), stage + "/model.safetensors"), out, stage=stage)
    assert isinstance(err, cls) and "\n" not in str(err)
    assert str(err).startswith(f"{out}/model.safetensors: {text}; the output was not written")


def test_an_oserror_without_a_file_name_names_out(tmp_path: Path) -> None:
    err = output_error(OSError(errno.EIO, "Input/output error"), str(tmp_path / "OUT"))
    assert str(err).startswith(f"{tmp_path / 'OUT'}: Input/output error [EIO]")


def test_no_statvfs_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Windows has no statvfs: ENOSPC is then reported without the inode diagnosis."""
    monkeypatch.delattr(os, "statvfs")
    assert staging.no_free_inodes(str(tmp_path)) is False
    assert "No space left on device [ENOSPC]" in str(output_error(OSError(errno.ENOSPC, "x"), str(tmp_path)))


def test_a_failing_block_removes_the_stage_and_the_parents_it_made(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "OUT"
    with pytest.raises(DiskSpaceError, match=r"OUT/x.bin: File too large \[EFBIG\]"):
        with StagedDirectory(str(out)) as s:
            open(os.path.join(s.path, "x.bin"), "w").close()
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), os.path.join(s.path, "x.bin"))
    assert os.listdir(tmp_path) == []


def test_a_successful_commit_keeps_the_parents_it_made(tmp_path: Path) -> None:
    out = tmp_path / "a" / "OUT"
    with StagedDirectory(str(out)) as s:
        Path(s.path, "f").write_text("x")
        s.commit()
    assert sorted(os.listdir(tmp_path)) == ["a"] and os.listdir(out) == ["f"]


def test_long_out_names_get_a_short_stage_name(tmp_path: Path) -> None:
    out = tmp_path / ("n" * 250)
    with StagedDirectory(str(out)) as s:
        assert len(os.path.basename(s.path)) <= 255
        Path(s.path, "f").write_text("x")
        s.commit()
    assert os.listdir(out) == ["f"]


@pytest.fixture
def mount_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder the staging module takes for a mount point (the real thing needs root)."""
    volume = tmp_path / "volume"
    volume.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(staging.os.path, "ismount", lambda p: os.path.abspath(p) == str(volume) or real(p))
    return volume


def test_in_place_commit_moves_files_into_the_mount_point(mount_point: Path) -> None:
    (mount_point / "old.bin").write_text("old")
    with StagedDirectory(str(mount_point), overwrite=True) as s:
        assert s.in_place and os.path.dirname(s.path) == str(mount_point) and "mount point" in (s.note or "")
        Path(s.path, "model.safetensors").write_text("new")
        Path(s.path, "config.json").write_text("{}")
        s.commit()
    assert sorted(os.listdir(mount_point)) == ["config.json", "model.safetensors"]
    assert os.listdir(mount_point.parent) == ["volume"]


def test_in_place_commit_puts_everything_back_when_a_move_fails(mount_point: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (mount_point / "old.bin").write_text("old")
    real_rename = os.rename
    calls = []

    def flaky(src: str, dst: str) -> None:
        calls.append(src)
        if len(calls) == 3:  # old aside, first new file in, then the second fails
            raise OSError(errno.EIO, os.strerror(errno.EIO), dst)
        real_rename(src, dst)

    with pytest.raises(OutputPathError, match=r"Input/output error \[EIO\]"):
        with StagedDirectory(str(mount_point), overwrite=True) as s:
            Path(s.path, "a.safetensors").write_text("new")
            Path(s.path, "b.safetensors").write_text("new")
            monkeypatch.setattr(staging.os, "rename", flaky)
            s.commit()
    monkeypatch.setattr(staging.os, "rename", real_rename)
    assert os.listdir(mount_point) == ["old.bin"] and (mount_point / "old.bin").read_text() == "old"


def test_a_killed_in_place_run_is_cleaned_by_the_next(mount_point: Path) -> None:
    (mount_point / f".{staging.TMP_TAG}-999999").mkdir()
    (mount_point / f".{staging.TMP_TAG}-999999" / "half.bin").write_text("x")
    removed = clean_stale(str(mount_point))
    assert removed == [str(mount_point / f".{staging.TMP_TAG}-999999")] and os.listdir(mount_point) == []


def test_a_killed_in_place_swap_gets_the_old_output_back(mount_point: Path) -> None:
    old = mount_point / f".{staging.OLD_TAG}-999999"
    old.mkdir()
    (old / "model.safetensors").write_text("old")
    clean_stale(str(mount_point))
    assert os.listdir(mount_point) == ["model.safetensors"]
