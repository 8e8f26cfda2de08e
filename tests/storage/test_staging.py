"""Unit tests of adapterfmt.storage.staging, the one write rule every writer uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapterfmt.storage import os_calls
from adapterfmt.errors import OutputPathError
from adapterfmt.storage.staging import StagedDirectory, clean_stale, write_text


def test_commit_renames_the_stage_into_place_once(tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    with StagedDirectory(str(out)) as staged:
        assert os.path.basename(staged.path) == f".OUT.adapterfmt-tmp-{os.getpid()}"
        os.mkdir(os.path.join(staged.path, "sub"))
        write_text(os.path.join(staged.path, "sub", "a.txt"), "a")
        assert not out.exists()
        staged.commit()
    assert os.listdir(tmp_path) == ["OUT"] and (out / "sub" / "a.txt").read_text() == "a"


def test_leaving_without_commit_removes_the_stage(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with StagedDirectory(str(tmp_path / "OUT")) as staged:
            write_text(os.path.join(staged.path, "a.txt"), "a")
            raise RuntimeError("writer failed")
    assert os.listdir(tmp_path) == []


def test_non_empty_out_needs_overwrite_and_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with StagedDirectory(str(out)) as staged:
        with pytest.raises(OutputPathError, match="was created while"):
            staged.commit()
    with StagedDirectory(str(out), overwrite=True) as staged:
        write_text(os.path.join(staged.path, "new.txt"), "new")
        staged.commit()
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["OUT"]


def test_keep_existing_keeps_old_files_and_never_writes_through_them(tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("keep")
    (out / "sub" / "replace.txt").write_text("old")
    aside = tmp_path / "old-replace.txt"
    os.link(out / "sub" / "replace.txt", aside)  # watch the old file's inode
    with StagedDirectory(str(out), overwrite=True, keep_existing=True) as staged:
        write_text(staged.file(os.path.join("sub", "replace.txt")), "new")
        write_text(staged.file(os.path.join("other", "added.txt")), "added")
        staged.commit()
    assert (out / "keep.txt").read_text() == "keep"
    assert (out / "sub" / "replace.txt").read_text() == "new" and (out / "other" / "added.txt").read_text() == "added"
    assert aside.read_text() == "old"


def test_clean_stale_removes_dead_stages_and_restores_an_old_output(tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    dead = tmp_path / ".OUT.adapterfmt-tmp-999999"
    dead.mkdir()
    (dead / "half.safetensors").write_bytes(b"x")
    old = tmp_path / ".OUT.adapterfmt-old-999998"  # a run died between its two renames
    old.mkdir()
    (old / "model.txt").write_text("previous")
    unrelated = tmp_path / ".OUT.something-else-1"
    unrelated.mkdir()
    removed = clean_stale(str(out))
    assert sorted(removed) == sorted([str(dead), str(old)])
    assert sorted(os.listdir(tmp_path)) == [".OUT.something-else-1", "OUT"]
    assert (out / "model.txt").read_text() == "previous"


def test_clean_stale_refuses_a_live_stage(tmp_path: Path) -> None:
    live = tmp_path / ".OUT.adapterfmt-tmp-4242"
    live.mkdir()
    lock = os_calls.lock_directory(str(live))  # as the live process holds it
    try:
        with pytest.raises(OutputPathError, match="pid 4242"):
            clean_stale(str(tmp_path / "OUT"))
    finally:
        assert lock is not None
        lock.release()
    assert live.exists()
