"""Who takes part: the run's cohort, each round's clients, and which process runs which.

Selection is seeded by (seed, round) only, so 1 or N processes pick the same clients.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmrec.config import FedConfig
from llmrec.data import Split, user_sort_key
from llmrec.federated.seeds import derive_seed
from llmrec.finetune import sample_users


def eligible_users(split: Split) -> list[str]:
    """Users who can be clients: a validation item and at least two training items."""
    users = [u for u in split.valid if len(split.train[u]) >= 2]
    return sorted(users, key=user_sort_key)


def federated_cohort(split: Split, cfg: FedConfig) -> list[str]:
    """The run's cohort: a ``cfg.seed`` sample of ``cfg.n_users`` eligible users, in user order."""
    return sample_users(eligible_users(split), cfg.n_users, cfg.seed)


def select_clients(cohort: Sequence[str], n: int, seed: int, server_round: int) -> list[str]:
    """The ``n`` clients of ``server_round``: a seeded sample of the cohort, in user order."""
    chosen = random.Random(derive_seed(seed, "select", server_round)).sample(
        list(cohort), min(n, len(cohort))
    )
    return sorted(chosen, key=user_sort_key)


def shard(clients: Sequence[str], process_index: int, num_processes: int) -> list[str]:
    """Clients one process runs: client ``i`` goes to process ``i % num_processes``."""
    return list(clients[process_index::num_processes])
