"""vLLM's CPU LoRA slots, written in one or two calls a layer: what swapping an adapter in costs.

vLLM keeps every loaded adapter in its CPU cache and copies the ones a batch uses into
``--max-loras`` slots (``activate_adapter``): for each adapted layer it zeroes the slot
(``reset_lora``), then copies each slice's A and B in (``set_lora``). On a GPU those are
a few kernel launches; on a CPU each is a Python-level indexing and copy, about 500 of them
per adapter for SmolLM2-135M, so a warm swap cost about 13 ms, most of it Python, for a
few MB of copying (docs/experiments.md, "Serving on vLLM's CPU engine").

Here a linear layer's slot is written with one ``torch._foreach_copy_`` (each slice's A
rows and B columns) and, only where the slot's previous adapter had a larger rank, one
``torch._foreach_zero_`` of the rows and columns it leaves behind. Views of the slots are
cached per slot and ranks, and each slot remembers the rank written into it. The slot
ends up exactly as vLLM's own ``set_lora`` leaves it (``tests/test_cpu_lora_slots.py``).
Anything else goes through vLLM's own code: tensor parallelism, packed groups that need
splitting, a slice missing from the adapter, an adapter narrower than the layer.

Installed beside the ops (:mod:`llmrec_serving.engines.cpu_lora_ops`) as a
``vllm.general_plugins`` entry point, on the CPU platform only.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("vllm.llmrec_cpu_lora_slots")

INSTALLED_MESSAGE = "llmrec: vLLM's CPU LoRA slots written in one pass a layer"

VLLM_OWN: dict[tuple[type, str], object] = {}
"""What :func:`install` replaced: ``(class, name) -> vLLM's own`` (for
``bench/lora_cpu.py``, which runs the two side by side)."""

_VIEWS = "_llmrec_slot_views"
_FILLED = "_llmrec_slot_ranks"


def slot_views(layer, index: int, rank: int, filled: int) -> tuple[list, list, list]:
    """``(a_heads, b_heads, tails)`` of slot ``index`` for an adapter of ``rank`` over one
    that filled ``filled`` rows: each slice's first ``rank`` rows of A and columns of B,
    and what is left of the old adapter past them (cached: the stacked tensors are
    allocated once, when the engine starts)."""
    cache = layer.__dict__.setdefault(_VIEWS, {})
    views = cache.get((index, rank, filled))
    if views is None:
        a_slots = [a[index, 0] for a in layer.lora_a_stacked]
        b_slots = [b[index, 0] for b in layer.lora_b_stacked]
        tails = [a[rank:filled] for a in a_slots] + [b[:, rank:filled] for b in b_slots]
        views = cache[(index, rank, filled)] = (
            [a[:rank] for a in a_slots],
            [b[:, :rank] for b in b_slots],
            [t for t in tails if t.numel()],
        )
    return views


def _filled(layer) -> dict[int, int]:
    """Slot -> the rank written into it; a slot not in it may hold anything up to the
    slot's full rank (vLLM's own code wrote it last)."""
    return layer.__dict__.setdefault(_FILLED, {})


def _written_rank(layer, index: int) -> int:
    """How many rows of slot ``index`` may hold an adapter (the full rank when unknown)."""
    return _filled(layer).get(index, layer.lora_a_stacked[0].shape[-2])


def _as_slices(weights) -> list:
    return list(weights) if isinstance(weights, (list, tuple)) else [weights]


def fits(layer, lora_a: list, lora_b: list) -> bool:
    """True when the adapter fills whole slots of ``layer``: one A and B per slice, all of
    one rank within the slot's, A as wide as the layer's input and B as tall as each
    slice's output, on one process (no tensor-parallel slicing)."""
    if layer.tp_size != 1 or not (len(lora_a) == len(lora_b) == layer.n_slices):
        return False
    if any(t is None for t in (*lora_a, *lora_b)):
        return False
    rank = lora_a[0].shape[0]
    return all(
        a.shape == (rank, slot_a.shape[-1])
        and b.shape == (slot_b.shape[-2], rank)
        and rank <= slot_a.shape[-2]
        for a, b, slot_a, slot_b in zip(
            lora_a, lora_b, layer.lora_a_stacked, layer.lora_b_stacked, strict=True
        )
    )


def _patched_set_lora(original):
    def set_lora(self, index: int, lora_a, lora_b):
        a, b = _as_slices(lora_a), _as_slices(lora_b)
        filled = _filled(self)
        if not fits(self, a, b):
            original(self, index, lora_a, lora_b)  # its reset_lora is ours: forget after it
            filled.pop(index, None)
            return
        rank = a[0].shape[0]
        a_heads, b_heads, tails = slot_views(self, index, rank, _written_rank(self, index))
        torch._foreach_copy_(a_heads + b_heads, a + b)
        if tails:
            torch._foreach_zero_(tails)
        filled[index] = rank

    set_lora.__name__ = set_lora.__qualname__ = "set_lora"
    return set_lora


def reset_lora(self, index: int) -> None:
    """Zero slot ``index`` of every slice (vLLM's ``BaseLinearLayerWithLoRA.reset_lora``)."""
    _, _, tails = slot_views(self, index, 0, _written_rank(self, index))
    if tails:
        torch._foreach_zero_(tails)
    _filled(self)[index] = 0


def install() -> None:
    """Write the linear layers' slots as above, on the CPU platform only (idempotent)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA

    if VLLM_OWN:
        return
    for cls in (BaseLinearLayerWithLoRA, MergedColumnParallelLinearWithLoRA):
        VLLM_OWN[(cls, "set_lora")] = cls.set_lora
        cls.set_lora = _patched_set_lora(cls.set_lora)
    VLLM_OWN[(BaseLinearLayerWithLoRA, "reset_lora")] = BaseLinearLayerWithLoRA.reset_lora
    BaseLinearLayerWithLoRA.reset_lora = reset_lora
    log.info(INSTALLED_MESSAGE)
