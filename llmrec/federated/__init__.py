"""Federated shared + personal LoRA: the dual LoRA, clients, server, aggregation, privacy, export.

Every user owns a LoRA adapter of two parts: a SHARED part the server averages across clients
and a PERSONAL part that never leaves the client (docs/design.md, "Flow of data"). The
position paper behind this project (arXiv 2506.11563) asks that averaging never wash a user
out; each module below cites the published mechanisms it follows.

Modules, in the order a round uses them:

- ``dual_lora``: the frozen base with the two trainable adapters and their gate (FedSA-LoRA,
  FedPA); key names; the seeded initial states. ``gates``: the gate in a saved state.
- ``cohort``: the cohort, each round's clients, their sharding over processes; ``seeds``.
  ``partition``: a data set cut into per-user folders, one device's data each.
- ``client``: the client's examples and local training (FedRep-style schedule, FedProx);
  ``client_state``: its personal states on its own disk; ``batched``: a group of clients'
  local steps (or their losses) in one batched forward, with the same results.
- ``server``: checks and aggregation of the shared deltas; ``aggregate`` (FedAvg, Yin et
  al.'s median and trimmed mean), ``privacy`` (DP-FedAvg), ``server_optimizer`` (FedAdam).
- ``validation``: the client's validation and personal-scale pick; ``export``: the served
  adapters and publishing; ``layout``: the run folder both runners write.
- ``personalize``: a local refresh of one user's personal adapter between rounds.
- ``forget``: forgetting users from the shared model (retraining from a checkpoint).

Contract: library code that knows nothing about processes, transports or schedules: a runner
(``training/federated.py`` with accelerate, ``training/flower/`` with Flower) selects clients,
runs :func:`run_client` on each (:func:`client_update` plus the client's own personal-state
folder), ships :class:`ClientUpdate` (the ONLY thing that leaves a client) to the server,
which aggregates (:func:`server_update`, or Flower's strategies). Results depend on
(seed, round, user_id) only, never on which process or machine ran a client.
"""

from .aggregate import (
    AGGREGATORS,
    Rule,
    Update,
    UpdateCheck,
    aggregate,
    check_update,
    coordinate_median,
    fedavg,
    filter_updates,
    trimmed_mean,
    update_norm,
)
from .batched import (
    ClientJob,
    batched_client_updates,
    run_clients,
)
from .client import (
    ClientFn,
    ClientResult,
    ClientTimeout,
    ClientUpdate,
    client_examples,
    client_update,
    holdout_examples,
    run_client,
)
from .client_state import (
    load_personal,
    personal_path,
    personal_versions,
    prune_personal,
    save_personal,
    settle_personal,
)
from .cohort import (
    eligible_users,
    federated_cohort,
    select_clients,
    shard,
)
from .dual_lora import (
    ADAPTER_GATE_KEY,
    GATE_SUFFIX,
    ITEM_ROWS_KEY,
    PERSONAL,
    SHARED,
    DualLora,
    State,
    build_dual_lora,
    init_personal_state,
    init_shared_state,
    module_of,
    saved_key,
    state_bytes,
)
from .export import (
    Published,
    adapter_for,
    finite_metrics,
    open_store,
    publish_once,
    publish_user,
    scale_picks,
    served_base,
    shared_weights,
    user_weights,
)
from .forget import (
    FORGOTTEN_JSON,
    add_forgotten,
    check_forgettable,
    cut_back,
    forgotten_among,
    forgotten_count,
    restart_after,
)
from .gates import (
    gate_values,
    personal_weight_mean,
    scale_personal,
)
from .layout import (
    CLIENTS_DIR,
    EXPORT_JSON,
    ITEM_ROWS_FILE,
    LOSS_PNG,
    MERGED_BASE_DIR,
    METRICS_JSON,
    ROUND_JSON,
    RUN_JSON,
    SERVED_BASE_DIR,
    SERVER_OPTIMIZER_FILE,
    SHARED_DIR,
    VAL_PNG,
    completed_rounds,
    exported_base,
    read_records,
    read_round_state,
    remove_partial_rounds,
    round_dir,
    server_optimizer_path,
    write_metrics,
    write_round,
)
from .partition import (
    PARTITION_MODE,
    Partition,
    write_partitions,
)
from .personalize import (
    LOCAL_STATE,
    Personalizer,
    RefreshError,
    RefreshResult,
    client_dir,
    latest_personal_state,
)
from .privacy import (
    PrivacyAccountant,
    add_noise,
    clip_update,
    private_mean,
    secure_generator,
)
from .seeds import (
    derive_seed,
)
from .server import (
    ServerOutcome,
    mean_or_none,
    server_update,
)
from .server_optimizer import (
    ServerAdam,
    server_optimizer,
)
from .setup import (
    FederatedModel,
    load_federated_model,
)
from .validation import (
    VAL_K,
    Ranker,
    pick_personal_scale,
    pick_personal_scales,
    validate_user,
    validation_loss,
)

