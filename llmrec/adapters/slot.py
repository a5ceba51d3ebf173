"""One LoRA slot on a frozen base, whose weights are swapped per user by copying tensors.

Swapping by copy into a fixed slot (as vLLM's LoRA manager does) costs a few
milliseconds and never reloads the base. Adapters of a smaller rank are padded
with zero rows/columns and their scale folded into B, which is exact: the padded
ranks contribute nothing. So one slot serves a whole store, shared adapter
(cold start) and stacked user adapters alike.
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.utils import set_peft_model_state_dict

from llmrec.adapters.lora import KEY_PREFIX, LoraWeights

SLOT = "user"


def pad_rank(weights: LoraWeights, rank: int) -> LoraWeights:
    """The same update as a LoRA of rank ``rank`` with alpha = rank (scale 1)."""
    if rank < weights.r:
        raise ValueError(f"cannot pad a rank-{weights.r} adapter down to rank {rank}")
    state = {}
    for module in weights.modules:
        a, b = weights.pair(module)
        a_pad = torch.zeros(rank, a.shape[1], dtype=a.dtype)
        b_pad = torch.zeros(b.shape[0], rank, dtype=b.dtype)
        a_pad[: weights.r] = a
        b_pad[:, : weights.r] = b * weights.scale
        state[f"{KEY_PREFIX}{module}.lora_A.weight"] = a_pad
        state[f"{KEY_PREFIX}{module}.lora_B.weight"] = b_pad
    return LoraWeights(state, rank, float(rank), weights.target_modules, weights.base_model)


class AdapterSlot:
    """A base model wrapped with one LoRA slot of fixed rank; ``use`` swaps the weights in."""

    def __init__(self, model: torch.nn.Module, rank: int, target_modules: tuple[str, ...]):
        self.rank = rank
        self.target_modules = tuple(target_modules)
        config = PeftLoraConfig(
            r=rank, lora_alpha=rank, target_modules=list(target_modules), lora_dropout=0.0
        )
        self.model = get_peft_model(model, config, adapter_name=SLOT).eval()
        self.current: str | None = None

    def use(self, weights: LoraWeights, name: str) -> None:
        """Make ``weights`` (any rank up to the slot's) the active update; ``name`` is a label."""
        if self.current == name:
            return
        if set(weights.target_modules) != set(self.target_modules):
            raise ValueError(
                f"adapter targets {sorted(weights.target_modules)} differ from the slot's "
                f"{sorted(self.target_modules)}"
            )
        padded = pad_rank(weights, self.rank)
        result = set_peft_model_state_dict(self.model, padded.state, adapter_name=SLOT)
        missing = [k for k in result.missing_keys if f".{SLOT}." in k]
        if missing:
            raise ValueError(f"adapter {name!r} does not cover the slot: {missing[:3]} ...")
        self.current = name
