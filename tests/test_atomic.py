"""Tests for llmrec.atomic: the one crash-safe file/folder write, file lock and file hash."""

from __future__ import annotations

import hashlib
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmrec.atomic import (
    DIR_MODE,
    FILE_MODE,
    file_lock,
    make_tmp_dir,
    publish_dir,
    replace_dir,
    sha256_file,
    write_atomic,
    write_dir_atomic,
    write_json_atomic,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _hidden(folder: Path) -> list[str]:
    """Hidden entries (temp files, temp or trash folders) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- files


def test_write_atomic_replaces_and_opens_up_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    write_json_atomic(target, {"b": 1, "a": 2}, sort_keys=True)
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert _mode(target) == FILE_MODE
    write_json_atomic(target, [1])
    assert target.read_text() == "[\n  1\n]\n"
    assert _hidden(target.parent) == []


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        write_atomic(target, fail)
    assert target.read_text() == "old"
    assert _hidden(tmp_path) == []


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 5000  # more than one 1 MiB chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- folders


def test_make_tmp_dir_is_hidden_beside_final_and_world_readable(tmp_path: Path) -> None:
    final = tmp_path / "parent" / "model"
    tmp = make_tmp_dir(final)
    assert tmp.parent == final.parent and tmp.name.startswith(".model.tmp-")
    assert _mode(tmp) == DIR_MODE
    other = make_tmp_dir(final, prefix=".tmp-")
    assert other.name.startswith(".tmp-") and other != tmp


def test_publish_dir_publishes_when_free(tmp_path: Path) -> None:
    final = tmp_path / "model"
    tmp = make_tmp_dir(final)
    (tmp / "config.json").write_text("mine")
    assert publish_dir(tmp, final) is True
    assert (final / "config.json").read_text() == "mine" and not tmp.exists()


def test_publish_loses_race_gracefully(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "config.json").write_text("winner")
    tmp = tmp_path / ".model.tmp"
    tmp.mkdir()
    (tmp / "config.json").write_text("loser")
    assert publish_dir(tmp, final) is False
    assert not tmp.exists()
    assert (final / "config.json").read_text() == "winner"


def test_replace_dir_swaps_in_the_new_folder(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = make_tmp_dir(final)
    (tmp / "new.txt").write_text("new")
    replace_dir(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert _hidden(tmp_path) == []


def test_write_dir_atomic_replaces_an_existing_folder(tmp_path: Path) -> None:
    final = tmp_path / "round-0001"
    write_dir_atomic(final, lambda tmp: (tmp / "a.txt").write_text("first"))
    assert (final / "a.txt").read_text() == "first" and _mode(final) == DIR_MODE
    write_dir_atomic(final, lambda tmp: (tmp / "b.txt").write_text("second"))
    assert [p.name for p in final.iterdir()] == ["b.txt"]
    assert _hidden(tmp_path) == []


def test_write_dir_atomic_leaves_nothing_on_a_failing_fill(tmp_path: Path) -> None:
    final = tmp_path / "round-0001"

    def fail(tmp: Path) -> None:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("fill died")

    with pytest.raises(RuntimeError, match="fill died"):
        write_dir_atomic(final, fail)
    assert list(tmp_path.iterdir()) == []

    write_dir_atomic(final, lambda tmp: (tmp / "a.txt").write_text("kept"))
    with pytest.raises(RuntimeError, match="fill died"):
        write_dir_atomic(final, fail)
    assert [p.name for p in final.iterdir()] == ["a.txt"]  # the old folder survives
    assert _hidden(tmp_path) == []


# --------------------------------------------------------------------------- lock


def test_file_lock_excludes_a_second_thread(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    inside = 0
    most = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, most
        for _ in range(5):
            with file_lock(lock):
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.005)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert most == 1


def test_file_lock_excludes_a_second_process(tmp_path: Path) -> None:
    lock, waiting, got = tmp_path / ".lock", tmp_path / "waiting", tmp_path / "got"
    code = (
        "import sys; from pathlib import Path; from llmrec.atomic import file_lock\n"
        "Path(sys.argv[2]).write_text('x')\n"
        "with file_lock(Path(sys.argv[1])):\n"
        "    Path(sys.argv[3]).write_text('x')\n"
    )
    with file_lock(lock):
        child = subprocess.Popen([sys.executable, "-c", code, str(lock), str(waiting), str(got)])
        try:
            deadline = time.monotonic() + 60
            while not waiting.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # the child is now blocked on the lock, or (a bug) through it
            assert waiting.exists() and child.poll() is None and not got.exists()
        except BaseException:
            child.kill()
            raise
    assert child.wait(timeout=60) == 0 and got.exists()


def test_file_lock_does_not_recreate_a_missing_folder(tmp_path: Path) -> None:
    gone = tmp_path / "deleted-user"
    with pytest.raises(FileNotFoundError):
        with file_lock(gone / ".lock"):
            pass
    assert not gone.exists()
