"""Federated training of shared + personal LoRA adapters: the ``accelerate launch`` recipe.

Run from the repository root (CPU, one process; ``--resume`` continues an interrupted run,
``a.b=c`` overrides any config field)::

    accelerate launch --config_file training/accelerate/cpu.yaml training/federated.py \
        --config training/configs/ml100k.yaml [--resume] [fed.rounds=3 ...]

Several processes (clients are spread over them; results do not depend on how many)::

    accelerate launch --multi_gpu --num_processes 2 training/federated.py --config ...

On a host without CUDA that starts two CPU processes talking over gloo: accelerate's
``--cpu --num_processes 2`` starts only ONE process (its multi-CPU launcher needs mpirun).
``llmrec train --config ... [--num-processes N] [--resume]`` builds these commands for you.

Read it top to bottom: :class:`Recipe`'s setup, then :func:`run`'s round loop, one method a
step (docs/design.md, "Flow of data")::

    select clients (seeded by the round) -> client i runs on process i % world
      -> client_update: shared (downloaded) + its own personal adapter, trained on its own
         history; the new personal state stays in output_dir/clients/<user>/
      -> gather the uploads (shared delta + example count) on every process
      -> main: server_update (reject malformed/oversized, aggregate or DP) -> broadcast
      -> validation HR@10 on a fixed user sample (sharded) -> main writes round-XXXX/

Files under ``fed.output_dir`` (``llmrec.federated.layout``): ``round-XXXX/`` (the shared
adapter after round XXXX as a PEFT folder + ``round.json``; written whole or not at all),
``clients/<user>/personal-rXXXX.safetensors`` (client side, versioned by round, so a round
redone on resume reads exactly what the uninterrupted run read), ``metrics.json``, ``*.png``
curves, ``export.json``. After the last round the shared adapter and every trained user's
stacked adapter are published to the adapter store ``fed.store_dir``.

``--forget USER`` removes a user from the shared model (``llmrec.federated.forget``): the run
goes back to the last checkpoint before the user's first round and trains on without them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from llmrec.adapters import SHARED_ID
from llmrec.atomic import write_json_atomic
from llmrec.config import AppConfig, ConfigError, FedConfig, load_config
from llmrec.data import Catalog, Split, dataset_from_config, leave_last_out, user_sort_key
from llmrec.federated import (
    EXPORT_JSON,
    ITEM_ROWS_KEY,
    LOSS_PNG,
    RUN_JSON,
    VAL_K,
    VAL_PNG,
    ClientFn,
    ClientUpdate,
    DualLora,
    PrivacyAccountant,
    ServerOutcome,
    State,
    add_forgotten,
    check_forgettable,
    client_examples,
    client_update,
    completed_rounds,
    cut_back,
    derive_seed,
    federated_cohort,
    finite_metrics,
    forgotten_among,
    forgotten_count,
    init_shared_state,
    load_federated_model,
    load_personal,
    mean_or_none,
    open_store,
    personal_path,
    prune_personal,
    publish_once,
    publish_user,
    read_records,
    read_round_state,
    remove_partial_rounds,
    restart_after,
    run_client,
    run_clients,
    scale_picks,
    secure_generator,
    select_clients,
    served_base,
    server_optimizer,
    server_optimizer_path,
    server_update,
    settle_personal,
    shard,
    shared_weights,
    state_bytes,
    validate_user,
    write_metrics,
    write_round,
)
from llmrec.finetune import Example, sample_users
from llmrec.model import fingerprint_model_dir
from llmrec.plots import plot_curve
from llmrec.pseudonyms import RedactFilter, pseudonym
from llmrec.recommend import hit_rate_at_k, mean_metrics, ndcg_at_k

logger = get_logger(__name__)


def run(cfg: AppConfig, resume: bool = False, client_fn: ClientFn = client_update) -> dict:
    """Federated rounds from round 1 (or after the last complete one) to ``fed.rounds``.

    ``client_fn`` is the client update (a test can wrap it to inject failures). Returns the
    metrics written to ``metrics.json``.
    """
    recipe = Recipe(cfg, resume, client_fn)
    rounds = range(recipe.start, cfg.fed.rounds + 1) if recipe.has_rounds else range(0)
    bar = dict(initial=recipe.start - 1, total=cfg.fed.rounds, disable=not recipe.main)
    for server_round in tqdm(rounds, desc="rounds", **bar):
        selected = recipe.select(server_round)
        uploads, failed = recipe.clients(selected, server_round)
        outcome = recipe.server_update(uploads, server_round)
        val = recipe.validate(server_round)
        recipe.save_round(server_round, selected, uploads, failed, outcome, val)
    if not recipe.has_rounds and recipe.main:
        write_metrics(recipe.out, [])
    recipe.fit_personal()
    recipe.export()
    return {"rounds": recipe.records}


# --------------------------------------------------------------------------- the run's state


class Recipe:
    """One run on this process: what setup loads once, and the shared adapter as it moves.

    Every process holds the same ``shared`` after each round (the main process's result is
    broadcast); only the main process writes the run folder and keeps ``records``.
    """

    def __init__(self, cfg: AppConfig, resume: bool, client_fn: ClientFn) -> None:
        """Setup: data and cohort, the run folder checked (and run.json), the model, the state."""
        self.cfg, self.client_fn = cfg, client_fn
        fed = self.fed
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        dataset = dataset_from_config(cfg)
        self.catalog: Catalog = dataset.catalog
        self.split: Split = leave_last_out(dataset.histories)
        # Selection draws from every slot of the cohort; a forgotten user's slot stays, so
        # the other users' rounds are those of the run before (llmrec.federated.forget).
        self.slots = federated_cohort(self.split, fed)
        if len(self.slots) < fed.clients_per_round:
            raise ValueError(f"{len(self.slots)} eligible users, fewer than clients_per_round")
        self.forgotten = forgotten_among(self.out, self.slots)
        if self.forgotten:
            check_forgettable(fed)
        self.cohort = [u for u in self.slots if u not in self.forgotten]
        val_slots = sample_users(self.slots, fed.val_users, derive_seed(fed.seed, "val"))
        self.val_users = [u for u in val_slots if u not in self.forgotten]
        done = _prepare_run_folder(self, resume)
        # The first round this invocation runs: 1, or the one after the last complete one.
        self.start = (done[-1] + 1) if (resume and done) else 1

        loaded = load_federated_model(cfg, self.catalog, str(self.accelerator.device))
        self.base_path, self.dual, self.prompts = loaded.base_path, loaded.dual, loaded.prompts
        self.full_model_bytes = loaded.base_bytes
        self.shared, self.records = _restore(fed, self.dual, self.start, done)
        self.server_optimizer = server_optimizer(fed, self.shared)
        if self.server_optimizer is not None and self.start > 1:
            self.server_optimizer.load(server_optimizer_path(self.out, self.start - 1))
        self.accountant = _accountant(fed, len(self.cohort), self.records, self.main)
        # Validation and export rank with the dual LoRA's model (whatever it holds then).
        self.ranker = loaded.ranker
        self.examples: dict[str, list[Example]] = {}
        self.round_started = 0.0

    @property
    def fed(self) -> FedConfig:
        return self.cfg.fed

    @property
    def out(self) -> Path:
        return Path(self.fed.output_dir)

    @property
    def has_rounds(self) -> bool:
        """False for personal-only under schedule "after": its rounds would train the shared
        part alone, and there is none, so the run is the personal fit (local training)."""
        return bool(self.fed.shared_rank) or self.fed.decoupling.schedule != "after"

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    # ----------------------------------------------------------------------- one round

    def select(self, server_round: int) -> list[str]:
        """The round's clients (and the start of its clock)."""
        self.round_started = time.perf_counter()
        chosen = select_clients(self.slots, self.fed.clients_per_round, self.fed.seed, server_round)
        return [u for u in chosen if u not in self.forgotten]

    def clients(
        self, selected: list[str], server_round: int, progress: dict | None = None
    ) -> tuple[list[ClientUpdate], dict[str, str]]:
        """This process's share of the clients, then every process's uploads and failures."""
        uploads, failed = [], {}
        if progress is None:
            progress = dict(
                desc=f"round {server_round} clients", leave=False, disable=not self.main
            )
        batched = self.fed.client_batch > 1
        if batched:
            uploads, failed = self._batched_clients(selected, server_round, progress)
        for user_id in [] if batched else tqdm(self._mine(selected), **progress):
            try:
                result = run_client(
                    self.dual,
                    self.out,
                    user_id,
                    self._examples_of(user_id),
                    self.shared,
                    server_round,
                    self.client_fn,
                )
            except Exception as err:  # one client's failure never ends a round
                failed[user_id] = f"{type(err).__name__}: {err}"
                logger.warning(
                    "round %d: client %s dropped: %s",
                    server_round,
                    pseudonym(user_id),
                    failed[user_id],
                    main_process_only=False,
                )
                continue
            uploads.append(result.upload())
        gathered = gather_object([(uploads, failed)])
        all_uploads = sorted(
            (u for ups, _ in gathered for u in ups), key=lambda u: user_sort_key(u.user_id)
        )
        return all_uploads, {k: v for _, f in gathered for k, v in f.items()}

    def _batched_clients(
        self, selected: list[str], server_round: int, progress: dict
    ) -> tuple[list[ClientUpdate], dict[str, str]]:
        """This process's clients in groups of ``client_batch`` trained together (clients of
        similar length side by side, so little is padding); a failed group fails its clients."""
        mine = sorted(
            self._mine(selected),
            key=lambda u: (max(len(e.input_ids) for e in self._examples_of(u)), user_sort_key(u)),
        )
        size = self.fed.client_batch
        groups = [mine[i : i + size] for i in range(0, len(mine), size)]
        uploads, failed = [], {}
        bar = tqdm(total=len(mine), **progress)
        for group in groups:
            jobs = [(u, self._examples_of(u)) for u in group]
            try:
                results = run_clients(self.dual, self.out, jobs, self.shared, server_round)
            except Exception as err:  # one group's failure never ends a round
                failed.update(dict.fromkeys(group, f"{type(err).__name__}: {err}"))
                logger.warning(
                    "round %d: %d batched clients dropped: %s",
                    server_round,
                    len(group),
                    err,
                    main_process_only=False,
                )
            else:
                uploads += [r.upload() for r in results]
            bar.update(len(group))
        bar.close()
        return uploads, failed

    def server_update(self, uploads: list[ClientUpdate], server_round: int) -> ServerOutcome | None:
        """The main process aggregates; every process gets its shared state (None elsewhere)."""
        outcome = None
        if self.main:
            outcome = server_update(
                self.shared,
                uploads,
                self.fed,
                self._dp_generator(server_round),
                self.server_optimizer,
            )
            if outcome.noised and self.accountant is not None:
                self.accountant.step()
        # The main process's result is the one truth (DP noise is drawn there only).
        box = [outcome.shared_state if self.main else None]
        broadcast_object_list(box)
        self.shared = box[0]
        return outcome

    def validate(self, server_round: int) -> dict[str, Any] | None:
        """Validation HR/NDCG@10 and NLL of the validation users, each with their own adapter.

        Every ``val_every`` rounds and the last; None in the other rounds.
        """
        fed = self.fed
        if not fed.val_users or (server_round % fed.val_every and server_round != fed.rounds):
            return None
        t_val = time.perf_counter()
        rows = []
        for user_id in self._mine(self.val_users):
            ranked, target, loss = validate_user(
                self.dual,
                self.ranker,
                self.split,
                self.out,
                user_id,
                self.shared,
                server_round,
            )
            rows.append((user_id, ranked, target, loss))
        rows = sorted(gather_object(rows), key=lambda p: user_sort_key(p[0]))
        val = mean_metrics([(ranked, target) for _, ranked, target, _ in rows], VAL_K)
        val["loss"] = mean_or_none([loss for *_, loss in rows])
        val["seconds"] = round(time.perf_counter() - t_val, 3)
        val["per_user"] = {
            u: {
                "hit": hit_rate_at_k(ranked, target, VAL_K),
                "ndcg": ndcg_at_k(ranked, target, VAL_K),
                "loss": loss,
            }
            for u, ranked, target, loss in rows
        }
        return val

    def save_round(
        self,
        server_round: int,
        selected: list[str],
        uploads: list[ClientUpdate],
        failed: dict[str, str],
        outcome: ServerOutcome | None,
        val: dict[str, Any] | None,
    ) -> None:
        """Main: the round's record to ``round-XXXX/``, metrics.json and the curves; older
        personal states pruned."""
        if self.main:
            assert outcome is not None  # the main process aggregated
            fed = self.fed
            down = state_bytes(self.shared)
            accountant = self.accountant
            record = {
                "round": server_round,
                "seconds": round(time.perf_counter() - self.round_started, 3),
                "selected": selected,
                "failed": failed,
                "accepted": outcome.accepted,
                "rejected": outcome.rejected,
                "train_loss": mean_or_none([u.loss for u in uploads]),
                "update_norm_mean": mean_or_none(list(outcome.norms.values())),
                "bytes_down_per_client": down,
                "bytes_up_per_client": down,  # a delta has the shared adapter's shape
                "full_model_bytes": self.full_model_bytes,
                "comm_ratio": down / self.full_model_bytes,
                f"val_HR@{VAL_K}": val[f"HR@{VAL_K}"] if val else None,
                f"val_NDCG@{VAL_K}": val[f"NDCG@{VAL_K}"] if val else None,
                "val_loss": val["loss"] if val else None,
                "val_seconds": val["seconds"] if val else None,
                "val_per_user": val["per_user"] if val else None,
                "client_seconds_mean": mean_or_none([u.seconds for u in uploads]),
                "dp_steps": accountant.rounds if accountant else 0,
                "epsilon": accountant.epsilon if accountant else None,
            }
            if fed.dp.enabled and self.accountant is None:
                logger.warning(
                    "dp.noise_multiplier=0: updates are clipped but epsilon is unbounded"
                )
            weights = shared_weights(self.dual, self.shared) if fed.shared_rank else None
            optimizer = self.server_optimizer
            write_round(
                self.out,
                server_round,
                record,
                weights,
                self.shared.get(ITEM_ROWS_KEY),
                optimizer.save if optimizer is not None else None,
                fed.checkpoint_every,
            )
            self.records.append(record)
            _write_metrics(self.out, self.records, fed.val_every)
            # Older personal versions are no longer needed: this round is on disk for good.
            for user_id in selected:
                if user_id not in failed:
                    prune_personal(self.out, user_id, before=server_round)
            logger.info(
                "round %d: loss %s, val HR@%d %s, accepted %d/%d, %.1f s",
                server_round,
                f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-",
                VAL_K,
                f"{val[f'HR@{VAL_K}']:.3f}" if val else "-",
                len(outcome.accepted),
                len(selected),
                record["seconds"],
            )
        self.accelerator.wait_for_everyone()

    def fit_personal(self) -> None:
        """Schedule "after": every cohort client fits its personal part on the final shared
        part (frozen), kept as its version of the last round. Clients that already hold it
        (a resumed run) are skipped; a client whose fit fails is served the shared part."""
        fed = self.fed
        if fed.decoupling.schedule != "after" or not fed.personal_rank:
            return
        final = fed.rounds
        todo = [u for u in self.cohort if not personal_path(self.out, u, final).is_file()]
        trainable = {k: p.requires_grad for k, p in self.dual.shared.items()}
        for param in self.dual.shared.values():
            param.requires_grad_(False)
        try:
            progress = dict(desc="personal fit", leave=False, disable=not self.main)
            _, failed = self.clients(todo, final, progress)
        finally:
            for key, param in self.dual.shared.items():
                param.requires_grad_(trainable[key])
        if failed:
            logger.warning(
                "personal fit: %d clients failed: %s",
                len(failed),
                {pseudonym(u): why for u, why in failed.items()},
            )
        self.accelerator.wait_for_everyone()

    def export(self) -> None:
        """Main: publish the shared adapter and each trained user's stacked adapter."""
        if self.main:
            _export(self)
        self.accelerator.wait_for_everyone()

    # ----------------------------------------------------------------------- helpers

    def _mine(self, users: list[str]) -> list[str]:
        """The users this process handles: user ``i`` on process ``i % world``."""
        return shard(users, self.accelerator.process_index, self.accelerator.num_processes)

    def _examples_of(self, user_id: str) -> list[Example]:
        if user_id not in self.examples:  # tokenized once per process
            self.examples[user_id] = client_examples(
                self.split, self.catalog, self.prompts, self.fed, user_id, self.dual.vocab
            )
        return self.examples[user_id]

    def _dp_generator(self, server_round: int) -> torch.Generator | None:
        """The DP noise source: seeded by (dp.seed, round) in tests, else secure."""
        dp = self.fed.dp
        if not dp.enabled:
            return None
        if dp.seed is not None:
            return torch.Generator().manual_seed(derive_seed(dp.seed, "dp", server_round))
        return secure_generator()


