"""A client's personal state on its own disk: ``clients/<user>/personal-rXXXX.safetensors``.

One file per round the user trained in, so a round redone on resume reads exactly the state
the uninterrupted run read. The personal state never leaves this folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from llmrec.atomic import write_atomic
from llmrec.federated.dual_lora import State
from llmrec.federated.layout import CLIENTS_DIR

_PERSONAL_RE = re.compile(r"^personal-r(\d{4,})\.safetensors$")


def personal_path(client_dir: Path, user_id: str, server_round: int) -> Path:
    """Where ``user_id`` keeps its personal state after ``server_round``."""
    name = f"personal-r{server_round:04d}.safetensors"
    return Path(client_dir) / CLIENTS_DIR / user_id / name


def personal_versions(client_dir: Path, user_id: str) -> list[int]:
    """Rounds for which ``user_id`` holds a personal state, ascending."""
    folder = Path(client_dir) / CLIENTS_DIR / user_id
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _PERSONAL_RE.fullmatch(p.name)))


def load_personal(client_dir: Path, user_id: str, before: int) -> State | None:
    """The user's latest personal state from a round < ``before`` (None: never trained).

    Versions >= ``before`` belong to a round being (re)done and are ignored, which is what
    makes a resumed round read the same state the uninterrupted run read.
    """
    older = [v for v in personal_versions(client_dir, user_id) if v < before]
    return load_file(personal_path(client_dir, user_id, older[-1])) if older else None


def save_personal(client_dir: Path, user_id: str, server_round: int, state: State) -> None:
    """Write the user's personal state after ``server_round`` (atomically: whole or absent)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_atomic(personal_path(client_dir, user_id, server_round), lambda t: save_file(tensors, t))


def prune_personal(client_dir: Path, user_id: str, before: int) -> None:
    """Delete the user's personal versions older than round ``before`` (no longer read)."""
    for v in personal_versions(client_dir, user_id):
        if v < before:
            personal_path(client_dir, user_id, v).unlink(missing_ok=True)


def settle_personal(client_dir: Path, user_id: str, done_round: int) -> None:
    """Leave the user's versions up to ``done_round`` as an uninterrupted run leaves them
    after that round: the latest one alone (a run cut off while pruning the older ones
    leaves them behind; later versions belong to a round being redone, which replaces them)."""
    kept = [v for v in personal_versions(client_dir, user_id) if v <= done_round]
    if kept:
        prune_personal(client_dir, user_id, before=kept[-1])
