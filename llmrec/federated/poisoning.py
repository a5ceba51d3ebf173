"""The model-poisoning attack the robust aggregation rules are tested and measured against.

ALIE (Baruch, Baruch, Goldberg 2019, "A Little Is Enough: Circumventing Defenses For
Distributed Learning"): the attackers know every honest update of the round and all send
the same one, the honest updates' coordinate-wise mean plus ``z`` standard deviations. It
lives in the library so that the test (tiny model) and ``bench/poisoning.py`` (the real
model) attack with one definition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmrec.federated.dual_lora import State


def alie(honest: Sequence[State], z: float) -> State:
    """Mean + ``z`` std of the ``honest`` deltas, per coordinate (an omniscient attacker)."""
    if len(honest) < 2:
        raise ValueError("ALIE needs at least two honest updates (a standard deviation)")
    out = {}
    for key in honest[0]:
        stacked = torch.stack([u[key].double() for u in honest])
        out[key] = (stacked.mean(0) + z * stacked.std(0)).to(honest[0][key].dtype)
    return out
