"""Server-side aggregation of the clients' shared LoRA deltas: validation and the averaging rules.

An update is one client's shared-LoRA delta, a ``{parameter name: tensor}`` dict (e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). This module knows nothing
about models, training or transport: every rule is a pure function over tensors, so the
``accelerate`` loop and a Flower strategy can both call it.

Rules and where they come from:

- ``fedavg`` -- weighted mean by example count. McMahan et al. 2017, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data" (AISTATS).
- ``median`` and ``trimmed_mean`` -- coordinate-wise median and coordinate-wise trimmed mean,
  robust to a minority of arbitrary (Byzantine) updates. Yin et al. 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates" (ICML).

Validation (``check_update``/``filter_updates``) runs first, so a malformed or poisoned update
(wrong keys or shapes, NaN/inf, oversized) is rejected with a reason and never averaged in.
With client-level DP on, aggregate with ``llmrec.federated.privacy`` instead (uniform mean of
clipped updates plus noise).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from llmrec.pseudonyms import pseudonym

logger = logging.getLogger(__name__)

Update = dict[str, torch.Tensor]
"""One client's shared-LoRA delta: parameter name -> tensor (fp32 on the wire)."""

Rule = Callable[[Sequence[Update], Sequence[float], float], Update]
"""Uniform signature of an aggregation rule: (updates, weights, trim_ratio) -> aggregate."""


# --------------------------------------------------------------------------- helpers


def _check_same_layout(updates: Sequence[Update]) -> None:
    """Raise ValueError unless all updates exist and share the first one's keys and shapes."""
    if not updates:
        raise ValueError("no updates to aggregate")
    first = updates[0]
    for i, update in enumerate(updates[1:], start=1):
        if update.keys() != first.keys():
            diff = sorted(update.keys() ^ first.keys())
            raise ValueError(f"update {i} has different keys from update 0: {diff[:5]}")
        for key, tensor in update.items():
            if tensor.shape != first[key].shape:
                raise ValueError(
                    f"update {i} key {key!r} has shape {tuple(tensor.shape)}, "
                    f"update 0 has {tuple(first[key].shape)}"
                )


def _stack(updates: Sequence[Update], key: str) -> torch.Tensor:
    """The ``key`` tensor of every update stacked on a new dim 0, in float64."""
    return torch.stack([u[key].to(torch.float64) for u in updates])


# --------------------------------------------------------------------------- rules


