"""Forgetting users from the shared model: retrain from the last checkpoint before they took part.

A round averages its clients' updates into the shared state, and no average can be taken apart
again, so the one exact way to remove a user's influence is to recompute every round from the
last state they never touched. ``forgotten.json`` in the run folder lists the users forgotten.
On every (re)start the run cuts itself back to the last checkpoint before the first round that
selected one of them, and selects them never again. Their slot in the cohort stays (a round that
drew them trains without them), so every other round draws the same clients as before: the
result is the run that never had them, bit for bit (tests/test_federated.py). The run folder
then names them nowhere: ``forgotten.json`` holds salted digests of their ids, ``run.json``
lists the cohort without them, and the validation records of the rounds kept lose their
entries (the means are taken again over the others).

A checkpoint is a round whose server-optimizer state was kept (``fed.checkpoint_every``), or
any round when the server has no optimizer. Personal parts trained during the rounds are
pruned as the run goes, so a run whose personal part trains in the rounds cannot go back;
forgetting needs ``decoupling.schedule="after"`` (or no personal part).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from statistics import fmean

from llmrec.adapters import validate_user_id
from llmrec.atomic import write_json_atomic
from llmrec.config import FedConfig
from llmrec.federated.client_state import personal_path, personal_versions
from llmrec.federated.layout import (
    CLIENTS_DIR,
    EXPORT_JSON,
    ROUND_JSON,
    completed_rounds,
    read_records,
    round_dir,
    write_metrics,
)
from llmrec.federated.validation import VAL_K

FORGOTTEN_JSON = "forgotten.json"
_SALT = b"llmrec-forgotten\0"


def forgotten_digest(user_id: str) -> str:
    """What ``forgotten.json`` keeps of a forgotten user: a salted sha256 of the id, which
    recognises them in the cohort and names no one to a reader of the folder."""
    return hashlib.sha256(_SALT + user_id.encode()).hexdigest()


def _digests(output_dir: Path) -> set[str]:
    path = Path(output_dir) / FORGOTTEN_JSON
    if not path.is_file():
        return set()
    data = json.loads(path.read_text())
    # Folders of the first release of --forget list the ids themselves.
    return set(data.get("digests", [])) | {forgotten_digest(u) for u in data.get("users", [])}


def forgotten_among(output_dir: Path, users: Iterable[str]) -> set[str]:
    """Those of ``users`` this run has forgotten."""
    digests = _digests(output_dir)
    return {u for u in users if forgotten_digest(u) in digests}


def forgotten_count(output_dir: Path) -> int:
    """How many users this run has forgotten (in its cohort or not)."""
    return len(_digests(output_dir))


def check_forgettable(fed: FedConfig) -> None:
    """Raise ``ValueError`` unless a run with these settings can go back to a checkpoint."""
    if fed.personal_rank and fed.decoupling.schedule != "after":
        raise ValueError(
            "forgetting a user needs fed.decoupling.schedule=after (or fed.personal_rank=0): "
            f"under {fed.decoupling.schedule!r} the personal parts trained in each round are "
            "pruned as the run goes, so no earlier round can be redone exactly"
        )


def add_forgotten(output_dir: Path, users: Iterable[str]) -> int:
    """Add ``users`` to the run's forgotten users (atomically); returns how many it has."""
    every = _digests(output_dir) | {forgotten_digest(validate_user_id(u)) for u in users}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(output_dir) / FORGOTTEN_JSON, {"digests": sorted(every)})
    return len(every)


def restart_after(
    output_dir: Path, done: Sequence[int], users: set[str], resumable: Callable[[int], bool]
) -> int:
    """The last complete round to keep: the latest resumable round (0: the seeded start)
    before the first round that selected one of ``users``, or at most ``done[-1]`` when none
    did (a cut-back cut off part way leaves a prefix of rounds, not all of them resumable)."""
    limit = done[-1] if done else 0
    for server_round, record in zip(done, read_records(output_dir, done), strict=True):
        if users & set(record["selected"]):
            limit = server_round - 1
            break
    return max((r for r in done if r <= limit and resumable(r)), default=0)


def cut_back(output_dir: Path, keep: int, cohort: Sequence[str], users: Iterable[str]) -> int:
    """Delete what rounds after ``keep`` made, and what a forgotten user left: first the export
    record (when it is stale: later rounds, or a forgotten user exported), then each client's
    personal versions after ``keep`` and ``users``' client folders, then the rounds, the latest
    first, so that a cut-back cut off part way is finished by the next start. Returns how many
    rounds went."""
    out = Path(output_dir)
    users = set(users)
    later = [r for r in completed_rounds(out) if r > keep]
    export = out / EXPORT_JSON
    if export.is_file() and (later or users & set(json.loads(export.read_text()).get("users", {}))):
        export.unlink()  # the next export publishes again and deletes their adapters
    for user_id in cohort:
        for v in personal_versions(out, user_id):
            if v > keep:
                personal_path(out, user_id, v).unlink()
    for user_id in users:
        shutil.rmtree(out / CLIENTS_DIR / user_id, ignore_errors=True)
    for server_round in reversed(later):
        shutil.rmtree(round_dir(out, server_round))
    kept = completed_rounds(out)
    if any(_drop_validation(out, r, users) for r in kept):
        write_metrics(out, read_records(out, kept))
    return len(later)


def _drop_validation(output_dir: Path, server_round: int, users: set[str]) -> bool:
    """Remove ``users``' entries from the round's validation record, and take its means
    again over the others (NDCG needs each user's, recorded since this release: else None).
    True when the record changed."""
    path = round_dir(output_dir, server_round) / ROUND_JSON
    record = json.loads(path.read_text())
    per_user = record.get("val_per_user") or {}
    if not users & set(per_user):
        return False
    rest = {u: row for u, row in per_user.items() if u not in users}
    rows = list(rest.values())
    record[f"val_HR@{VAL_K}"] = fmean(r["hit"] for r in rows) if rows else None
    has_ndcg = rows and all("ndcg" in r for r in rows)
    record[f"val_NDCG@{VAL_K}"] = fmean(r["ndcg"] for r in rows) if has_ndcg else None
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    record["val_loss"] = fmean(losses) if losses else None
    record["val_per_user"] = rest
    write_json_atomic(path, record, allow_nan=False)
    return True
