"""``manifest.json`` of a stored adapter version, and the user ids the store accepts."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmrec.adapters.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, SHARED_ID
from llmrec.adapters.lora import AdapterValidationError

USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


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


class AdapterManifest(BaseModel):
    """``manifest.json`` of one stored version: what it is, for which base, and file hashes.

    Attributes are the JSON keys, except ``server_round``, stored under ``"round"``.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
        serialize_by_alias=True,  # dumps use the on-disk keys
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
    server_round: int | None = Field(default=None, ge=0, alias="round")
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


def read_manifest(path: Path) -> AdapterManifest:
    """Parse ``<path>/manifest.json`` or raise :class:`AdapterValidationError`.

    A missing file raises ``FileNotFoundError``, so callers can tell "absent" from "bad".
    """
    try:
        return AdapterManifest.model_validate_json((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValidationError, ValueError) as e:
        raise AdapterValidationError(path, f"invalid {MANIFEST}: {e}") from e