def fedavg(updates: Sequence[Update], weights: Sequence[float]) -> Update:
    """Weighted mean of ``updates`` (McMahan et al. 2017); ``weights`` are example counts.

    Accumulates in float64 in the given order and casts back to each tensor's dtype. The order
    is fixed so that the result is bitwise reproducible: the caller passes updates sorted by
    client id, and then 1 or N training processes produce the same bits.

    Raises ValueError on no updates, a length mismatch, mismatched keys/shapes, a negative or
    non-finite weight, or a non-positive total weight.
    """
    _check_same_layout(updates)
    if len(weights) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    weights = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError(f"total weight must be > 0, got {total}")

    out: Update = {}
    for key, ref in updates[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for update, weight in zip(updates, weights, strict=True):
            acc += update[key].to(torch.float64) * weight  # fixed order => reproducible bits
        out[key] = (acc / total).to(ref.dtype)
    return out


def coordinate_median(updates: Sequence[Update]) -> Update:
    """Coordinate-wise median of ``updates`` (Yin et al. 2018); unweighted.

    For an even number of updates it is the mean of the two middle values (as ``numpy.median``
    and Flower's FedMedian), not torch's lower median, so the rule is symmetric.
    """
    _check_same_layout(updates)
    n = len(updates)
    out: Update = {}
    for key, ref in updates[0].items():
        ordered = _stack(updates, key).sort(dim=0).values
        mid = ordered[(n - 1) // 2 : n // 2 + 1]  # one row if n is odd, the two middle ones if even
        out[key] = mid.mean(dim=0).to(ref.dtype)
    return out


def trimmed_mean(updates: Sequence[Update], trim_ratio: float) -> Update:
    """Coordinate-wise trimmed mean (Yin et al. 2018); unweighted.

    Per coordinate, drops the ``floor(trim_ratio * n)`` smallest and as many largest values
    and averages the rest (as ``scipy.stats.trim_mean`` and Flower's FedTrimmedAvg). Raises
    ValueError unless ``0 <= trim_ratio < 0.5`` or if nothing would remain.
    """
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    _check_same_layout(updates)
    n = len(updates)
    cut = math.floor(trim_ratio * n)
    if n - 2 * cut <= 0:  # unreachable for ratio < 0.5, kept as a guard against edits above
        raise ValueError(f"trim_ratio {trim_ratio} leaves no update out of {n}")
    out: Update = {}
    for key, ref in updates[0].items():
        ordered = _stack(updates, key).sort(dim=0).values
        out[key] = ordered[cut : n - cut].mean(dim=0).to(ref.dtype)
    return out


AGGREGATORS: Mapping[str, Rule] = MappingProxyType(
    {
        "fedavg": lambda updates, weights, trim_ratio: fedavg(updates, weights),
        # the robust rules ignore example counts: a Byzantine client could lie about them
        "median": lambda updates, weights, trim_ratio: coordinate_median(updates),
        "trimmed_mean": lambda updates, weights, trim_ratio: trimmed_mean(updates, trim_ratio),
    }
)
"""Aggregation rules by name (the value of the training config's aggregation field)."""


def aggregate(
    rule: str, updates: Sequence[Update], weights: Sequence[float], trim_ratio: float = 0.1
) -> Update:
    """Aggregate ``updates`` with the rule named ``rule`` (a key of ``AGGREGATORS``).

    ``weights`` (example counts, one per update) are used by ``fedavg`` only; ``trim_ratio`` by
    ``trimmed_mean`` only.
    """
    if rule not in AGGREGATORS:
        raise ValueError(f"unknown aggregation rule {rule!r}; allowed: {sorted(AGGREGATORS)}")
    if len(weights) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    return AGGREGATORS[rule](updates, weights, trim_ratio)


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class UpdateCheck:
    """The server's verdict on one client update."""

    accepted: bool
    reason: str | None
    """Why it was rejected; None when accepted."""
    norm: float
    """L2 norm over all its tensors; NaN when its structure was too broken to compute it."""


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over all tensors of ``update`` (as if flattened into one vector).

    Computed in float64 so that fp32 values near the top of their range do not overflow.
    """
    total = 0.0
    for tensor in update.values():
        total += float(torch.sum(tensor.detach().to(torch.float64) ** 2))
    return math.sqrt(total)


def _short(keys: Sequence[str], limit: int = 3) -> str:
    """A readable, bounded list of keys for a rejection reason."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{shown}]{more}"


def check_update(
    update: object,
    reference: Mapping[str, torch.Size | tuple[int, ...]],
    max_norm: float | None,
) -> UpdateCheck:
    """Validate one client update against the shared parameters' names and shapes.

    Rejects a non-dict, missing or extra keys, non-tensor or non-floating values, wrong shapes,
    NaN/inf values, and an L2 norm (over all tensors) above ``max_norm`` (if given). The update
    is client input, so this never raises on it; a bad ``max_norm`` (server config) raises
    ValueError.
    """
    if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0 or None, got {max_norm}")

    def reject(reason: str, norm: float = math.nan) -> UpdateCheck:
        return UpdateCheck(accepted=False, reason=reason, norm=norm)

    if not isinstance(update, Mapping):
        return reject(f"update is a {type(update).__name__}, not a mapping of tensors")
    missing = sorted(k for k in reference if k not in update)
    if missing:
        return reject(f"missing keys {_short(missing)}")
    extra = sorted(str(k) for k in update if k not in reference)
    if extra:
        return reject(f"unexpected keys {_short(extra)}")
    for key, expected in reference.items():
        value = update[key]
        if not isinstance(value, torch.Tensor):
            return reject(f"{key!r} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            return reject(f"{key!r} has dtype {value.dtype}, not a floating-point type")
        if tuple(value.shape) != tuple(expected):
            return reject(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(expected)}")

    norm = update_norm(update)
    for key, value in update.items():
        if not bool(torch.isfinite(value).all()):
            return reject(f"non-finite values (NaN/inf) in {key!r}", norm)
    if max_norm is not None and norm > max_norm:
        return reject(f"oversized: norm {norm:.4g} > max_norm {max_norm:.4g}", norm)
    return UpdateCheck(accepted=True, reason=None, norm=norm)


def filter_updates(
    updates: Mapping[str, tuple[Update, float]],
    reference: Mapping[str, torch.Size | tuple[int, ...]],
    max_norm: float | None,
) -> tuple[dict[str, tuple[Update, float]], dict[str, str]]:
    """Split ``{client id: (update, example count)}`` into accepted and rejected clients.

    Returns ``(accepted, rejected)``: ``accepted`` keeps the input order (the caller sorts by
    client id for reproducible sums); ``rejected`` maps client id -> reason. Every rejection is
    logged as a warning. An example count that is not a finite number > 0 is rejected too: it
    is client input as well, and fedavg would otherwise fail or be skewed by it.
    """
    accepted: dict[str, tuple[Update, float]] = {}
    rejected: dict[str, str] = {}
    for client_id, (update, weight) in updates.items():
        check = check_update(update, reference, max_norm)
        reason = check.reason
        if check.accepted and not _valid_count(weight):
            reason = f"example count must be a finite number > 0, got {weight!r}"
        if reason is None:
            accepted[client_id] = (update, weight)
        else:
            rejected[client_id] = reason
            logger.warning("rejected update from client %s: %s", pseudonym(client_id), reason)
    return accepted, rejected


def _valid_count(weight: object) -> bool:
    """True for a finite real number > 0 (bool excluded: True is not an example count)."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        return False
    return math.isfinite(float(weight)) and float(weight) > 0
