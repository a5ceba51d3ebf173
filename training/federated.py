"""Federated training of shared + personal LoRA adapters: the ``accelerate launch`` entry.

Run from the repository root (CPU, one process; ``--resume`` continues an interrupted run,
``a.b=c`` overrides any config field)::

    accelerate launch --config_file training/accelerate/cpu.yaml training/federated.py \
        --config training/configs/ml100k.yaml [--resume] [fed.rounds=3 ...]

Several processes (clients are spread over them; results do not depend on how many)::

    accelerate launch --multi_gpu --num_processes 2 training/federated.py --config ...

On a host without CUDA that starts two CPU processes talking over gloo: accelerate's
``--cpu --num_processes 2`` starts only ONE process (its multi-CPU launcher needs mpirun).
``llmrec train --config ... [--num-processes N] [--resume]`` builds these commands for you.

One round r (DESIGN.md, "Flow of data")::

    select clients (seeded by r) -> client i runs on process i % world
      -> client_update: shared (downloaded) + its own personal adapter, trained on its own
         history; the new personal state stays in output_dir/clients/<user>/
      -> gather the uploads (shared delta + example count) on every process
      -> main: server_update (reject malformed/oversized, aggregate or DP) -> broadcast
      -> validation HR@10 on a fixed user sample (sharded) -> main writes round-XXXX/

Files under ``fed.output_dir``: ``round-XXXX/`` (the shared adapter after round XXXX as a
PEFT folder + ``round.json``; written to a temp folder, fsynced, renamed), ``clients/<user>/
personal-rXXXX.safetensors`` (client side, versioned by round, so a round redone on resume
reads exactly what the uninterrupted run read), ``metrics.json``, ``*.png`` curves,
``export.json``. After the last round the shared adapter and every trained user's stacked
adapter are published to the adapter store ``fed.store_dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from llmrec.adapters import read_adapter, write_adapter
from llmrec.atomic import fsync_path, fsync_tree, write_json_atomic
from llmrec.config import AppConfig, ConfigError, load_config
from llmrec.data import Split, dataset_from_config, leave_last_out, user_sort_key
from llmrec.federated import (
    VAL_K,
    ClientFn,
    PrivacyAccountant,
    Slots,
    State,
    build_slots,
    client_examples,
    client_update,
    derive_seed,
    federated_cohort,
    init_shared_state,
    open_store,
    prune_personal,
    publish_user,
    run_client,
    secure_generator,
    select_clients,
    server_update,
    shard,
    shared_weights,
    state_bytes,
    validate_user,
)
from llmrec.finetune import Example, sample_users
from llmrec.model import fingerprint_model_dir, load_model, resolve_model_path
from llmrec.plots import plot_curve
from llmrec.prompts import PromptBuilder
from llmrec.recommend import Recommender, mean_metrics

logger = get_logger(__name__)

RUN_JSON = "run.json"
ROUND_JSON = "round.json"
SHARED_DIR = "shared"
METRICS_JSON = "metrics.json"
EXPORT_JSON = "export.json"
LOSS_PNG = "loss.png"
VAL_PNG = "val_hr.png"
_ROUND_RE = re.compile(r"^round-(\d{4,})$")


# --------------------------------------------------------------------------- files


def round_dir(output_dir: Path, round: int) -> Path:
    return output_dir / f"round-{round:04d}"


def _write_dir_atomic(final: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder in a hidden temp folder, fsync it, rename it to ``final``.

    A reader (or ``--resume``) therefore sees a round folder whole or not at all.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        fill(tmp)
        fsync_tree(tmp)
        if final.exists():  # a leftover of an aborted run we are replacing: same content
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def completed_rounds(output_dir: Path) -> list[int]:
    """Rounds whose folder is complete (temp folders of a crashed write are hidden)."""
    if not output_dir.is_dir():
        return []
    rounds = []
    for entry in output_dir.iterdir():
        m = _ROUND_RE.fullmatch(entry.name)
        if m and (entry / ROUND_JSON).is_file():
            rounds.append(int(m[1]))
    return sorted(rounds)


# --------------------------------------------------------------------------- the run


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite float entries of a metrics record (for manifests, which refuse NaN)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[key] = float(value)
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run(cfg: AppConfig, resume: bool = False, client_fn: ClientFn = client_update) -> dict:
    """Federated rounds from round 1 (or after the last complete one) to ``fed.rounds``.

    ``client_fn`` is the client update (a test can wrap it to inject failures). Returns the
    metrics written to ``metrics.json``.
    """
    fed = cfg.fed
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main, world, rank = (
        accelerator.is_main_process,
        accelerator.num_processes,
        accelerator.process_index,
    )
    out = Path(fed.output_dir)

    dataset = dataset_from_config(cfg)
    split = leave_last_out(dataset.histories)
    cohort = federated_cohort(split, fed)
    if len(cohort) < fed.clients_per_round:
        raise ValueError(f"{len(cohort)} eligible users, fewer than clients_per_round")
    val_users = sample_users(cohort, fed.val_users, derive_seed(fed.seed, "val"))

    done = completed_rounds(out)
    if done and not resume:
        raise FileExistsError(
            f"{out} holds rounds {done[0]}..{done[-1]}: pass --resume or use a new fed.output_dir"
        )
    start = (done[-1] + 1) if (resume and done) else 1
    run_record = {
        "config": json.loads(cfg.model_dump_json()),
        "cohort": cohort,
        "val_users": val_users,
        "world_size": world,
    }
    if resume and (out / RUN_JSON).is_file():
        before = json.loads((out / RUN_JSON).read_text())
        if before.get("cohort") != cohort:
            raise ValueError(
                "--resume with another cohort: fed.n_users, fed.seed or the data changed"
            )
    if main:  # hidden temp folders of a round whose write was cut off
        for stale in out.glob(".round-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if main and not (resume and (out / RUN_JSON).is_file()):
        write_json_atomic(out / RUN_JSON, run_record, allow_nan=False)

    base_path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir)
    model, tokenizer = load_model(
        base_path,
        quantization=cfg.model.quantization,
        dtype=cfg.model.dtype,
        device=str(accelerator.device),
    )
    full_model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = build_slots(model, fed, tokenizer.pad_token_id)
    prompts = PromptBuilder(
        tokenizer,
        max_history_items=cfg.prompts.max_history_items,
        max_prompt_tokens=cfg.prompts.max_prompt_tokens,
    )
    examples: dict[str, list[Example]] = {}

    def examples_of(user_id: str) -> list[Example]:
        if user_id not in examples:  # tokenized once per process
            examples[user_id] = client_examples(split, dataset.catalog, prompts, fed, user_id)
        return examples[user_id]

    if start == 1:
        shared = init_shared_state(slots, fed.seed)
        records: list[dict] = []
    else:
        last = round_dir(out, start - 1)
        shared = read_adapter(last / SHARED_DIR).state if fed.shared_rank else {}
        records = [json.loads((round_dir(out, r) / ROUND_JSON).read_text()) for r in done]
        logger.info("resuming after round %d", start - 1, main_process_only=True)

    accountant = None
    if fed.dp.enabled and fed.dp.noise_multiplier > 0:
        sample_rate = fed.clients_per_round / len(cohort)
        accountant = PrivacyAccountant(fed.dp.noise_multiplier, sample_rate, fed.dp.delta)
        for _ in range(records[-1]["dp_steps"] if records else 0):
            accountant.step()  # replay the rounds already spent
    if fed.dp.enabled and fed.dp.seed is not None and main:
        logger.warning(
            "dp.seed is set: the noise is reproducible, so there is NO privacy (tests only)"
        )

    # Validation and export score with the slots' model (whatever they hold at the time).
    recommender = Recommender(
        slots.model, tokenizer, dataset.catalog, prompts, cfg.recommend.beam_width
    )
    bar = tqdm(total=fed.rounds, initial=start - 1, desc="rounds", disable=not main)
    for r in range(start, fed.rounds + 1):
        t0 = time.perf_counter()
        selected = select_clients(cohort, fed.clients_per_round, fed.seed, r)
        uploads, failed = [], {}
        mine = shard(selected, rank, world)
        for user_id in tqdm(mine, desc=f"round {r} clients", leave=False, disable=not main):
            try:
                result = run_client(slots, out, user_id, examples_of(user_id), shared, r, client_fn)
            except Exception as err:  # one client's failure never ends a round
                failed[user_id] = f"{type(err).__name__}: {err}"
                logger.warning(
                    "round %d: client %s dropped: %s",
                    r,
                    user_id,
                    failed[user_id],
                    main_process_only=False,
                )
                continue
            uploads.append(result.upload())

        gathered = gather_object([(uploads, failed)])
        all_uploads = sorted(
            (u for ups, _ in gathered for u in ups), key=lambda u: user_sort_key(u.user_id)
        )
        all_failed = {k: v for _, f in gathered for k, v in f.items()}

        outcome = None
        if main:
            generator = None
            if fed.dp.enabled:
                generator = (
                    torch.Generator().manual_seed(derive_seed(fed.dp.seed, "dp", r))
                    if fed.dp.seed is not None
                    else secure_generator()
                )
            outcome = server_update(shared, all_uploads, fed, generator)
            if outcome.noised and accountant is not None:
                accountant.step()
        # The main process's result is the one truth (DP noise is drawn there only).
        box = [outcome.shared_state if main else None]
        broadcast_object_list(box)
        shared = box[0]

        val = None
        if fed.val_users and (r % fed.val_every == 0 or r == fed.rounds):
            t_val = time.perf_counter()
            rows = [
                (u, *validate_user(slots, recommender, split, out, u, shared, r))
                for u in shard(val_users, rank, world)
            ]
            rows = sorted(gather_object(rows), key=lambda p: user_sort_key(p[0]))
            val = mean_metrics([(ranked, target) for _, ranked, target, _ in rows], VAL_K)
            val["loss"] = _mean([loss for *_, loss in rows])
            val["seconds"] = round(time.perf_counter() - t_val, 3)
            val["per_user"] = {
                u: {"hit": float(target in ranked[:VAL_K]), "loss": loss}
                for u, ranked, target, loss in rows
            }

        if main:
            down = state_bytes(shared)
            record = {
                "round": r,
                "seconds": round(time.perf_counter() - t0, 3),
                "selected": selected,
                "failed": all_failed,
                "accepted": outcome.accepted,
                "rejected": outcome.rejected,
                "train_loss": _mean([u.loss for u in all_uploads]),
                "update_norm_mean": _mean(list(outcome.norms.values())),
                "bytes_down_per_client": down,
                "bytes_up_per_client": down,  # a delta has the shared adapter's shape
                "full_model_bytes": full_model_bytes,
                "comm_ratio": down / full_model_bytes,
                f"val_HR@{VAL_K}": val[f"HR@{VAL_K}"] if val else None,
                f"val_NDCG@{VAL_K}": val[f"NDCG@{VAL_K}"] if val else None,
                "val_loss": val["loss"] if val else None,
                "val_seconds": val["seconds"] if val else None,
                "val_per_user": val["per_user"] if val else None,
                "client_seconds_mean": _mean([u.seconds for u in all_uploads]),
                "dp_steps": accountant.rounds if accountant else 0,
                "epsilon": accountant.epsilon if accountant else None,
            }
            if fed.dp.enabled and accountant is None:
                logger.warning(
                    "dp.noise_multiplier=0: updates are clipped but epsilon is unbounded"
                )

            def fill(tmp: Path, record: dict = record, shared: State = shared) -> None:
                if fed.shared_rank:
                    write_adapter(shared_weights(shared, fed, slots.base_model), tmp / SHARED_DIR)
                write_json_atomic(tmp / ROUND_JSON, record, allow_nan=False)

            _write_dir_atomic(round_dir(out, r), fill)
            records.append(record)
            _write_metrics(out, records, fed.val_every)
            # Older personal versions are no longer needed: round r is on disk for good.
            for user_id in selected:
                if user_id not in all_failed:
                    prune_personal(out, user_id, before=r)
            logger.info(
                "round %d: loss %s, val HR@%d %s, accepted %d/%d, %.1f s",
                r,
                f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-",
                VAL_K,
                f"{val[f'HR@{VAL_K}']:.3f}" if val else "-",
                len(outcome.accepted),
                len(selected),
                record["seconds"],
            )
        bar.update()
        accelerator.wait_for_everyone()
    bar.close()

    if main:
        _export(cfg, out, cohort, shared, slots, base_path, records, (recommender, split))
    accelerator.wait_for_everyone()
    return {"rounds": records}


def _write_metrics(out: Path, records: list[dict], val_every: int) -> None:
    """metrics.json and the curves, rewritten after every round."""
    write_json_atomic(out / METRICS_JSON, {"rounds": records}, allow_nan=False)
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


def _export(
    cfg: AppConfig,
    out: Path,
    cohort: list[str],
    shared: State,
    slots: Slots,
    base_path: str,
    records: list[dict],
    validation: tuple[Recommender, Split],
) -> None:
    """Publish the shared adapter and each trained user's stacked adapter to the store
    (each personal part scaled as its user's validation item picks)."""
    fed = cfg.fed
    final = fed.rounds
    previous = json.loads((out / EXPORT_JSON).read_text()) if (out / EXPORT_JSON).is_file() else {}
    if previous.get("round") == final:
        logger.info("round %d already exported to %s", final, fed.store_dir)
        return
    fingerprint = fingerprint_model_dir(base_path)
    store = open_store(fed, base_path)
    metrics = _finite(records[-1]) if records else {}
    record: dict[str, Any] = {"round": final, "base_fingerprint": fingerprint, "users": {}}
    if fed.shared_rank:
        ref = store.publish_shared(
            shared_weights(shared, fed, slots.base_model),
            base_fingerprint=fingerprint,
            round=final,
            metrics=metrics,
        )
        record["shared"] = ref.adapter_name
    gates: list[float] = []
    if fed.personal_rank:
        scales = record["personal_scale"] = {}
        for user_id in tqdm(cohort, desc="export", leave=False):
            published = publish_user(
                store, out, user_id, shared, slots, fingerprint, final, metrics, validation
            )
            if published is None:  # never selected: served the shared adapter (cold start)
                continue
            record["users"][user_id] = published.ref.adapter_name
            scales[user_id] = published.personal_scale
            if published.personal_weight is not None:
                gates.append(published.personal_weight)
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
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides.")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    run(cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
