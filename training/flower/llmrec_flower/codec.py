"""What crosses the wire between the ServerApp and a ClientApp, and how it is encoded.

Down: the shared adapter as NumPy arrays in sorted key order, plus the round and the
server's resolved config (so every client trains with exactly the server's recipe). Up: the
client's new shared weights (downloaded + its delta; Flower's strategies, DP wrappers and
SecAgg+ all aggregate weights), a weight and scalar metrics. Never the personal state.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from llmrec.config import AppConfig, ConfigError, parse_overrides
from llmrec.federated import State

CONFIG_KEY = "llmrec-config"
"""Fit/evaluate config key holding the server's AppConfig as JSON."""
ROUND_KEY = "round"
EXPORT_KEY = "export"
"""Evaluate config flag: publish your stacked adapter after this (final) round."""
BASE_KEY = "base-fingerprint"
"""Evaluate config of the final round: the fingerprint of the base users are served on
(for the item-token head, the server's new version with the federated item rows)."""
NODE_LOCAL_SECTIONS = ("data", "model")
"""Sections a SuperNode may override for itself: where its data and base model live."""


def to_ndarrays(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> list[np.ndarray]:
    """The state as float32 arrays in ``keys`` order (Flower's parameter list)."""
    return [state[k].detach().float().cpu().numpy() for k in keys]


def from_ndarrays(arrays: Sequence[np.ndarray], keys: Sequence[str]) -> State:
    """The inverse of :func:`to_ndarrays`; a length mismatch is a protocol error."""
    if len(arrays) != len(keys):
        raise ValueError(f"expected {len(keys)} shared arrays, got {len(arrays)}")
    pairs = zip(keys, arrays, strict=True)
    return {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in pairs}


def node_config(cfg_json: str, overrides: str = "") -> AppConfig:
    """The server's config with this node's own ``data.*`` / ``model.*`` overrides applied.

    Training hyperparameters always come from the server: a node may only say where its
    own data and base model are, so every client computes the same update rule.
    """
    data: dict[str, Any] = json.loads(cfg_json)
    items = shlex.split(overrides)
    for item in items:
        if not item.startswith(tuple(f"{s}." for s in NODE_LOCAL_SECTIONS)):
            raise ConfigError(f"node override {item!r}: only data.* and model.* are node-local")
    for section, fields in parse_overrides(items).items():
        data[section] = {**data.get(section, {}), **fields}
    return AppConfig.model_validate(data)
