"""Robust aggregation against model poisoning: 20% of a round's clients send ALIE-style
updates (Baruch et al. 2019, "A Little Is Enough": the honest updates' coordinate-wise mean
plus ``z`` standard deviations), on the tiny item-token model.

The attack is real when FedAvg's validation NLL rises by at least 20% over the clean round;
the coordinate-wise median and the trimmed mean (cutting as many clients per side as there
are attackers) must stay within 5% of it. FedAvg failing the 5% bar is the same test with
the defence switched off.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmrec import federated as F
from llmrec.config import load_config
from llmrec.data import leave_last_out
from llmrec.federated.poisoning import alie

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "training" / "configs" / "tiny.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "tiny"
CLIENTS, ATTACKERS, Z = 10, 2, 20.0


def _cfg(model_dir: Path, *extra: str):
    return load_config(
        TINY_YAML,
        [
            f"model.name_or_path={model_dir}",
            "model.dtype=float32",
            f"data.interactions={FIXTURE / 'interactions.csv'}",
            f"data.catalog={FIXTURE / 'catalog.csv'}",
            "fed.head=items",
            "fed.window=3",
            "fed.n_users=0",
            f"fed.clients_per_round={CLIENTS}",
            "fed.personal_rank=0",  # the shared part alone: what aggregation protects
            "fed.max_update_norm=null",  # the norm bound is another defence: off here
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def round_one(tiny_model_dir, tiny_dataset):
    """One round's honest uploads of 10 clients, 2 of them then replaced by attackers, and
    a function scoring a shared state by the validation NLL of the other users."""
    cfg = _cfg(tiny_model_dir)
    loaded = F.load_federated_model(cfg, tiny_dataset.catalog)
    dual = loaded.dual
    split = leave_last_out(tiny_dataset.histories)
    users = sorted(split.valid, key=int)
    clients, held_out = users[:CLIENTS], users[CLIENTS:]
    shared = F.init_shared_state(dual, cfg.fed.seed)
    uploads = []
    for user in clients:
        examples = F.client_examples(
            split, tiny_dataset.catalog, loaded.prompts, cfg.fed, user, dual.vocab
        )
        personal = F.init_personal_state(dual, cfg.fed.seed, user)
        uploads.append(F.client_update(dual, user, examples, shared, personal, 1).upload())
    honest = [u.shared_delta for u in uploads[ATTACKERS:]]
    poison = alie(honest, Z)
    poisoned = [
        F.ClientUpdate(u.user_id, poison, u.n_examples, u.loss, u.seconds)
        for u in uploads[:ATTACKERS]
    ] + uploads[ATTACKERS:]

    def nll(state: F.State) -> float:
        dual.load(state, {})
        losses = [F.validation_loss(dual, loaded.ranker, split, u) for u in held_out]
        return sum(losses) / len(losses)

    return cfg, shared, uploads, poisoned, nll


@pytest.mark.parametrize(
    "rule, extra",
    [("median", []), ("trimmed_mean", [f"fed.trim_ratio={ATTACKERS / CLIENTS}"])],
)
def test_robust_rules_hold_where_fedavg_breaks(round_one, tiny_model_dir, rule, extra):
    cfg, shared, uploads, poisoned, nll = round_one

    def after(updates, aggregation, *more):
        fed = _cfg(tiny_model_dir, f"fed.aggregation={aggregation}", *more).fed
        return nll(F.server_update(shared, updates, fed).shared_state)

    clean = after(uploads, "fedavg")
    attacked_fedavg = after(poisoned, "fedavg")
    attacked_robust = after(poisoned, rule, *extra)
    print(
        f"\nALIE z={Z}, {ATTACKERS}/{CLIENTS} clients: validation NLL clean {clean:.4f}, "
        f"FedAvg {attacked_fedavg:.4f}, {rule} {attacked_robust:.4f}"
    )
    assert attacked_fedavg >= 1.2 * clean  # the attack is real
    assert abs(attacked_robust - clean) <= 0.05 * clean  # the defence holds
    assert abs(attacked_fedavg - clean) > 0.05 * clean  # without it, the same bar fails
