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

Everything read back is validated (:func:`validate_adapter`) before it is returned, because
vLLM may only fail on a bad adapter at the first generation and take the engine down.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmrec.adapters.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterValidationError,
    LoraWeights,
    matches_targets,
    read_adapter,
    read_adapter_config,
    write_adapter,
)
from llmrec.atomic import FILE_MODE, fsync_path, write_text_atomic

__all__ = [
    "AdapterManifest",
    "AdapterRef",
    "AdapterStore",
    "AdapterValidationError",
    "module_shapes_for",
    "validate_adapter",
    "validate_user_id",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
LOCK_FILE = ".lock"
SHARED_ID = "_shared"
"""Reserved id of the shared adapter; user ids cannot start with ``_`` so never collide."""
DEFAULT_ROOT = Path("adapters")
DEFAULT_MAX_RANK = 64
"""Rank limit when the caller gives none; set it to the engine's ``--max-lora-rank``."""
MAX_IMPORT_BYTES = 2 << 30
"""Largest total uncompressed size accepted from a zip (guards against zip bombs)."""

USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"
_TOMBSTONE_PREFIX = ".deleted-"
_STALE_TMP_S = 3600.0
"""A temp folder this old belongs to a crashed writer (a publish takes seconds) and is swept."""
_PUBLISH_RETRIES = 100
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same adapter zips identically
_ZIP_MEMBERS = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST)
_ZIP_IGNORED = frozenset({"README.md"})  # peft's model card: harmless, dropped on import
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
_CHUNK = 1 << 20
_DIR_MODE = 0o755


