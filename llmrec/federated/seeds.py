"""Seeds that depend on what is computed, never on where: ``derive_seed``."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, e.g. ``(seed, "client", server_round, user_id)``.

    sha256 of their text, so it is the same in every process and Python run (``hash()`` is
    salted per process and would make a client's result depend on where it ran).
    """
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
