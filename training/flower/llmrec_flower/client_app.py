"""The ClientApp: one user's device. Trains shared + personal LoRA on its own history.

Every fit runs ``llmrec.federated.run_client`` (the accelerate runner's client round): the
downloaded shared adapter plus this user's personal state from its own folder, local steps,
the new personal state written back to that folder. The reply carries the new shared
weights and a weight only. Evaluate validates with the user's own adapter and, in the last
round, publishes the stacked adapter (shared + personal, one PEFT LoRA) to the user's store.

Which user and where its files live come from the SuperNode's ``--node-config``:

- ``user-id``: this node's user (deployment). In simulation, ``partition-id`` picks the
  user from the run's cohort instead (start as many SuperNodes as ``fed.n_users``).
- ``client-dir``: the user's own folder for personal states (default: ``fed.output_dir``).
- ``store-dir``: the user's adapter store (default: ``fed.store_dir``).
- ``overrides``: ``data.*`` / ``model.*`` overrides for this machine (its own data files,
  its own copy of the base model). A device holds only its user's partition
  (``llmrec data partition``); a ``user-id`` not in the node's data is refused.

The model and data are loaded once per process (a simulation actor serves many nodes).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Config, NDArrays, Scalar
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from llmrec.config import AppConfig
from llmrec.data import Split, dataset_from_config, leave_last_out
from llmrec.federated import (
    VAL_K,
    DualLora,
    Ranker,
    client_examples,
    federated_cohort,
    load_federated_model,
    load_personal,
    open_store,
    prune_personal,
    publish_user,
    run_client,
    scale_picks,
    validate_user,
)
from llmrec.finetune import Example
from llmrec.prompts import PromptBuilder
from llmrec.recommend import hit_rate_at_k, ndcg_at_k

from .codec import (
    BASE_KEY,
    CONFIG_KEY,
    EXPORT_KEY,
    ROUND_KEY,
    from_ndarrays,
    node_config,
    to_ndarrays,
)

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a client process loads once: config, the dual LoRA on the frozen base, data."""

    cfg: AppConfig
    base_path: str
    dual: DualLora
    keys: list[str]
    prompts: PromptBuilder
    split: Split
    recommender: Ranker
    cohort: list[str]
    _examples: dict[str, list[Example]] = field(default_factory=dict)

    def examples(self, user_id: str) -> list[Example]:
        if user_id not in self._examples:
            catalog = self.recommender.catalog
            self._examples[user_id] = client_examples(
                self.split, catalog, self.prompts, self.cfg.fed, user_id, self.dual.vocab
            )
        return self._examples[user_id]


@functools.lru_cache(maxsize=1)
def runtime(cfg_json: str, overrides: str) -> Runtime:
    """Load once per (server config, node overrides): a new run or node rebuilds it."""
    cfg = node_config(cfg_json, overrides)
    dataset = dataset_from_config(cfg)
    split = leave_last_out(dataset.histories)
    loaded = load_federated_model(cfg, dataset.catalog)
    return Runtime(
        cfg,
        loaded.base_path,
        loaded.dual,
        sorted(loaded.dual.shared),
        loaded.prompts,
        split,
        loaded.ranker,
        federated_cohort(split, cfg.fed),
    )


class UserClient(NumPyClient):
    """One user: fit = a client round, evaluate = validation (+ publishing at the end)."""

    def __init__(self, node: dict[str, Scalar]) -> None:
        self.node = node

    def _setup(self, config: Config) -> tuple[Runtime, str, Path]:
        rt = runtime(str(config[CONFIG_KEY]), str(self.node.get("overrides", "")))
        if "user-id" in self.node:
            user_id = str(self.node["user-id"])
        elif "partition-id" in self.node:  # simulation: the partition is a cohort index
            pid = int(self.node["partition-id"])
            if pid >= len(rt.cohort):
                raise ValueError(f"partition-id {pid} outside a cohort of {len(rt.cohort)}")
            user_id = rt.cohort[pid]
        else:
            raise ValueError("node config needs user-id (or partition-id in simulation)")
        if user_id not in rt.split.train:  # e.g. a partition of another user
            data = rt.cfg.data.interactions or rt.cfg.data.name
            raise ValueError(f"user {user_id!r} is not in this node's data ({data})")
        if user_id not in rt.split.valid:
            raise ValueError(f"user {user_id!r} has no validation item in this node's data")
        client_dir = Path(str(self.node.get("client-dir", rt.cfg.fed.output_dir)))
        return rt, user_id, client_dir

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict]:
        rt, user_id, client_dir = self._setup(config)
        server_round = int(config[ROUND_KEY])
        shared = from_ndarrays(parameters, rt.keys)
        examples = rt.examples(user_id)
        result = run_client(rt.dual, client_dir, user_id, examples, shared, server_round)
        prune_personal(client_dir, user_id, before=server_round)  # no resume under Flower
        new = {k: shared[k] + result.shared_delta[k] for k in rt.keys}
        # DP calibrates its noise for a uniform mean (as llmrec.federated.private_mean does).
        weight = 1 if rt.cfg.fed.dp.enabled else result.n_examples
        metrics = {"loss": result.loss, "seconds": result.seconds, "targets": result.n_examples}
        return to_ndarrays(new, rt.keys), weight, metrics

    def evaluate(self, parameters: NDArrays, config: Config) -> tuple[float, int, dict]:
        rt, user_id, client_dir = self._setup(config)
        server_round = int(config[ROUND_KEY])
        shared = from_ndarrays(parameters, rt.keys)
        ranked, target, loss = validate_user(
            rt.dual, rt.recommender, rt.split, client_dir, user_id, shared, server_round
        )
        metrics: dict[str, Scalar] = {
            "hit": hit_rate_at_k(ranked, target, VAL_K),
            "ndcg": ndcg_at_k(ranked, target, VAL_K),
            "exported": 0,
        }
        if config.get(EXPORT_KEY) and rt.cfg.fed.personal_rank:
            store_dir = Path(str(self.node.get("store-dir", rt.cfg.fed.store_dir)))
            personal = load_personal(client_dir, user_id, before=server_round + 1)
            if personal is not None:  # else cold start: served the shared adapter
                pick = scale_picks(rt.dual, (rt.recommender, rt.split), shared, {user_id: personal})
                publish_user(
                    open_store(rt.cfg.fed, rt.base_path, store_dir),
                    user_id,
                    shared,
                    personal,
                    rt.dual,
                    str(config[BASE_KEY]),
                    server_round,
                    {"val_hit": float(metrics["hit"]), "val_loss": loss},
                    pick.get(user_id),
                )
            metrics["exported"] = int(personal is not None)
        return float(np.float64(loss)), 1, metrics


def _secagg_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's secaggplus_mod for the rounds the server runs SecAgg+ on (fed.flower.secagg)."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _clip_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixedclipping_mod when the server's DP wrapper asks clients to clip."""
    if any(KEY_CLIPPING_NORM in rec for rec in msg.content.config_records.values()):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def client_fn(context: Context):
    """A client for this node (Flower builds one per message)."""
    return UserClient(dict(context.node_config)).to_client()


# Order matters: SecAgg+ masks what the clipping mod has already clipped.
app = ClientApp(client_fn=client_fn, mods=[_secagg_when_asked, _clip_when_asked])