def validate_user_id(user_id: str, allow_shared: bool = False) -> str:
    """Return ``user_id`` if it is a safe folder name, else raise ``ValueError``.

    Ids are 1-64 characters of ``[A-Za-z0-9_.-]`` starting with a letter or digit, so they
    can never be ``..``, a path, hidden, or the reserved ``_shared`` (allowed only when
    ``allow_shared``).
    """
    if allow_shared and user_id == SHARED_ID:
        return user_id
    if not isinstance(user_id, str) or not USER_ID_RE.fullmatch(user_id):
        raise ValueError(
            f"invalid user_id {user_id!r}: use 1-64 characters of [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return user_id


# --------------------------------------------------------------------------- manifest


class AdapterManifest(BaseModel):
    """``manifest.json`` of one stored version: what it is, for which base, and file hashes."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True
    )

    user_id: str
    """Owner id, or ``_shared`` for the shared adapter."""
    version: int = Field(ge=1)
    """Version number; equals the ``vNNNN`` folder it lives in."""
    kind: Literal["shared", "user"]
    """``shared`` for the federated shared adapter, ``user`` for a stacked per-user one."""
    base_model: str
    """``base_model_name_or_path`` of the adapter config (informative: paths differ by host)."""
    base_fingerprint: str
    """``llmrec.model.fingerprint_model_dir`` of the base it was trained on (authoritative)."""
    rank: int = Field(ge=1)
    """LoRA rank ``r`` of the stored adapter."""
    alpha: float = Field(gt=0)
    """``lora_alpha`` of the stored adapter."""
    target_modules: list[str]
    """Module-name suffixes the adapter targets."""
    round: int | None = Field(default=None, ge=0)
    """Federated round that produced it, if any."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Evaluation figures recorded at publish time (finite floats)."""
    created_at: str
    """UTC publish time, ISO-8601."""
    files: dict[str, str]
    """sha256 (hex) of each adapter file, keyed by file name."""

    @model_validator(mode="after")
    def _consistent(self) -> AdapterManifest:
        validate_user_id(self.user_id, allow_shared=True)
        if (self.user_id == SHARED_ID) != (self.kind == "shared"):
            raise ValueError(f"kind {self.kind!r} does not fit user_id {self.user_id!r}")
        datetime.fromisoformat(self.created_at)  # raises ValueError if not ISO-8601
        missing = {ADAPTER_CONFIG, ADAPTER_WEIGHTS} - set(self.files)
        if missing:
            raise ValueError(f"files lacks {sorted(missing)}")
        for name, digest in self.files.items():
            if name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                raise ValueError(f"unexpected file in manifest: {name!r}")
            if not _SHA256_RE.fullmatch(digest):
                raise ValueError(f"files[{name!r}] is not a lowercase hex sha256")
        return self


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


# --------------------------------------------------------------------------- file helpers


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(user_dir: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``<user_dir>/.lock`` (threads and processes alike).

    flock locks belong to the open file description, so two threads that each open the file
    exclude each other too. Without fcntl (Windows) or on filesystems that refuse locks,
    publish still cannot clobber a version: the rename collides and is retried.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(user_dir / LOCK_FILE, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:
            logger.debug("could not lock %s; relying on rename collisions", user_dir)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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


# --------------------------------------------------------------------------- validation


def module_shapes_for(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """``{module path: (out_features, in_features)}`` of a base model's linear layers.

    Built on the meta device from ``config.json`` alone (no weights are read), so it is cheap
    even for large bases. Keys are module paths as they appear in PEFT keys after
    ``base_model.model.``, e.g. ``model.layers.0.self_attn.q_proj``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
        elif type(module).__name__ == "Conv1D":  # GPT-2 style: weight stored as (in, out)
            in_features, out_features = module.weight.shape
            shapes[name] = (int(out_features), int(in_features))
    return shapes


def _read_manifest(path: Path) -> AdapterManifest:
    """Parse ``<path>/manifest.json`` or raise :class:`AdapterValidationError`."""
    try:
        return AdapterManifest.model_validate_json((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValidationError, ValueError) as e:
        raise AdapterValidationError(path, f"invalid {MANIFEST}: {e}") from e


def validate_adapter(
    path: str | Path,
    module_shapes: Mapping[str, tuple[int, int]] | None,
    max_rank: int,
    base_fingerprint: str | None = None,
    *,
    require_manifest: bool = False,
) -> LoraWeights:
    """Check that a folder is an adapter vLLM and peft can serve safely; return its weights.

    Raises :class:`AdapterValidationError` naming the first problem: not a plain LoRA (see
    :func:`llmrec.lora.read_adapter_config`), ``r > max_rank``, a pickle file in the folder,
    a manifest whose sha256s do not match the files or whose rank/alpha/targets disagree with
    the config, tensor modules that do not match ``target_modules``, shapes that do not fit
    ``module_shapes`` (``(out, in)`` per module path; skipped when None), non-finite values,
    or a manifest fingerprint other than ``base_fingerprint`` (skipped when None). A folder
    without ``manifest.json`` passes only if neither ``require_manifest`` nor
    ``base_fingerprint`` is set. Files are hashed before they are parsed, and tensors are read last.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterValidationError(path, "not a folder")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise AdapterValidationError(path, f"pickle files are never loaded: {pickles}")
    manifest: AdapterManifest | None = None
    if (path / MANIFEST).exists():
        manifest = _read_manifest(path)
        # Hash before parsing anything else: a tampered file is refused without being read.
        for name, digest in sorted(manifest.files.items()):
            try:
                actual = _sha256_file(path / name)
            except FileNotFoundError:
                raise AdapterValidationError(
                    path, f"{name} listed in {MANIFEST} is missing"
                ) from None
            if actual != digest:
                raise AdapterValidationError(path, f"sha256 mismatch for {name}")
    elif require_manifest or base_fingerprint is not None:
        raise AdapterValidationError(path, f"no {MANIFEST}")
    if base_fingerprint is not None and manifest is not None:
        if manifest.base_fingerprint != base_fingerprint:
            raise AdapterValidationError(
                path,
                f"trained on base {manifest.base_fingerprint[:12]}, "
                f"but the served base is {base_fingerprint[:12]}",
            )

    config = read_adapter_config(path)
    if config["r"] > max_rank:
        raise AdapterValidationError(path, f"rank {config['r']} exceeds max_rank {max_rank}")

    weights = read_adapter(path)
    if manifest is not None:
        if (
            manifest.rank != weights.r
            or not math.isclose(manifest.alpha, weights.alpha, rel_tol=1e-9)
            or sorted(set(manifest.target_modules)) != list(weights.target_modules)
            or manifest.base_model != weights.base_model
        ):
            raise AdapterValidationError(path, f"{MANIFEST} disagrees with {ADAPTER_CONFIG}")

    modules = set(weights.modules)
    unused = [
        t for t in weights.target_modules if not any(matches_targets(m, (t,)) for m in modules)
    ]
    if unused:
        raise AdapterValidationError(path, f"target modules without tensors: {unused}")
    if module_shapes is not None:
        expected = {m for m in module_shapes if matches_targets(m, weights.target_modules)}
        if modules != expected:
            extra, missing = sorted(modules - expected), sorted(expected - modules)
            raise AdapterValidationError(
                path,
                f"tensor modules do not match the base's targeted modules "
                f"(not in base: {extra[:3]}, without tensors: {missing[:3]})",
            )
        for module in sorted(modules):
            out_f, in_f = module_shapes[module]
            a, b = weights.pair(module)
            if tuple(a.shape) != (weights.r, in_f) or tuple(b.shape) != (out_f, weights.r):
                raise AdapterValidationError(
                    path,
                    f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                    f"a ({out_f}, {in_f}) layer at rank {weights.r}",
                )
    for key, tensor in weights.state.items():
        if not torch.isfinite(tensor).all():
            raise AdapterValidationError(path, f"non-finite values in {key}")
    return weights


# --------------------------------------------------------------------------- the store


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
        manifest = _read_manifest(path)
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
        manifest = _read_manifest(ref.path)
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
        round: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> AdapterRef:
        """Store ``weights`` as ``user_id``'s next version and make it current, atomically.

        ``base_fingerprint`` is ``llmrec.model.fingerprint_model_dir`` of the base the
        adapter belongs to. Raises :class:`AdapterValidationError` (nothing is published)
        if the adapter breaks this store's policy.
        """
        return self._publish(validate_user_id(user_id), weights, base_fingerprint, round, metrics)

    def publish_shared(
        self,
        weights: LoraWeights,
        *,
        base_fingerprint: str,
        round: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> AdapterRef:
        """Store a new version of the shared adapter (see :meth:`publish`)."""
        return self._publish(SHARED_ID, weights, base_fingerprint, round, metrics)

    def _publish(
        self,
        user_id: str,
        weights: LoraWeights,
        base_fingerprint: str,
        round: int | None,
        metrics: Mapping[str, float] | None,
    ) -> AdapterRef:
        if self.base_fingerprint is not None and base_fingerprint != self.base_fingerprint:
            raise AdapterValidationError(
                self.root / user_id, "base_fingerprint differs from the store's served base"
            )
        user_dir = self.root / user_id
        user_dir.mkdir(parents=True, exist_ok=True)
        # The heavy part (tensors, hashes, validation) happens outside the lock.
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=user_dir))
        try:
            os.chmod(tmp, _DIR_MODE)
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
                "round": round,
                "metrics": dict(metrics or {}),
                "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "files": {n: _sha256_file(tmp / n) for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)},
            }
            AdapterManifest(version=1, **fields)  # fail on bad fields before taking the lock
            with _locked(user_dir):
                if not tmp.is_dir():
                    raise FileNotFoundError(f"{user_id} was deleted while publishing")
                self._sweep_stale_tmp(user_dir)
                version = self._rename_into_place(user_dir, tmp, fields)
                write_text_atomic(user_dir / CURRENT, _version_name(version) + "\n")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        ref = self._ref(user_id, version, user_dir / _version_name(version))
        logger.info("published %s (rank %d)", ref.adapter_name, weights.r)
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
            if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > _STALE_TMP_S:
                        shutil.rmtree(entry, ignore_errors=True)

    def set_current(self, user_id: str, version: int) -> AdapterRef:
        """Point ``CURRENT`` at an existing version (a rollback); returns its ref."""
        user_dir = self._user_dir(user_id)
        path = user_dir / _version_name(version)
        ref = self._ref(user_id, version, path)  # raises if missing or inconsistent
        self.load(ref)  # never make current what readers would refuse
        with _locked(user_dir):
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
        with _locked(user_dir):
            current = self.current(user_id)
            dirs = _version_dirs(user_dir)
            for version in sorted(dirs)[:-keep]:
                if current is not None and version == current.version:
                    continue
                trash = user_dir / f"{_TMP_PREFIX}pruned-{version}-{time.monotonic_ns()}"
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
        tombstone = self.root / f"{_TOMBSTONE_PREFIX}{user_id}-{time.monotonic_ns()}"
        with _locked(user_dir):  # let an in-flight publish finish first
            os.rename(user_dir, tombstone)
        fsync_path(self.root)
        shutil.rmtree(tombstone, ignore_errors=True)
        # Tombstones of earlier deletes that crashed before their rmtree.
        for entry in self.root.iterdir():
            if entry.name.startswith(_TOMBSTONE_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
        logger.info("deleted all adapters of %s", user_id)
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
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{zip_path.name}.", suffix=".tmp", dir=zip_path.parent)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name in _ZIP_MEMBERS:
                    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = (stat.S_IFREG | FILE_MODE) << 16
                    with open(ref.path / name, "rb") as src, zf.open(info, "w") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, zip_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
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
        staging = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}import-", dir=self.root))
        try:
            _extract_adapter_zip(zip_path, staging, max_bytes)
            weights = validate_adapter(
                staging,
                self.module_shapes,
                self.max_rank,
                self.base_fingerprint,
                require_manifest=True,
            )
            manifest = _read_manifest(staging)
            if manifest.user_id != user_id:
                logger.info("importing %s's adapter as %s", manifest.user_id, user_id)
            return self.publish(
                user_id,
                weights,
                base_fingerprint=manifest.base_fingerprint,
                round=manifest.round,
                metrics=manifest.metrics,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _extract_adapter_zip(zip_path: Path, dest: Path, max_bytes: int) -> None:
    """Copy the allowed members of an adapter zip into ``dest``, refusing anything unsafe.

    Member names are never used as paths: each accepted member is written to a fixed name
    in ``dest``, so even a check missed here could not write outside it.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise AdapterValidationError(zip_path, f"not a readable zip: {e}") from e
    with zf:
        seen: set[str] = set()
        total = 0
        for info in zf.infolist():
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
            if name in seen:
                raise AdapterValidationError(zip_path, f"duplicate member {name!r}")
            seen.add(name)
            if name in _ZIP_IGNORED:
                continue
            if name not in _ZIP_MEMBERS:
                raise AdapterValidationError(zip_path, f"unexpected member {name!r}")
            # Count the bytes actually inflated, not the header's claim.
            with zf.open(info) as src, open(dest / name, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    total += len(chunk)
                    if total > max_bytes:
                        raise AdapterValidationError(zip_path, f"more than {max_bytes} bytes")
                    dst.write(chunk)
        missing = [m for m in _ZIP_MEMBERS if m not in seen]
        if missing:
            raise AdapterValidationError(zip_path, f"missing members {missing}")
