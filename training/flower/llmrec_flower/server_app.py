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

The layout under ``fed.output_dir`` is the accelerate runner's (``run.json``,
``round-XXXX/shared`` + ``round.json``, ``metrics.json``, ``export.json``); the server
publishes the shared adapter to ``fed.store_dir``.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from importlib.metadata import version
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from llmrec.adapters import write_adapter
from llmrec.atomic import write_json_atomic
from llmrec.config import AppConfig, load_config
from llmrec.federated import State, build_slots, init_shared_state, open_store, shared_weights
from llmrec.model import fingerprint_model_dir, load_model, resolve_model_path

from .codec import to_ndarrays
from .strategy import Rounds, flower_strategy

log = logging.getLogger(__name__)

# The accelerate runner's layout (training/federated.py), so both runs read the same way.
RUN_JSON = "run.json"
ROUND_JSON = "round.json"
SHARED_DIR = "shared"
EXPORT_JSON = "export.json"


def round_dir(output_dir: Path, round: int) -> Path:
    return output_dir / f"round-{round:04d}"


def run_server(grid: Grid, context: Context, cfg: AppConfig) -> dict[str, Any]:
    """All rounds of one Flower run with ``cfg``; returns the last round's record."""
    fed = cfg.fed
    if not fed.shared_rank:
        raise ValueError("fed.shared_rank=0 federates nothing: run training/federated.py")
    if fed.dp.enabled and fed.dp.seed is not None:
        log.warning("fed.dp.seed has no effect under Flower: its DP noise is never seeded")
    out = Path(fed.output_dir)
    if any(out.glob(f"round-*/{ROUND_JSON}")):
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
    # slots as a client (a frozen base, never trained here).
    base_path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir)
    model, tokenizer = load_model(
        base_path, quantization=cfg.model.quantization, dtype=cfg.model.dtype
    )
    slots = build_slots(model, fed, tokenizer.pad_token_id)
    shared = init_shared_state(slots, fed.seed)
    keys = sorted(shared)

    def write_round(r: int, state: State, record: dict[str, Any]) -> None:
        folder = round_dir(out, r)
        write_adapter(shared_weights(state, fed, slots.base_model), folder / SHARED_DIR)
        write_json_atomic(folder / ROUND_JSON, record, allow_nan=False)  # last: marks it done

    rounds = Rounds(
        flower_strategy(cfg),
        cfg,
        keys,
        ndarrays_to_parameters(to_ndarrays(shared, keys)),
        write_round,
        out,
    )
    context = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=fed.rounds, round_timeout=fed.client_timeout_s),
        strategy=rounds,
    )
    fit_workflow = None
    if fed.flower.secagg:
        fit_workflow = SecAggPlusWorkflow(
            num_shares=fed.flower.secagg_num_shares,
            reconstruction_threshold=fed.flower.secagg_reconstruction_threshold,
            clipping_range=fed.flower.secagg_clipping_range,
            # A client's weight (its target count) must stay below max_weight.
            max_weight=float(max(fed.targets_per_user, 1) + 1),
            timeout=fed.client_timeout_s,
        )
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, context)

    # The server publishes what it holds, the shared adapter; every client published its
    # own stacked adapter in the last round (counted in the record).
    last = rounds.records[-1] if rounds.records else {}
    fingerprint = fingerprint_model_dir(base_path)
    finite = {
        k: float(v)
        for k, v in last.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    ref = open_store(fed, base_path).publish_shared(
        shared_weights(rounds.current, fed, slots.base_model),
        base_fingerprint=fingerprint,
        round=fed.rounds,
        metrics=finite,
    )
    write_json_atomic(
        out / EXPORT_JSON,
        {
            "round": fed.rounds,
            "base_fingerprint": fingerprint,
            "shared": ref.adapter_name,
            "users_published_on_clients": last.get("exported_users"),
        },
        allow_nan=False,
    )
    log.info("published the shared adapter %s to %s", ref.adapter_name, fed.store_dir)
    return last


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
