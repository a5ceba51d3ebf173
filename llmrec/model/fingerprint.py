"""The fingerprint of an HF model folder: what an adapter's manifest names its base by."""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmrec.atomic import sha256_file
from llmrec.model.constants import MODEL_CONFIG

# In-process memo for file hashes: fingerprint_model_dir is called per adapter export, and a
# 540 MB safetensors file should be hashed once per process, not once per call.
_FILE_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def file_identity(path: Path) -> tuple[str, int, int]:
    """(absolute path, size, mtime_ns): changes whenever the file is rewritten."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _memo_sha256(path: Path) -> str:
    """sha256 of ``path``, memoized in-process on (path, size, mtime)."""
    key = file_identity(path)
    if key not in _FILE_HASH_MEMO:
        _FILE_HASH_MEMO[key] = sha256_file(path)
    return _FILE_HASH_MEMO[key]


def _weight_files(path: Path) -> list[Path]:
    """The weight files of an HF folder: all ``*.safetensors``, else ``*.bin`` (legacy)."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return [f for f in files if f.is_file()]


def fingerprint_model_dir(path: str | Path) -> str:
    """Stable sha256 (hex) of an HF model folder: ``config.json`` plus its weight files.

    Adapter manifests record it so an adapter is never served on a base it was not trained
    on. Tokenizer files are left out on purpose: they do not change what a LoRA delta means.
    File hashes are memoized per process on (path, size, mtime), so repeated calls are cheap.
    """
    root = Path(path)
    config = root / MODEL_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"not a model folder (no {MODEL_CONFIG}): {root}")
    weights = _weight_files(root)
    if not weights:
        raise FileNotFoundError(f"no weight files (*.safetensors or *.bin) in {root}")
    h = hashlib.sha256()
    for f in [config, *weights]:
        # name + NUL + per-file digest: renaming or reordering shards changes the fingerprint.
        h.update(f.name.encode("utf-8") + b"\0" + bytes.fromhex(_memo_sha256(f)))
    return h.hexdigest()
