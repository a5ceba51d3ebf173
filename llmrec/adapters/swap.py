"""One LoRA on a frozen base whose weights are swapped per user by copying tensors in.

Swapping by copy into a fixed LoRA of fixed rank (as vLLM's LoRA manager does) never
reloads the base. Adapters of a smaller rank are padded with zero rows/columns and their
scale folded into B, which is exact: the padded ranks contribute nothing. So one
:class:`SwappableLora` serves a whole store, shared adapter (cold start) and stacked user
adapters alike.
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.utils import set_peft_model_state_dict

from llmrec.adapters.constants import KEY_PREFIX
from llmrec.adapters.lora import LoraWeights

PEFT_ADAPTER_NAME = "user"
"""The peft adapter name the swapped weights live under."""


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


class SwappableLora:
    """A base model wrapped with one LoRA of fixed rank; ``use`` copies an adapter's weights in."""

    def __init__(self, model: torch.nn.Module, rank: int, target_modules: tuple[str, ...]):
        self.rank = rank
        self.target_modules = tuple(target_modules)
        config = PeftLoraConfig(
            r=rank, lora_alpha=rank, target_modules=list(target_modules), lora_dropout=0.0
        )
        self.model = get_peft_model(model, config, adapter_name=PEFT_ADAPTER_NAME).eval()
        self.current: str | None = None

    def use(self, weights: LoraWeights, name: str) -> None:
        """Make ``weights`` (any rank up to this LoRA's) the active update; ``name`` is a label."""
        if self.current == name:
            return
        if set(weights.target_modules) != set(self.target_modules):
            raise ValueError(
                f"adapter targets {sorted(weights.target_modules)} differ from the swappable "
                f"LoRA's {sorted(self.target_modules)}"
            )
        padded = pad_rank(weights, self.rank)
        result = set_peft_model_state_dict(self.model, padded.state, adapter_name=PEFT_ADAPTER_NAME)
        missing = [k for k in result.missing_keys if f".{PEFT_ADAPTER_NAME}." in k]
        if missing:
            raise ValueError(
                f"adapter {name!r} does not cover the swappable LoRA: {missing[:3]} ..."
            )
        self.current = name