# --------------------------------------------------------------------------- setup steps


def _prepare_run_folder(recipe: Recipe, resume: bool) -> list[int]:
    """The rounds already complete; refuses to clobber them or to resume another cohort.

    With forgotten users, every round from the last checkpoint before the first one that
    selected them is deleted first (llmrec.federated.forget). The main process deletes what a
    cut-off round write left (the round's files, older personal versions it had still to
    prune) and writes run.json (once).
    """
    cfg, accelerator, out = recipe.cfg, recipe.accelerator, recipe.out
    done = completed_rounds(out)
    if done and not resume:
        raise FileExistsError(
            f"{out} holds rounds {done[0]}..{done[-1]}: pass --resume or use a new fed.output_dir"
        )
    # The cohort without its forgotten users; the slots (which fix every round's draw) by
    # digest only, so that the file names nobody the run has forgotten.
    run_record = {
        "config": json.loads(cfg.model_dump_json()),
        "cohort": recipe.cohort,
        "cohort_slots_sha256": _slots_digest(recipe.slots),
        "val_users": recipe.val_users,
        "world_size": accelerator.num_processes,
    }
    before = None
    if resume and (out / RUN_JSON).is_file():
        before = json.loads((out / RUN_JSON).read_text())
        # Folders written before the digest listed every slot as the cohort.
        if before.get("cohort_slots_sha256", _slots_digest(before["cohort"])) != _slots_digest(
            recipe.slots
        ):
            raise ValueError(
                "--resume with another cohort: fed.n_users, fed.seed or the data changed"
            )
    absent = forgotten_count(out) - len(recipe.forgotten)
    if absent and accelerator.is_main_process:
        logger.warning(
            "%d forgotten user(s) not in this run's cohort: the shared model has nothing of theirs",
            absent,
        )
    if recipe.forgotten:
        keep = restart_after(out, done, recipe.forgotten, lambda r: _resumable(cfg.fed, r))
        accelerator.wait_for_everyone()  # every process read the rounds before any goes
        if accelerator.is_main_process:
            gone = cut_back(out, keep, recipe.slots, recipe.forgotten)
            if gone:
                logger.info(
                    "forgetting %d user(s): rounds %d..%d are retrained (%d rounds), then the "
                    "personal fit and the export",
                    len(recipe.forgotten), keep + 1, cfg.fed.rounds,
                    cfg.fed.rounds - keep,
                )  # fmt: skip
        accelerator.wait_for_everyone()
        done = [r for r in done if r <= keep]
    if accelerator.is_main_process:
        remove_partial_rounds(out)
        for user_id in recipe.cohort if done else ():
            settle_personal(out, user_id, done[-1])
        if before is None or before.get("cohort") != recipe.cohort:  # new, or users forgotten
            write_json_atomic(out / RUN_JSON, run_record, allow_nan=False)
    return done


