"""Deleting a user: everything the library keeps about them, in one call.

What goes: the profile (history, feedback, exclusions, conversations, queue entry), every
version of the user's stacked adapter in the store, and the client-side personal state
that federated training and local refreshes keep (``<fed.output_dir>/clients/<user>/``).
What cannot go is written in docs/privacy.md: what the user's past updates contributed
to the shared adapter, averaged with everybody else's. The serving application
(``llmrec_serving``) adds the user's API keys.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from llmrec.adapters import AdapterStore
from llmrec.agent.profile import ErasureReport, ProfileStore
from llmrec.federated import client_dir
from llmrec.pseudonyms import pseudonym

log = logging.getLogger(__name__)


class UserErasure(BaseModel):
    """What deleting a user removed."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    profile: ErasureReport
    """Rows deleted from the profile database."""
    adapters: bool
    """Whether the user had adapter versions in the store (all are gone now)."""
    personal_state: bool
    """Whether a client-side personal state folder existed (it is gone now)."""
    keys: int = 0
    """API keys revoked (filled in by the serving application)."""


def erase_user(
    user_id: str, profiles: ProfileStore, store: AdapterStore, fed_output_dir: Path
) -> UserErasure:
    """Delete ``user_id``'s profile, adapters and client-side personal state."""
    report = profiles.erase(user_id)
    adapters = store.delete(user_id)
    folder = client_dir(fed_output_dir, user_id)
    had_state = folder.is_dir()
    if had_state:
        shutil.rmtree(folder)
    log.info(
        "erased %s: profile %s, adapters %s, personal state %s",
        pseudonym(user_id),
        report,
        adapters,
        had_state,
    )
    return UserErasure(user_id=user_id, profile=report, adapters=adapters, personal_state=had_state)
