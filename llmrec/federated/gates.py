"""The per-user gate between the two parts, read from and written into a personal state.

A module computes ``(2 - g) * shared + g * personal`` with ``g = 2 * sigmoid(w)``
(:mod:`llmrec.federated.dual_lora`). Because the gate only scales each branch, export folds
it into ``B`` (``B_s <- (2-g) B_s``, ``B_p <- g B_p``) and the stacked adapter stays exactly
what training computed; :func:`scale_personal` moves a user's adapter between the shared part
alone and the adapter as trained.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from llmrec.adapters import KEY_PREFIX
from llmrec.federated.dual_lora import ADAPTER_GATE_KEY, GATE_SUFFIX, State, module_of


def gate_values(personal_state: Mapping[str, torch.Tensor], module: str) -> tuple[float, float]:
    """``(shared weight, personal weight)`` = ``(2 - g, g)`` of one module; (1, 1) ungated."""
    logit = personal_state.get(f"{KEY_PREFIX}{module}{GATE_SUFFIX}")
    if logit is None:
        logit = personal_state.get(ADAPTER_GATE_KEY)
    if logit is None:
        return 1.0, 1.0
    g = 2.0 * torch.sigmoid(logit.double()).item()
    return 2.0 - g, g


def personal_weight_mean(personal_state: Mapping[str, torch.Tensor]) -> float | None:
    """Mean personal weight g over a user's adapted modules; None without gates."""
    if not any(k.endswith(GATE_SUFFIX) or k == ADAPTER_GATE_KEY for k in personal_state):
        return None
    modules = {module_of(k) for k in personal_state if k.endswith(".lora_A.weight")}
    return sum(gate_values(personal_state, m)[1] for m in modules) / len(modules)


def scale_personal(personal_state: Mapping[str, torch.Tensor], scale: float) -> State:
    """The personal state whose adapter sits ``scale`` of the way from shared-only to as trained.

    A module computes ``s * shared + p * personal`` with ``(s, p) = (2 - g, g)``; the result
    computes ``(1 + scale * (s - 1), scale * p)``: scale 0 is exactly the shared adapter, 1 the
    state unchanged. It rewrites the gate logit to ``g' = 1 - scale * (1 - g)`` and multiplies
    the personal B by ``scale * g / g'``, so the dual LoRA and export read it like any other
    state.
    """
    if scale == 1.0:
        return dict(personal_state)
    out = dict(personal_state)
    factors: dict[str, float] = {}
    for key in personal_state:
        if key.endswith(".lora_A.weight"):
            module = module_of(key)
            _, g = gate_values(personal_state, module)
            g_new = 1.0 - scale * (1.0 - g)
            factors[module] = scale * g / g_new
            gate_key = f"{KEY_PREFIX}{module}{GATE_SUFFIX}"
            key_of_gate = gate_key if gate_key in personal_state else ADAPTER_GATE_KEY
            if key_of_gate in personal_state:
                logit = math.log(g_new / (2.0 - g_new))  # inverse of g = 2 * sigmoid(w)
                out[key_of_gate] = torch.full_like(personal_state[key_of_gate], logit)
    for key, tensor in personal_state.items():
        if key.endswith(".lora_B.weight"):
            # A B without a personal A is FedSA-LoRA's own B of the one LoRA: ungated, so
            # scaled by ``scale`` itself (0 = the shared A with B = 0, as cold start).
            out[key] = (tensor.double() * factors.get(module_of(key), scale)).float()
    return out
