"""What users are served: the shared adapter, each user's stacked adapter, publishing them.

A user's adapter is ONE plain PEFT LoRA of rank ``r_s + r_p``: the shared and personal parts
stacked, with the gates folded into the B matrices (:mod:`llmrec.federated.gates`), so it
computes exactly what the two gated adapters computed in training and any LoRA server (vLLM)
can serve it. Users never trained (cold start) are served the shared adapter.

With ``fed.merge_shared`` the shared adapter is merged into the served foundation-model
version instead, and a user's adapter is their stacked one minus the shared one (the shared
B scaled by the gate's weight minus 1): users whose personal part is off have none and are
served the version alone, as are cold-start users.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmrec.adapters import (
    DEFAULT_MAX_RANK,
    SHARED_ID,
    AdapterStore,
    LoraWeights,
    module_shapes_for,
    stack,
    state_equal,
)
from llmrec.config import FedConfig
from llmrec.data import Split
from llmrec.federated.dual_lora import ITEM_ROWS_KEY, DualLora, State, module_of
from llmrec.federated.gates import gate_values, personal_weight_mean, scale_personal
from llmrec.federated.layout import MERGED_BASE_DIR, SERVED_BASE_DIR
from llmrec.federated.validation import Ranker, pick_personal_scales

if TYPE_CHECKING:
    from llmrec.adapters import AdapterRef


def _weights(
    state: Mapping[str, torch.Tensor],
    rank: int,
    alpha: float,
    cfg: FedConfig,
    base_model: str,
    b_scale: Mapping[str, float] | None = None,
) -> LoraWeights:
    """LoraWeights of the LoRA keys in ``state``; ``b_scale[module]`` multiplies that B."""
    out: State = {}
    for key, tensor in state.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            continue  # gate logits are folded, not exported
        scale = (b_scale or {}).get(module_of(key), 1.0) if key.endswith("lora_B.weight") else 1.0
        out[key] = (tensor.double() * scale).float() if scale != 1.0 else tensor.float().clone()
    return LoraWeights(
        out, rank, float(alpha), tuple(sorted(set(cfg.target_modules or []))), base_model
    )


def shared_weights(dual: DualLora, shared_state: Mapping[str, torch.Tensor]) -> LoraWeights:
    """The shared adapter as a plain PEFT LoRA (what cold-start users are served). Under
    FedSA-LoRA (``fed.share="lora_a"``) the shared A with B = 0: the base's own output."""
    cfg, state = dual.cfg, dict(shared_state)
    if cfg.share == "lora_a":
        state.update({k: torch.zeros(tuple(p.shape)) for k, p in dual.personal.items()})
    return _weights(state, cfg.shared_rank, cfg.shared_alpha, cfg, dual.base_model)


def user_weights(
    shared_state: Mapping[str, torch.Tensor],
    personal_state: Mapping[str, torch.Tensor],
    cfg: FedConfig,
    base_model: str,
) -> LoraWeights:
    """One user's adapter: shared and personal stacked into ONE LoRA of rank r_s + r_p.

    The gates are folded into the B matrices first, so the result computes exactly what
    the two gated adapters computed in training. With ``shared_rank == 0`` it is the
    (gate-free) personal adapter alone; under FedSA-LoRA (``share="lora_a"``) the shared A with
    the user's own B. Otherwise with ``personal_rank == 0`` there is no user adapter
    (ValueError): such users are served the shared one. With ``cfg.merge_shared`` the shared
    part is what the user adds to the merged shared adapter: its B times (weight - 1).
    """
    if cfg.share == "lora_a":
        state = {**shared_state, **personal_state}
        return _weights(state, cfg.shared_rank, cfg.shared_alpha, cfg, base_model)
    if not cfg.personal_rank:
        raise ValueError("personal_rank is 0: every user is served the shared adapter")
    modules = sorted({module_of(k) for k in personal_state if k.endswith(".lora_A.weight")})
    weights = {m: gate_values(personal_state, m) for m in modules}
    personal = _weights(
        personal_state,
        cfg.personal_rank,
        cfg.personal_alpha,
        cfg,
        base_model,
        {m: w[1] for m, w in weights.items()},
    )
    if not cfg.shared_rank:
        return personal
    shared = _weights(
        shared_state,
        cfg.shared_rank,
        cfg.shared_alpha,
        cfg,
        base_model,
        {m: w[0] - cfg.merge_shared for m, w in weights.items()},
    )
    return stack(shared, personal)


def is_zero(weights: LoraWeights) -> bool:
    """True when the adapter changes nothing (every B is zero)."""
    return all(not t.any() for k, t in weights.state.items() if k.endswith(".lora_B.weight"))