def _slots_digest(slots: Sequence[str]) -> str:
    """sha256 of the cohort's slots in order: a resumed run must draw from the same ones."""
    return hashlib.sha256(json.dumps(list(slots)).encode()).hexdigest()


def _resumable(fed: FedConfig, server_round: int) -> bool:
    """Whether a run can go on from ``server_round``: the seeded start, any round without a
    server optimizer, else a round whose optimizer state was kept."""
    return (
        server_round == 0
        or fed.server_optimizer == "none"
        or server_optimizer_path(fed.output_dir, server_round).is_file()
    )


def _restore(fed: FedConfig, dual: DualLora, start: int, done: list[int]) -> tuple[State, list]:
    """The shared state to start from and the records so far (round 0's seeded init)."""
    if start == 1:
        return init_shared_state(dual, fed.seed), []
    out = Path(fed.output_dir)
    shared = read_round_state(out, start - 1, dual.shared)
    logger.info("resuming after round %d", start - 1, main_process_only=True)
    return shared, read_records(out, done)


def _accountant(
    fed: FedConfig, cohort_size: int, records: list[dict], main: bool
) -> PrivacyAccountant | None:
    """The DP accountant with the rounds already spent replayed (None without DP noise)."""
    accountant = None
    if fed.dp.enabled and fed.dp.noise_multiplier > 0:
        sample_rate = fed.clients_per_round / cohort_size
        accountant = PrivacyAccountant(fed.dp.noise_multiplier, sample_rate, fed.dp.delta)
        for _ in range(records[-1]["dp_steps"] if records else 0):
            accountant.step()  # replay the rounds already spent
    if fed.dp.enabled and fed.dp.seed is not None and main:
        logger.warning(
            "dp.seed is set: the noise is reproducible, so there is NO privacy (tests only)"
        )
    return accountant


