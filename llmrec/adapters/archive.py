"""An adapter version as one zip file: written for export, read back refusing anything unsafe.

The zip holds exactly the PEFT files and the manifest as flat members with fixed timestamps,
so the same version always zips to the same bytes.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from llmrec.adapters.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST
from llmrec.adapters.lora import AdapterValidationError
from llmrec.atomic import FILE_MODE

MAX_IMPORT_BYTES = 2 << 30
"""Largest total uncompressed size accepted from a zip (guards against zip bombs)."""

ZIP_MEMBERS = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST)
"""What an adapter zip holds, in this order."""
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same adapter zips identically
_ZIP_IGNORED = frozenset({"README.md"})  # peft's model card: harmless, dropped on import
_CHUNK = 1 << 20


def write_adapter_zip(version_dir: Path, zip_path: str | Path) -> None:
    """Zip the ``ZIP_MEMBERS`` of a stored version into ``zip_path`` (not atomic by itself)."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in ZIP_MEMBERS:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | FILE_MODE) << 16
            with open(version_dir / name, "rb") as src, zf.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)


def _check_member_name(zip_path: Path, info: zipfile.ZipInfo) -> None:
    """Refuse names that are paths, absolute, ``..``, drive letters, folders or links."""
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if (
        not name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or ".." in parts
        or (len(name) > 1 and name[1] == ":")
    ):
        raise AdapterValidationError(zip_path, f"unsafe member name {name!r}")
    if info.is_dir() or len(parts) != 1:
        raise AdapterValidationError(zip_path, f"members must be flat files: {name!r}")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise AdapterValidationError(zip_path, f"links are not accepted: {name!r}")


def extract_adapter_zip(zip_path: Path, dest: Path, max_bytes: int = MAX_IMPORT_BYTES) -> None:
    """Copy the allowed members of an adapter zip into ``dest``, refusing anything unsafe.

    Member names are never used as paths: each accepted member is written to a fixed name
    in ``dest``, so even a check missed here could not write outside it. At most
    ``max_bytes`` are inflated in all.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise AdapterValidationError(zip_path, f"not a readable zip: {e}") from e
    with zf:
        seen: set[str] = set()
        total = 0
        for info in zf.infolist():
            _check_member_name(zip_path, info)
            name = info.filename
            if name in seen:
                raise AdapterValidationError(zip_path, f"duplicate member {name!r}")
            seen.add(name)
            if name in _ZIP_IGNORED:
                continue
            if name not in ZIP_MEMBERS:
                raise AdapterValidationError(zip_path, f"unexpected member {name!r}")
            # Count the bytes actually inflated, not the header's claim.
            with zf.open(info) as src, open(dest / name, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    total += len(chunk)
                    if total > max_bytes:
                        raise AdapterValidationError(zip_path, f"more than {max_bytes} bytes")
                    dst.write(chunk)
        missing = [m for m in ZIP_MEMBERS if m not in seen]
        if missing:
            raise AdapterValidationError(zip_path, f"missing members {missing}")
