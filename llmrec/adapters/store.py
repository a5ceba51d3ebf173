"""Versioned per-user adapter store: atomic publish, validated load, export and import.

Layout under the root (default ``adapters/``)::

    <root>/<user_id>/v0001/     plain PEFT LoRA folder + manifest.json (never changed again)
    <root>/<user_id>/v0002/
    <root>/<user_id>/CURRENT    text file naming the current version folder ("v0002")
    <root>/<user_id>/.lock      flock target that serializes publishers of this user
    <root>/_shared/...          the shared adapter, same layout (ids can't start with "_")

Publishing writes a complete version into a hidden temp folder inside the user folder,
fsyncs it, renames it to the next version number (atomic on POSIX) and only then moves
``CURRENT`` with temp file + fsync + ``os.replace``. A reader therefore follows ``CURRENT`` to
a folder that is whole, and a crashed writer leaves only a hidden temp folder that readers
never list. Version folders are immutable, so the served name ``<user_id>@v<version>``
(:attr:`AdapterRef.adapter_name`) always means the same weights: vLLM caches by name.

Everything read back is validated (:func:`llmrec.adapters.validate_adapter`) before it is
returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from llmrec.adapters.archive import MAX_IMPORT_BYTES, extract_adapter_zip, write_adapter_zip
from llmrec.adapters.constants import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CURRENT,
    DEFAULT_ROOT,
    LOCK_FILE,
    MANIFEST,
    SHARED_ID,
    TMP_PREFIX,
    TOMBSTONE_PREFIX,
)
from llmrec.adapters.lora import AdapterValidationError, LoraWeights, write_adapter
from llmrec.adapters.manifest import (
    USER_ID_RE,
    AdapterManifest,
    read_manifest,
    validate_user_id,
)
from llmrec.adapters.validate import validate_adapter
from llmrec.atomic import (
    file_lock,
    fsync_path,
    make_tmp_dir,
    sha256_file,
    write_atomic,
    write_text_atomic,
)
from llmrec.pseudonyms import pseudonym, served_name

logger = logging.getLogger(__name__)

DEFAULT_MAX_RANK = 64
"""Rank limit when the caller gives none; set it to the engine's ``--max-lora-rank``."""

_VERSION_RE = re.compile(r"^v(\d{4,})$")
_STALE_TMP_S = 3600.0
"""A temp folder this old belongs to a crashed writer (a publish takes seconds) and is swept."""
_PUBLISH_RETRIES = 100


@dataclass(frozen=True)
class AdapterRef:
    """A stored adapter version: where it is and what its manifest says."""

    user_id: str
    version: int
    path: Path
    manifest: AdapterManifest

    @property
    def adapter_name(self) -> str:
        """The served model name, ``<user_id>@v<version>``: new weights always get a new name."""
        return f"{self.user_id}@v{self.version}"


def _version_dirs(user_dir: Path) -> dict[int, Path]:
    """``{version: folder}`` of the finished versions (temp folders are hidden, so skipped)."""
    try:
        entries = list(user_dir.iterdir())
    except FileNotFoundError:
        return {}
    out = {}
    for entry in entries:
        m = _VERSION_RE.fullmatch(entry.name)
        if m and entry.is_dir():
            out[int(m[1])] = entry
    return out


def _version_name(version: int) -> str:
    return f"v{version:04d}"


