"""Crash-safe files and folders: a reader sees the old one or the new one, never a torn one.

Write beside the target, fsync, rename, then fsync the directory so the rename itself
survives a power cut. Also the two other pieces every writer here needs: an advisory
cross-process lock and a streamed file hash. Used by every writer a reader may race: the
prepared model cache, the adapter store, training rounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FILE_MODE = 0o644  # mkstemp creates 0600; a serving process may run as another user
DIR_MODE = 0o755  # mkdtemp creates 0700; published folders are read by other processes
_HASH_CHUNK = 1 << 20


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: so renames inside it are durable)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems refuse to open directories: durability is best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before renaming it into place)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Create or replace ``path``: ``write(tmp)`` fills a temp file beside it, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_path(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, obj: Any, **dumps: Any) -> None:
    """Replace ``path`` with ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, **dumps) + "\n"
    write_text_atomic(path, text)


# --------------------------------------------------------------------------- folders


def make_tmp_dir(final: Path, prefix: str | None = None) -> Path:
    """A fresh, world-readable hidden temp folder beside ``final`` (rename is then atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    name = prefix if prefix is not None else f".{final.name}.tmp-"
    tmp = Path(tempfile.mkdtemp(prefix=name, dir=final.parent))
    os.chmod(tmp, DIR_MODE)
    return tmp


def publish_dir(tmp: Path, final: Path) -> bool:
    """Rename the finished folder ``tmp`` to ``final``; never replaces an existing ``final``.

    Returns False (and deletes ``tmp``) when another writer published ``final`` first: its
    folder is as good as ours, so losing the race is not an error.
    """
    fsync_tree(tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        if final.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    fsync_path(final.parent)
    return True


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` over ``final``: old aside, new in, old deleted."""
    fsync_tree(tmp)
    trash = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
    if final.exists():
        os.rename(final, trash)
    os.rename(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(trash, ignore_errors=True)


def write_dir_atomic(final: Path, fill: Callable[[Path], None]) -> None:
    """Create or replace the folder ``final``: ``fill(tmp)`` builds it in a hidden temp folder.

    A reader therefore sees the folder whole or not at all; a failing ``fill`` leaves nothing.
    """
    tmp = make_tmp_dir(final)
    try:
        fill(tmp)
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- lock and hash


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX ``flock`` on ``path``), for threads and processes alike.

    flock locks belong to the open file description, so two threads that each open the file
    exclude each other too. Callers never depend on it for correctness (their publish is an
    atomic rename that a loser survives); without fcntl (Windows) or on filesystems that
    refuse locks it is a no-op. The folder holding ``path`` must exist: the lock never
    recreates one, e.g. a user folder of the adapter store that a concurrent delete removed.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # e.g. some network filesystems
            logger.debug("could not lock %s; continuing without the lock", path)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
