"""Per-user API keys, stored only as hashes, and the admin key.

A key is 32 random bytes (``lrk_`` + urlsafe base64), shown once when it is made. The file
keeps ``sha256(key)`` -> who it belongs to: a slow password hash buys nothing for keys with
256 bits of entropy, and sha256 lets a lookup be one dict access. The file is written
atomically with mode 0600 and read again whenever its mtime changes, so ``llmrec keys add``
takes effect on a running gateway.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, TypeAdapter

from llmrec.adapters import validate_user_id
from llmrec.atomic import write_json_atomic
from llmrec.data import user_sort_key

log = logging.getLogger(__name__)

KEY_PREFIX = "lrk_"
ADMIN = "admin"


class KeyRecord(BaseModel):
    """What one stored key hash stands for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: str | None
    """The user the key acts as; None for an admin key."""
    admin: bool = False
    """Admin keys act for any user (named in the request)."""
    created_at: str
    """UTC creation time, ISO-8601."""


_FILE = TypeAdapter(dict[str, KeyRecord])


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    user_id: str | None
    admin: bool

    def may_act_for(self, user_id: str) -> bool:
        """True if this caller may use ``user_id``'s adapter, history and conversations."""
        return self.admin or self.user_id == user_id


def hash_key(key: str) -> str:
    """Hex sha256 of a key, as stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """The key file: make, revoke and check keys."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime: int | None = None
        self._records: dict[str, KeyRecord] = {}

    def _read(self) -> dict[str, KeyRecord]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._mtime, self._records = None, {}
            return self._records
        if mtime != self._mtime:
            self._records = _FILE.validate_json(self.path.read_bytes())
            self._mtime = mtime
        return self._records

    def _write(self, records: dict[str, KeyRecord]) -> None:
        data = {h: r.model_dump() for h, r in sorted(records.items())}
        write_json_atomic(self.path, data, sort_keys=True)
        os.chmod(self.path, 0o600)  # hashes only, but nobody else needs to read them

    def add(self, user_id: str | None, admin: bool = False) -> str:
        """Make a new key for ``user_id`` (or an admin key); returns it (shown once)."""
        if not admin:
            validate_user_id(user_id or "")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(
            user_id=None if admin else user_id,
            admin=admin,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        with self._lock:
            records = dict(self._read())
            records[hash_key(key)] = record
            self._write(records)
        return key

    def revoke(self, user_id: str | None, admin: bool = False) -> int:
        """Remove every key of ``user_id`` (or every admin key); returns how many."""
        with self._lock:
            records = dict(self._read())
            gone = [
                h
                for h, r in records.items()
                if (r.admin if admin else (not r.admin and r.user_id == user_id))
            ]
            for h in gone:
                del records[h]
            if gone:
                self._write(records)
        return len(gone)

    def revoke_key(self, key: str) -> bool:
        """Remove one key (e.g. a temporary one), leaving the user's others; False if unknown."""
        with self._lock:
            records = dict(self._read())
            if records.pop(hash_key(key), None) is None:
                return False
            self._write(records)
        return True

    def list(self) -> list[KeyRecord]:
        """All key records (never the keys)."""
        with self._lock:
            records = self._read().values()
            return sorted(records, key=lambda r: (not r.admin, user_sort_key(r.user_id or "")))

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal a presented key stands for, or None."""
        if not key or not key.startswith(KEY_PREFIX) or len(key) > 128:
            return None
        digest = hash_key(key)
        with self._lock:
            try:
                records = self._read()
            except (OSError, ValueError) as err:
                log.error("cannot read the key file %s: %s", self.path, err)
                return None
        # A dict lookup on the hash: its timing can only tell about sha256 outputs, which
        # gives an attacker nothing towards a preimage (hence no compare_digest loop).
        record = records.get(digest)
        return None if record is None else Principal(record.user_id, record.admin)
