"""The server's round: check the clients' shared deltas, aggregate them, apply the result.

The aggregation rules live in :mod:`llmrec.federated.aggregate` (FedAvg, median, trimmed
mean) and client-level DP in :mod:`llmrec.federated.privacy`; this module applies them to
the shared adapter the way both runners need (the Flower app uses Flower's strategies for
the same rules and checks, see ``training/flower/llmrec_flower/strategy.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from llmrec.config import FedConfig
from llmrec.data import user_sort_key
from llmrec.federated.aggregate import aggregate, filter_updates, update_norm
from llmrec.federated.client import ClientUpdate
from llmrec.federated.dual_lora import State
from llmrec.federated.privacy import private_mean
from llmrec.federated.server_optimizer import ServerAdam

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOutcome:
    """One aggregation: the new shared state and the verdict on every client update."""

    shared_state: State
    accepted: list[str]
    rejected: dict[str, str]
    """Client id -> why its update was not averaged."""
    norms: dict[str, float]
    """L2 norm of each accepted update (before DP clipping)."""
    noised: bool
    """True when a DP-noised aggregate was applied (one accountant step)."""


def server_update(
    shared_state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    cfg: FedConfig,
    generator: torch.Generator | None = None,
    optimizer: ServerAdam | None = None,
) -> ServerOutcome:
    """Validate the clients' shared deltas, aggregate the accepted ones, apply the result.

    Malformed, non-finite or (without DP) oversized deltas are rejected and logged, never
    averaged. Accepted ones are summed in user order (reproducible bits) with
    ``cfg.aggregation``, or with DP on by ``privacy.private_mean`` (clip, uniform mean,
    noise from ``generator``). The aggregate is added to the shared state, or with an
    ``optimizer`` (FedAdam) is its pseudo-gradient. With nothing accepted the shared state is
    unchanged.
    """
    state = {k: v.detach().clone() for k, v in shared_state.items()}
    if not state:  # personal-only ablation: nothing is federated
        return ServerOutcome(state, [], {}, {}, noised=False)
    reference = {k: tuple(v.shape) for k, v in state.items()}
    # With DP, clipping bounds every client; a data-dependent rejection would change n.
    max_norm = None if cfg.dp.enabled else cfg.max_update_norm
    by_user = {u.user_id: (u.shared_delta, u.n_examples) for u in updates}
    accepted, rejected = filter_updates(by_user, reference, max_norm)
    ids = sorted(accepted, key=user_sort_key)
    if not ids:
        log.warning("no acceptable update this round: the shared adapter is unchanged")
        return ServerOutcome(state, [], rejected, {}, noised=False)
    deltas = [{k: accepted[u][0][k].float() for k in reference} for u in ids]
    norms = {u: update_norm(d) for u, d in zip(ids, deltas, strict=True)}
    if cfg.dp.enabled:
        if generator is None:
            raise ValueError("dp.enabled needs a noise generator (privacy.secure_generator)")
        mean, _ = private_mean(deltas, cfg.dp.clip_norm, cfg.dp.noise_multiplier, generator)
    else:
        counts = [float(accepted[u][1]) for u in ids]
        # In float64 and added in float64: the exact mean is rounded once, as the Flower
        # server rounds its float64 mean of weights (numerically the same adapter).
        wide = [{k: d[k].double() for k in d} for d in deltas]
        mean = aggregate(cfg.aggregation, wide, counts, cfg.trim_ratio)
    if optimizer is not None:
        state = optimizer.step(state, mean)
    else:
        for key in state:
            state[key] = (state[key].double() + mean[key].double()).to(state[key].dtype)
    return ServerOutcome(state, ids, rejected, norms, noised=cfg.dp.enabled)


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of what the clients reported (a loss, seconds); None when none did."""
    return sum(values) / len(values) if values else None