# --------------------------------------------------------------------------- outputs


def _write_metrics(out: Path, records: list[dict], val_every: int) -> None:
    """metrics.json and the curves, rewritten after every round."""
    write_metrics(out, records)
    losses = [h["train_loss"] for h in records if h["train_loss"] is not None]
    if losses:
        plot_curve(
            {"mean client loss": losses}, out / LOSS_PNG, "round", "loss", "Federated training loss"
        )
    hrs = [h[f"val_HR@{VAL_K}"] for h in records if h[f"val_HR@{VAL_K}"] is not None]
    if hrs:
        plot_curve(
            {f"val HR@{VAL_K}": hrs},
            out / VAL_PNG,
            f"validation (every {val_every} rounds and the last)",
            f"HR@{VAL_K}",
            "Validation HR, each user's own shared + personal adapter",
        )


def _export(recipe: Recipe) -> None:
    """Publish the shared adapter and each trained user's stacked adapter to the store
    (each personal part scaled as its user's validation item picks)."""
    fed, out, dual = recipe.fed, recipe.out, recipe.dual
    final = fed.rounds
    previous = json.loads((out / EXPORT_JSON).read_text()) if (out / EXPORT_JSON).is_file() else {}
    done = (previous.get("round"), previous.get("store"), previous.get("merge_shared", False))
    if done == (final, str(fed.store_dir), fed.merge_shared):
        logger.info("round %d already exported to %s", final, fed.store_dir)
        return
    base = served_base(recipe.base_path, recipe.shared, out, fed)
    fingerprint = fingerprint_model_dir(base)
    store = open_store(fed, base)
    for user_id in sorted(recipe.forgotten):  # their adapters hold the old shared part
        store.delete(user_id)
    metrics = finite_metrics(recipe.records[-1]) if recipe.records else {}
    record: dict[str, Any] = {
        "round": final,
        "store": str(fed.store_dir),
        "merge_shared": fed.merge_shared,
        "base": base,
        "base_fingerprint": fingerprint,
        "users": {},
    }
    if fed.shared_rank and not fed.merge_shared:  # merged: the served base is the shared model
        weights = shared_weights(dual, recipe.shared)
        ref = publish_once(store, SHARED_ID, weights, fingerprint, final, metrics)
        record["shared"] = ref.adapter_name
    gates: list[float] = []
    if fed.keeps_personal:
        scales = record["personal_scale"] = {}
        size = max(fed.client_batch, 1)  # personal states in memory at once, picked together
        bar = tqdm(total=len(recipe.cohort), desc="export", leave=False)
        for i in range(0, len(recipe.cohort), size):
            chunk = recipe.cohort[i : i + size]
            personals = {u: load_personal(out, u, before=final + 1) for u in chunk}
            # Never selected (None): served the shared adapter (cold start).
            trained = {u: s for u, s in personals.items() if s is not None}
            picks = scale_picks(dual, (recipe.ranker, recipe.split), recipe.shared, trained)
            for user_id, personal in trained.items():
                published = publish_user(
                    store,
                    user_id,
                    recipe.shared,
                    personal,
                    dual,
                    fingerprint,
                    final,
                    metrics,
                    picks.get(user_id),
                )
                ref = published.ref  # None: served the merged base alone
                record["users"][user_id] = ref.adapter_name if ref is not None else None
                scales[user_id] = published.personal_scale
                if published.personal_weight is not None:
                    gates.append(published.personal_weight)
            bar.update(len(chunk))
        bar.close()
    if gates:
        record["personal_weight_mean"] = sum(gates) / len(gates)
    write_json_atomic(out / EXPORT_JSON, record, allow_nan=False)
    logger.info("exported shared + %d user adapters to %s", len(record["users"]), fed.store_dir)


# --------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML config (see training/configs/).")
    parser.add_argument(
        "--resume", action="store_true", help="Continue after the latest complete round."
    )
    parser.add_argument(
        "--forget",
        action="append",
        default=[],
        metavar="USER",
        help="Forget USER from the shared model: retrain from the last checkpoint before "
        "their first round, without them (implies --resume; repeatable).",
    )
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides.")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.addFilter(RedactFilter())  # no line names a user (llmrec.pseudonyms)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[handler],
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    if args.forget:
        try:
            check_forgettable(cfg.fed)
            add_forgotten(cfg.fed.output_dir, args.forget)
        except ValueError as err:
            parser.error(f"--forget: {err}")
    run(cfg, resume=args.resume or bool(args.forget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