class AdapterStore:
    """Per-user versioned LoRA adapters under ``root`` (see the module docstring).

    The validation policy is fixed per store: ``module_shapes`` and ``base_fingerprint`` of
    the served base (None: not checked) and ``max_rank`` (the engine's ``--max-lora-rank``).
    :meth:`publish` refuses what :meth:`load` would refuse, so a bad adapter never gets a
    version number.
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        *,
        max_rank: int = DEFAULT_MAX_RANK,
        module_shapes: Mapping[str, tuple[int, int]] | None = None,
        base_fingerprint: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.max_rank = max_rank
        self.module_shapes = dict(module_shapes) if module_shapes is not None else None
        self.base_fingerprint = base_fingerprint

    def _user_dir(self, user_id: str, allow_shared: bool = True) -> Path:
        return self.root / validate_user_id(user_id, allow_shared=allow_shared)

    # ----------------------------------------------------------------- reading

    def versions(self, user_id: str) -> list[int]:
        """Version numbers stored for ``user_id``, ascending (empty if none)."""
        return sorted(_version_dirs(self._user_dir(user_id)))

    def users(self) -> list[str]:
        """Ids of users with a current adapter, sorted (the shared adapter is not a user)."""
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        return sorted(
            e.name for e in entries if USER_ID_RE.fullmatch(e.name) and (e / CURRENT).is_file()
        )

    def _ref(self, user_id: str, version: int, path: Path) -> AdapterRef:
        manifest = read_manifest(path)
        if manifest.user_id != user_id or manifest.version != version:
            raise AdapterValidationError(
                path, f"manifest says {manifest.user_id}@v{manifest.version}"
            )
        return AdapterRef(user_id=user_id, version=version, path=path, manifest=manifest)

    def get(self, user_id: str, version: int) -> AdapterRef | None:
        """The ref of one stored version, or None if it does not exist."""
        path = self._user_dir(user_id) / _version_name(version)
        try:
            return self._ref(user_id, version, path)
        except FileNotFoundError:
            return None

    def current(self, user_id: str) -> AdapterRef | None:
        """The version ``CURRENT`` names, or None if the user has none (or was just deleted)."""
        user_dir = self._user_dir(user_id)
        try:
            name = (user_dir / CURRENT).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        m = _VERSION_RE.fullmatch(name)
        if m is None:
            raise AdapterValidationError(user_dir / CURRENT, f"not a version name: {name!r}")
        try:
            return self._ref(user_id, int(m[1]), user_dir / name)
        except FileNotFoundError:
            if not user_dir.exists():  # deleted between the two reads
                return None
            raise AdapterValidationError(user_dir, f"{CURRENT} names missing {name}") from None

    def shared(self) -> AdapterRef | None:
        """The current shared adapter, or None before the first federated round."""
        return self.current(SHARED_ID)

    def load(self, ref: AdapterRef) -> LoraWeights:
        """Validate a stored version under this store's policy and return its weights."""
        weights = validate_adapter(
            ref.path,
            self.module_shapes,
            self.max_rank,
            self.base_fingerprint,
            require_manifest=True,
        )
        manifest = read_manifest(ref.path)
        if (manifest.user_id, manifest.version) != (ref.user_id, ref.version):
            raise AdapterValidationError(
                ref.path, f"manifest does not belong to {ref.adapter_name}"
            )
        return weights

    # ----------------------------------------------------------------- writing

    def publish(
        self,
        user_id: str,
        weights: LoraWeights,
        *,
        base_fingerprint: str,
        server_round: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> AdapterRef:
        """Store ``weights`` as ``user_id``'s next version and make it current, atomically.

        ``base_fingerprint`` is ``llmrec.model.fingerprint_model_dir`` of the base the
        adapter belongs to. Raises :class:`AdapterValidationError` (nothing is published)
        if the adapter breaks this store's policy.
        """
        return self._publish(
            validate_user_id(user_id), weights, base_fingerprint, server_round, metrics
        )

    def publish_shared(
        self,
        weights: LoraWeights,
        *,
        base_fingerprint: str,
        server_round: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> AdapterRef:
        """Store a new version of the shared adapter (see :meth:`publish`)."""
        return self._publish(SHARED_ID, weights, base_fingerprint, server_round, metrics)

    def _publish(
        self,
        user_id: str,
        weights: LoraWeights,
        base_fingerprint: str,
        server_round: int | None,
        metrics: Mapping[str, float] | None,
    ) -> AdapterRef:
        if self.base_fingerprint is not None and base_fingerprint != self.base_fingerprint:
            raise AdapterValidationError(
                self.root / user_id, "base_fingerprint differs from the store's served base"
            )
        user_dir = self.root / user_id
        user_dir.mkdir(parents=True, exist_ok=True)
        # The heavy part (tensors, hashes, validation) happens outside the lock. The folder
        # becomes the next version, whose number is only known under the lock.
        tmp = make_tmp_dir(user_dir / "next-version", prefix=TMP_PREFIX)
        try:
            write_adapter(weights, tmp)
            validate_adapter(tmp, self.module_shapes, self.max_rank)
            fields = {
                "user_id": user_id,
                "kind": "shared" if user_id == SHARED_ID else "user",
                "base_model": weights.base_model,
                "base_fingerprint": base_fingerprint,
                "rank": weights.r,
                "alpha": weights.alpha,
                "target_modules": list(weights.target_modules),
                "round": server_round,  # the on-disk key
                "metrics": dict(metrics or {}),
                "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "files": {n: sha256_file(tmp / n) for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)},
            }
            AdapterManifest(version=1, **fields)  # fail on bad fields before taking the lock
            with file_lock(user_dir / LOCK_FILE):
                if not tmp.is_dir():
                    raise FileNotFoundError(f"{user_id} was deleted while publishing")
                self._sweep_stale_tmp(user_dir)
                version = self._rename_into_place(user_dir, tmp, fields)
                write_text_atomic(user_dir / CURRENT, _version_name(version) + "\n")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        ref = self._ref(user_id, version, user_dir / _version_name(version))
        logger.info("published %s (rank %d)", served_name(ref.adapter_name), weights.r)
        return ref

    def _rename_into_place(self, user_dir: Path, tmp: Path, fields: dict) -> int:
        """Write the manifest for the next free version and rename ``tmp`` to it.

        Under the lock the first try succeeds; the retry loop is for hosts without flock,
        where another publisher may take the same number first (rename then fails because
        the target is a non-empty folder) and we move on to the next number.
        """
        version = max(_version_dirs(user_dir), default=0) + 1
        for _ in range(_PUBLISH_RETRIES):
            manifest = AdapterManifest(version=version, **fields)
            write_text_atomic(tmp / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
            fsync_path(tmp)
            final = user_dir / _version_name(version)
            if not final.exists():
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not final.is_dir():
                        raise
                else:
                    fsync_path(user_dir)
                    return version
            version = max(max(_version_dirs(user_dir), default=0), version) + 1
        raise RuntimeError(f"could not find a free version number in {user_dir}")

    def _sweep_stale_tmp(self, user_dir: Path) -> None:
        """Remove temp folders of writers that crashed long ago (readers never see them)."""
        now = time.time()
        for entry in user_dir.iterdir():
            if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > _STALE_TMP_S:
                        shutil.rmtree(entry, ignore_errors=True)

    def set_current(self, user_id: str, version: int) -> AdapterRef:
        """Point ``CURRENT`` at an existing version (a rollback); returns its ref."""
        user_dir = self._user_dir(user_id)
        path = user_dir / _version_name(version)
        ref = self._ref(user_id, version, path)  # raises if missing or inconsistent
        self.load(ref)  # never make current what readers would refuse
        with file_lock(user_dir / LOCK_FILE):
            write_text_atomic(user_dir / CURRENT, _version_name(version) + "\n")
        return ref

    def prune(self, user_id: str, keep: int = 3) -> list[int]:
        """Delete all but the newest ``keep`` versions (never the current one); returns them.

        A reader still holding a ref to a removed version fails to load it: prune only
        versions no server can still be loading.
        """
        if keep < 1:
            raise ValueError("keep must be >= 1")
        user_dir = self._user_dir(user_id)
        if not user_dir.is_dir():
            return []
        removed = []
        with file_lock(user_dir / LOCK_FILE):
            current = self.current(user_id)
            dirs = _version_dirs(user_dir)
            for version in sorted(dirs)[:-keep]:
                if current is not None and version == current.version:
                    continue
                trash = user_dir / f"{TMP_PREFIX}pruned-{version}-{time.monotonic_ns()}"
                os.rename(dirs[version], trash)  # atomic: the version vanishes in one step
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(version)
        return removed

    def delete(self, user_id: str) -> bool:
        """Delete every version of ``user_id`` (the shared adapter cannot be deleted here).

        The user folder is renamed to a hidden tombstone in one step, so readers see either
        the whole user or nothing, then removed. Returns False if there was nothing to delete.
        """
        user_dir = self._user_dir(user_id, allow_shared=False)
        if not user_dir.is_dir():
            return False
        tombstone = self.root / f"{TOMBSTONE_PREFIX}{user_id}-{time.monotonic_ns()}"
        with file_lock(user_dir / LOCK_FILE):  # let an in-flight publish finish first
            os.rename(user_dir, tombstone)
        fsync_path(self.root)
        shutil.rmtree(tombstone, ignore_errors=True)
        # Tombstones of earlier deletes that crashed before their rmtree.
        for entry in self.root.iterdir():
            if entry.name.startswith(TOMBSTONE_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
        logger.info("deleted all adapters of %s", pseudonym(user_id))
        return True

    # ----------------------------------------------------------------- export / import

    def export(self, user_id: str, zip_path: str | Path) -> Path:
        """Write the current version (PEFT files + manifest) of ``user_id`` to a zip.

        The adapter is validated first, so a corrupt version is never handed out; the zip
        is written beside ``zip_path`` and renamed into place.
        """
        ref = self.current(user_id)
        if ref is None:
            raise FileNotFoundError(f"no adapter stored for {user_id!r}")
        self.load(ref)
        zip_path = Path(zip_path)
        write_atomic(zip_path, lambda tmp: write_adapter_zip(ref.path, tmp))
        return zip_path

    def import_zip(
        self, user_id: str, zip_path: str | Path, max_bytes: int = MAX_IMPORT_BYTES
    ) -> AdapterRef:
        """Validate an exported zip and publish it as ``user_id``'s next version.

        The zip must hold exactly ``adapter_config.json``, ``adapter_model.safetensors`` and
        ``manifest.json`` (a ``README.md`` is ignored) as flat members: no folders, links,
        absolute or ``..`` names, nothing pickled, at most ``max_bytes`` uncompressed. The
        files must match the manifest's sha256s and pass this store's policy. The manifest's
        fingerprint, round and metrics carry over; the version and time are new.
        """
        validate_user_id(user_id)
        zip_path = Path(zip_path)
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(
            prefix=f"{TMP_PREFIX}import-", dir=self.root, ignore_cleanup_errors=True
        ) as tmp:
            staging = Path(tmp)
            extract_adapter_zip(zip_path, staging, max_bytes)
            weights = validate_adapter(
                staging,
                self.module_shapes,
                self.max_rank,
                self.base_fingerprint,
                require_manifest=True,
            )
            manifest = read_manifest(staging)
            if manifest.user_id != user_id:
                logger.info(
                    "importing %s's adapter as %s", pseudonym(manifest.user_id), pseudonym(user_id)
                )
            return self.publish(
                user_id,
                weights,
                base_fingerprint=manifest.base_fingerprint,
                server_round=manifest.server_round,
                metrics=manifest.metrics,
            )
