"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one.

Write beside the target, fsync, ``os.replace``, then fsync the directory so the rename
itself survives a power cut. Used by every writer a reader may race: the prepared model
cache, the adapter store, training checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILE_MODE = 0o644  # mkstemp creates 0600; a serving process may run as another user


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
