"""Robust aggregation on the real model: ALIE poisoning against FedAvg, median, trimmed mean.

A finished run of ``training/federated.py`` goes on for ``--rounds`` more rounds from its
last shared state and server-optimizer moments, in four arms that draw the same clients
each round (the run's own draws, ``select_clients``):

- ``clean``: FedAvg, every client honest (the reference);
- ``fedavg``, ``median``, ``trimmed_mean``: the same rule under attack. ``--fraction`` of
  each round's clients (drawn with ``--seed``) are attackers that all send the ALIE update
  (``llmrec.federated.poisoning.alie``: the honest updates' mean + ``--z`` std per
  coordinate, computed from that arm's own honest updates). The trimmed mean cuts as many
  clients per side as there are attackers.

Every arm trains its honest clients from its own shared state, and is aggregated by the
run's own server (``server_update``, FedAdam where the run used it). The update-norm bound
is switched off in all arms, as in ``tests/test_poisoning.py``: it is another defence, and
this bench measures the aggregation rules. After the last round each arm's shared state is
scored on every user's validation item (NLL of the item, and HR/NDCG@10 over the unseen
catalog); the per-round curve is the NLL of the run's validation users.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/poisoning.py --run outputs/fed-seed0 --rounds 10

Writes ``bench/reports/poisoning.json`` and a PNG beside it. Goals (issue 14): the attack
is real when FedAvg's validation NLL rises by at least 20% over the clean arm; the median
and the trimmed mean hold when theirs stays within 5% of it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from llmrec import federated as F
from llmrec.atomic import write_json_atomic
from llmrec.config import AppConfig, FedConfig
from llmrec.data import dataset_from_config, leave_last_out, user_sort_key
from llmrec.federated import VAL_K
from llmrec.federated.aggregate import update_norm
from llmrec.federated.poisoning import alie
from llmrec.finetune import sample_users
from llmrec.plots import plot_curve
from llmrec.quality import Task, per_user, target_ranks

RULES = ("fedavg", "median", "trimmed_mean")


@dataclass
class Arm:
    """One trajectory: its server (rule and optimizer), its shared state, its curve."""

    name: str
    fed: FedConfig
    attacked: bool
    state: F.State
    optimizer: F.ServerAdam | None
    curve: list[float] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("outputs/federated"))
    parser.add_argument("--rounds", type=int, default=10, help="rounds after the run's last")
    parser.add_argument("--fraction", type=float, default=0.2, help="attackers per round")
    parser.add_argument("--z", type=float, default=20.0, help="ALIE's std multiplier")
    parser.add_argument("--seed", type=int, default=0, help="which clients attack")
    parser.add_argument("--report", type=Path, default=Path("bench/reports/poisoning.json"))
    args = parser.parse_args()
    run = args.run
    cfg = AppConfig.model_validate(json.loads((run / F.RUN_JSON).read_text())["config"])
    fed = cfg.fed
    if not fed.shared_rank:
        raise SystemExit(f"{run}: a personal-only run federates nothing to poison")
    n = fed.clients_per_round
    attackers = round(args.fraction * n)
    if not 1 <= attackers <= n - 2 or 2 * attackers >= n:
        raise SystemExit(f"--fraction {args.fraction}: {attackers} of {n} clients cannot attack")
    dataset = dataset_from_config(cfg)
    catalog = dataset.catalog
    split = leave_last_out(dataset.histories)
    loaded = F.load_federated_model(cfg, catalog)
    dual, scorer = loaded.dual, loaded.ranker
    cohort = F.federated_cohort(split, fed)
    start = fed.rounds
    shared = F.read_round_state(run, start, dual.shared)
    no_personal = F.scale_personal(F.init_personal_state(dual, 0, "0"), 0.0)
    examples: dict[str, list] = {}

    def examples_of(user: str) -> list:
        if user not in examples:
            examples[user] = F.client_examples(
                split, catalog, loaded.prompts, fed, user, dual.vocab
            )
        return examples[user]

    def make_arm(name: str, rule: str, attacked: bool) -> Arm:
        arm_fed = fed.model_copy(
            update={"aggregation": rule, "trim_ratio": attackers / n, "max_update_norm": None}
        )
        optimizer = F.server_optimizer(arm_fed, shared)
        if optimizer is not None:
            optimizer.load(F.server_optimizer_path(run, start))
        return Arm(name, arm_fed, attacked, dict(shared), optimizer)

    arms = [make_arm("clean", "fedavg", False)] + [make_arm(r, r, True) for r in RULES]
    val_users = sample_users(cohort, fed.val_users, F.derive_seed(fed.seed, "val"))
    curve_task = Task.valid(split, val_users)
    users = sorted(split.valid, key=user_sort_key)
    final_task = Task.valid(split, users)

    def score(state: F.State, task: Task) -> tuple[np.ndarray, np.ndarray]:
        """Per-user NLL of the validation item and its 0-based rank, shared part alone."""
        dual.load(state, no_personal)
        log_probs = scorer.log_probs(task.histories).numpy()
        targets = [catalog.index(t) for t in task.targets]
        nll = -log_probs[np.arange(len(targets)), targets]
        return nll, target_ranks(log_probs, task, catalog)

    began = time.perf_counter()
    before = float(score(shared, curve_task)[0].mean())
    norms: dict[str, list[float]] = {"honest": [], "poison": []}
    with tempfile.TemporaryDirectory() as scratch:  # personal states stay out of the run
        for server_round in tqdm(range(start + 1, start + args.rounds + 1), desc="rounds"):
            selected = F.select_clients(cohort, n, fed.seed, server_round)
            rng = random.Random(F.derive_seed(args.seed, "attackers", server_round))
            bad = set(rng.sample(selected, attackers))
            for arm in tqdm(arms, desc=f"round {server_round}", leave=False):
                honest = [u for u in selected if not (arm.attacked and u in bad)]
                uploads = _train(
                    dual, Path(scratch), honest, examples_of, arm.state, fed, server_round
                )
                if arm.attacked:
                    poison = alie([u.shared_delta for u in uploads], args.z)
                    claimed = round(statistics.fmean(u.n_examples for u in uploads))
                    uploads += [F.ClientUpdate(u, poison, claimed, 0.0, 0.0) for u in bad]
                    norms["poison"].append(update_norm(poison))
                    norms["honest"] += [update_norm(u.shared_delta) for u in uploads[:-attackers]]
                outcome = F.server_update(arm.state, uploads, arm.fed, None, arm.optimizer)
                if arm.attacked and len(outcome.accepted) != n:
                    raise RuntimeError(f"{arm.name}: the server rejected {outcome.rejected}")
                arm.state = outcome.shared_state
                arm.curve.append(float(score(arm.state, curve_task)[0].mean()))
    final = {}
    for arm in tqdm(arms, desc="every user"):
        nll, ranks = score(arm.state, final_task)
        metrics = per_user(ranks, VAL_K)
        final[arm.name] = {
            "nll": round(float(nll.mean()), 4),
            **{name: round(float(v.mean()), 4) for name, v in metrics.items()},
        }
    clean = final["clean"]["nll"]
    rise = {r: round(final[r]["nll"] / clean - 1, 4) for r in RULES}
    out = {
        "command": f"bench/poisoning.py --run {run} --rounds {args.rounds} "
        f"--fraction {args.fraction} --z {args.z} --seed {args.seed}",
        "model": cfg.model.name_or_path,
        "users": len(users),
        "curve_users": len(val_users),
        "from_round": start,
        "rounds": args.rounds,
        "clients_per_round": n,
        "attackers_per_round": attackers,
        "z": args.z,
        "trimmed_per_side": attackers,
        "server_optimizer": fed.server_optimizer,
        "max_update_norm": None,
        "update_norm_median": {k: round(statistics.median(v), 4) for k, v in norms.items()},
        "valid_nll_before": round(before, 4),
        "valid": final,
        "nll_rise_vs_clean": rise,
        "attack_is_real": rise["fedavg"] >= 0.20,
        "defence_holds": {r: abs(rise[r]) <= 0.05 for r in ("median", "trimmed_mean")},
        "curves_nll": {arm.name: [round(v, 4) for v in arm.curve] for arm in arms},
        "seconds": round(time.perf_counter() - began, 1),
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.report, out)
    plot_curve(
        out["curves_nll"],
        args.report.with_suffix(".png"),
        f"round after {start}",
        f"validation NLL ({len(val_users)} users)",
        f"ALIE z={args.z}, {attackers} of {n} clients a round",
    )
    print(json.dumps({k: out[k] for k in ("valid", "nll_rise_vs_clean", "defence_holds")}))
    print(f"-> {args.report}")


def _train(
    dual, scratch: Path, users, examples_of, state: F.State, fed, server_round: int
) -> list[F.ClientUpdate]:
    """The honest clients' uploads from ``state``, in groups of ``fed.client_batch`` trained
    together (similar lengths side by side, as the runner groups them)."""
    ordered = sorted(
        users, key=lambda u: (max(len(e.input_ids) for e in examples_of(u)), user_sort_key(u))
    )
    size = fed.client_batch
    uploads = []
    for i in range(0, len(ordered), size):
        jobs = [(u, examples_of(u)) for u in ordered[i : i + size]]
        uploads += [r.upload() for r in F.run_clients(dual, scratch, jobs, state, server_round)]
    return sorted(uploads, key=lambda u: user_sort_key(u.user_id))


if __name__ == "__main__":
    main()