def served_base(
    base_path: str, shared_state: Mapping[str, torch.Tensor], out_dir: Path, cfg: FedConfig
) -> str:
    """The base users are served on: ``base_path`` itself (titles head), or for the
    item-token head a new foundation-model version, ``base_path`` with the federated item
    rows of ``shared_state`` (and its shared adapter merged in under ``cfg.merge_shared``),
    written to ``out_dir/base`` (``base-merged``; replaced if there); its marker tells a
    reader to read ``cfg.window`` items as item tokens."""
    if ITEM_ROWS_KEY not in shared_state:
        return base_path
    from llmrec.foundation import write_item_version
    from llmrec.model import fingerprint_model_dir

    fields = {
        "kind": "federated-item-base",
        "item_base_fingerprint": fingerprint_model_dir(base_path),
        "llm": {"render": "items", "window": cfg.window},
        "shared_merged": cfg.merge_shared,
    }
    merge = None
    if cfg.merge_shared:
        merge = _weights(shared_state, cfg.shared_rank, cfg.shared_alpha, cfg, base_path)
    dst = Path(out_dir) / (MERGED_BASE_DIR if cfg.merge_shared else SERVED_BASE_DIR)
    rows = shared_state[ITEM_ROWS_KEY]
    return str(write_item_version(Path(base_path), rows, dst, fields, merge))


def publish_once(
    store: AdapterStore,
    user_id: str,
    weights: LoraWeights,
    base_fingerprint: str,
    server_round: int,
    metrics: Mapping[str, float],
) -> AdapterRef:
    """Publish ``weights`` as the next version of ``user_id`` (or of the shared adapter),
    unless the current version already holds exactly them for this round and base: an
    export redone by ``--resume`` after a kill then leaves the store as one export would."""
    ref = store.shared() if user_id == SHARED_ID else store.current(user_id)
    if (
        ref is not None
        and ref.manifest.server_round == server_round
        and ref.manifest.base_fingerprint == base_fingerprint
        and state_equal(store.load(ref).state, weights.state)
    ):
        return ref
    args = dict(base_fingerprint=base_fingerprint, server_round=server_round, metrics=metrics)
    if user_id == SHARED_ID:
        return store.publish_shared(weights, **args)
    return store.publish(user_id, weights, **args)


def adapter_for(store: AdapterStore, user_id: str) -> AdapterRef | None:
    """The adapter to serve ``user_id``: their own current version, else the shared one.

    Cold-start users (never in a federated cohort) get the shared adapter; None before any
    federated training was published.
    """
    ref = store.current(user_id)
    return ref if ref is not None else store.shared()


def open_store(
    cfg: FedConfig,
    base_path: str,
    store_dir: Path | None = None,
    base_fingerprint: str | None = None,
) -> AdapterStore:
    """The adapter store a run publishes to, checking adapters against ``base_path``."""
    return AdapterStore(
        store_dir if store_dir is not None else cfg.store_dir,
        max_rank=max(DEFAULT_MAX_RANK, cfg.shared_rank + cfg.personal_rank),
        module_shapes=module_shapes_for(base_path),
        base_fingerprint=base_fingerprint,
    )


def finite_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite number entries of a round record (for manifests, which refuse NaN)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[key] = float(value)
    return out


@dataclass(frozen=True)
class Published:
    """A user's adapter as published: its store entry (None: the user adds nothing to the
    served base, which serves them alone), mean gate g, and picked scale."""

    ref: AdapterRef | None
    personal_weight: float | None
    personal_scale: float


def scale_picks(
    dual: DualLora,
    validation: tuple[Ranker, Split],
    shared_state: State,
    personal_states: Mapping[str, State],
) -> dict[str, tuple[float, dict[float, float]]]:
    """Each user's personal-scale pick (:func:`pick_personal_scales`): for users with a
    validation item, when both ranks are set and ``personal_scales`` has more than one value;
    the others are published as trained."""
    cfg = dual.cfg
    if not (cfg.shared_rank and cfg.personal_rank and len(set(cfg.decoupling.personal_scales)) > 1):
        return {}
    ranker, split = validation
    picked = {u: s for u, s in personal_states.items() if u in split.valid}
    return pick_personal_scales(dual, ranker, split, shared_state, picked)


def publish_user(
    store: AdapterStore,
    user_id: str,
    shared_state: State,
    personal_state: State,
    dual: DualLora,
    base_fingerprint: str,
    server_round: int,
    metrics: Mapping[str, float],
    pick: tuple[float, Mapping[float, float]] | None = None,
) -> Published:
    """Publish the user's stacked adapter after ``server_round`` (:func:`publish_once`);
    nothing under ``merge_shared`` when it is zero.

    With ``pick`` (a :func:`scale_picks` entry: the scale and every scale's loss) the personal
    part is first scaled by it. Users never trained are not published: they are cold start,
    served the shared adapter.
    """
    scale, metrics = 1.0, dict(metrics)
    personal = personal_state
    if pick is not None:
        scale, losses = pick
        personal = scale_personal(personal_state, scale)
        metrics.update(personal_scale=scale, val_loss_picked=losses[scale])
    weights = user_weights(shared_state, personal, dual.cfg, dual.base_model)
    ref = None
    if not (dual.cfg.merge_shared and is_zero(weights)):
        ref = publish_once(store, user_id, weights, base_fingerprint, server_round, metrics)
    return Published(ref, personal_weight_mean(personal), scale)
