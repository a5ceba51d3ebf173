"""The ServerApp: holds the shared adapter, runs Flower's rounds, writes the run's records.

Started by the SuperLink for ``flwr run training/flower ...`` (simulation or deployment).
One round is Flower's DefaultWorkflow (or SecAggPlusWorkflow for the fit step when
``fed.flower.secagg``)::

    sample clients_per_round nodes -> send shared adapter + round + config
      -> each ClientApp: llmrec.federated.run_client (its own personal state stays home)
      -> replies: new shared weights + target count (masked, with SecAgg+)
      -> Rounds: reject bad updates -> Flower strategy (FedAvg | FedMedian | FedTrimmedAvg,
         DP-wrapped) -> output_dir/round-XXXX/
      -> validation rounds: sampled clients validate with their own adapter; in the last
         round every client validates and publishes its stacked adapter to its own store

The layout under ``fed.output_dir`` is the accelerate runner's (``llmrec.federated.layout``:
``run.json``, ``round-XXXX/shared`` + ``round.json``, ``metrics.json``, ``export.json``); the
server publishes the shared adapter to ``fed.store_dir``.
"""

from __future__ import annotations

import json
import logging
import shlex
from importlib.metadata import version
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from llmrec.adapters import LoraWeights
from llmrec.atomic import write_json_atomic
from llmrec.config import AppConfig, FedConfig, load_config
from llmrec.data import dataset_from_config
from llmrec.federated import (
    EXPORT_JSON,
    ITEM_ROWS_KEY,
    RUN_JSON,
    State,
    completed_rounds,
    finite_metrics,
    init_shared_state,
    load_federated_model,
    open_store,
    served_base,
    shared_weights,
    write_round,
)
from llmrec.model import fingerprint_model_dir

from .codec import to_ndarrays
from .strategy import Rounds, flower_strategy

log = logging.getLogger(__name__)


def run_server(grid: Grid, context: Context, cfg: AppConfig) -> dict[str, Any]:
    """All rounds of one Flower run with ``cfg``; returns the last round's record."""
    fed = cfg.fed
    if not fed.shared_rank:
        raise ValueError("fed.shared_rank=0 federates nothing: run training/federated.py")
    if fed.share != "adapter":
        raise ValueError("fed.share='lora_a' (FedSA-LoRA) runs in training/federated.py")
    if fed.server_optimizer != "none":
        raise ValueError(
            "fed.server_optimizer runs in training/federated.py; under Flower use "
            "fed.server_optimizer=none (Flower's FedAdam strategy is not wired in)"
        )
    if fed.decoupling.schedule == "after" and fed.personal_rank:
        # The personal fit needs the final shared part, which a client only gets after the
        # last round: the accelerate runner runs it; a Flower client trains both each round.
        raise ValueError(
            "fed.decoupling.schedule='after' runs in training/federated.py: under Flower "
            "set fed.decoupling.schedule=sequential"
        )
    if fed.dp.enabled and fed.dp.seed is not None:
        log.warning("fed.dp.seed has no effect under Flower: its DP noise is never seeded")
    out = Path(fed.output_dir)
    if completed_rounds(out):
        raise FileExistsError(f"{out} holds rounds already: use a new fed.output_dir")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / RUN_JSON,
        {
            "config": json.loads(cfg.model_dump_json()),
            "runner": "flower",
            "flwr": version("flwr"),
            "run_config": dict(context.run_config),
        },
    )

    # The server needs the adapter's keys and shapes and the seeded round-0 state: the same
    # dual LoRA as a client (a frozen base, never trained here); the item-token head's base
    # is built from the (public) catalog.
    loaded = load_federated_model(cfg, dataset_from_config(cfg).catalog)
    base_path, dual = loaded.base_path, loaded.dual
    shared = init_shared_state(dual, fed.seed)
    keys = sorted(shared)
    served: dict[str, str] = {}

    def save_round(server_round: int, state: State, record: dict[str, Any]) -> None:
        weights = shared_weights(dual, state)
        write_round(out, server_round, record, weights, state.get(ITEM_ROWS_KEY))

    def publish_base(state: State) -> str:
        served["base"] = served_base(base_path, state, out, fed)
        served["fingerprint"] = fingerprint_model_dir(served["base"])
        return served["fingerprint"]

    rounds = Rounds(
        flower_strategy(cfg),
        cfg,
        keys,
        ndarrays_to_parameters(to_ndarrays(shared, keys)),
        save_round,
        out,
        publish_base,
    )
    context = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=fed.rounds, round_timeout=fed.client_timeout_s),
        strategy=rounds,
    )
    DefaultWorkflow(fit_workflow=_fit_workflow(fed))(grid, context)

    # The server publishes what it holds, the shared adapter; every client published its
    # own stacked adapter in the last round (counted in the record).
    last = rounds.records[-1] if rounds.records else {}
    if "base" not in served:  # no client evaluated the last round
        publish_base(rounds.current)
    weights = shared_weights(dual, rounds.current)
    _publish_shared(fed, served["base"], served["fingerprint"], weights, last)
    return last


def _fit_workflow(fed: FedConfig) -> SecAggPlusWorkflow | None:
    """SecAgg+ for the fit step when ``fed.flower.secagg`` (None: Flower's default fit)."""
    if not fed.flower.secagg:
        return None
    return SecAggPlusWorkflow(
        num_shares=fed.flower.secagg_num_shares,
        reconstruction_threshold=fed.flower.secagg_reconstruction_threshold,
        clipping_range=fed.flower.secagg_clipping_range,
        # A client's weight (its target count) must stay below max_weight.
        max_weight=float(max(fed.targets_per_user, 1) + 1),
        timeout=fed.client_timeout_s,
    )


def _publish_shared(
    fed: FedConfig, base_path: str, fingerprint: str, weights: LoraWeights, last: dict[str, Any]
) -> None:
    """The final shared adapter to ``fed.store_dir`` for the served base, and ``export.json``."""
    ref = open_store(fed, base_path).publish_shared(
        weights,
        base_fingerprint=fingerprint,
        server_round=fed.rounds,
        metrics=finite_metrics(last),
    )
    write_json_atomic(
        Path(fed.output_dir) / EXPORT_JSON,
        {
            "round": fed.rounds,
            "base": base_path,
            "base_fingerprint": fingerprint,
            "shared": ref.adapter_name,
            "users_published_on_clients": last.get("exported_users"),
        },
        allow_nan=False,
    )
    log.info("published the shared adapter %s to %s", ref.adapter_name, fed.store_dir)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the llmrec config named by the run config, then run all rounds."""
    handler = logging.StreamHandler()  # flwr's logger has its own; only ours need one
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("llmrec", "llmrec_flower"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    cfg = load_config(
        Path(str(context.run_config["config"])),
        shlex.split(str(context.run_config.get("overrides", ""))),
    )
    run_server(grid, context, cfg)
