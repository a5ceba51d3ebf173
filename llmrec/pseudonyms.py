"""Pseudonyms for log lines: no log line names a user.

A log outlives what it describes (rotated copies, a terminal's scrollback, a collector), so
erasing a user cannot reach it. Every line that concerns a user therefore carries
:func:`pseudonym` instead of the id: a keyed hash whose key is random per process and never
written anywhere. Lines of one process about one user still share a pseudonym (enough to
follow a request or a training run), and once the process is gone nobody, the operator
included, can tell whose lines they were.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets

_KEY = secrets.token_bytes(32)


def pseudonym(user_id: str) -> str:
    """``user_id`` as it appears in this process's logs: ``u-`` and 10 hex digits."""
    return "u-" + hashlib.blake2b(user_id.encode(), key=_KEY, digest_size=5).hexdigest()


def served_name(adapter_name: str) -> str:
    """A served adapter name (``<user_id>@v<version>``) as it appears in logs."""
    user_id, sep, version = adapter_name.rpartition("@")
    return f"{pseudonym(user_id)}{sep}{version}" if sep else pseudonym(adapter_name)


_PSEUDONYM = re.compile(r"u-[0-9a-f]{10}")
# A served name (``<user_id>@v<version>``) or a store path's ``<user_id>/v<version>`` part;
# user ids start with a letter or digit, so ``_shared`` never matches.
_NAMED = re.compile(r"(?<![\w.-])([A-Za-z0-9][\w.-]{0,63})(@v\d+|[/\\]v\d{4,})")


def redact(text: str) -> str:
    """``text`` with every served adapter name and adapter-store path given a pseudonym."""

    def swap(match: re.Match) -> str:
        user_id, version = match.groups()
        if _PSEUDONYM.fullmatch(user_id):
            return match.group(0)
        return pseudonym(user_id) + version

    return _NAMED.sub(swap, text)


class RedactFilter(logging.Filter):
    """A handler filter: log records leave with :func:`redact` applied, for the lines a
    call site cannot pseudonymize itself (an error's text, the vLLM engine's own lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True