__all__ = [
    "ServerAdam",
    "server_optimizer",
    "SERVER_OPTIMIZER_FILE",
    "server_optimizer_path",
    "ClientJob",
    "batched_client_updates",
    "run_clients",
    "exported_base",
    "Ranker",
    "load_federated_model",
    "FederatedModel",
    "read_round_state",
    "served_base",
    "MERGED_BASE_DIR",
    "SERVED_BASE_DIR",
    "ITEM_ROWS_FILE",
    "ITEM_ROWS_KEY",
    "ADAPTER_GATE_KEY",
    "AGGREGATORS",
    "CLIENTS_DIR",
    "ClientFn",
    "ClientResult",
    "ClientTimeout",
    "ClientUpdate",
    "DualLora",
    "EXPORT_JSON",
    "GATE_SUFFIX",
    "LOCAL_STATE",
    "LOSS_PNG",
    "METRICS_JSON",
    "PARTITION_MODE",
    "PERSONAL",
    "Partition",
    "Personalizer",
    "PrivacyAccountant",
    "Published",
    "ROUND_JSON",
    "RUN_JSON",
    "RefreshError",
    "RefreshResult",
    "Rule",
    "SHARED",
    "SHARED_DIR",
    "ServerOutcome",
    "State",
    "Update",
    "UpdateCheck",
    "VAL_K",
    "VAL_PNG",
    "adapter_for",
    "add_noise",
    "aggregate",
    "build_dual_lora",
    "check_update",
    "client_dir",
    "client_examples",
    "client_update",
    "clip_update",
    "completed_rounds",
    "coordinate_median",
    "derive_seed",
    "eligible_users",
    "fedavg",
    "federated_cohort",
    "filter_updates",
    "finite_metrics",
    "gate_values",
    "holdout_examples",
    "init_personal_state",
    "init_shared_state",
    "latest_personal_state",
    "load_personal",
    "mean_or_none",
    "module_of",
    "open_store",
    "personal_path",
    "personal_versions",
    "personal_weight_mean",
    "pick_personal_scale",
    "pick_personal_scales",
    "private_mean",
    "prune_personal",
    "publish_once",
    "publish_user",
    "scale_picks",
    "read_records",
    "remove_partial_rounds",
    "round_dir",
    "run_client",
    "save_personal",
    "settle_personal",
    "saved_key",
    "scale_personal",
    "secure_generator",
    "select_clients",
    "server_update",
    "shard",
    "shared_weights",
    "state_bytes",
    "trimmed_mean",
    "update_norm",
    "user_weights",
    "validate_user",
    "validation_loss",
    "write_metrics",
    "write_partitions",
    "write_round",
    "FORGOTTEN_JSON",
    "add_forgotten",
    "check_forgettable",
    "cut_back",
    "forgotten_among",
    "forgotten_count",
    "restart_after",
]
