"""vLLM's CPU LoRA slots written in one pass a layer: every slot exactly as vLLM's own
``set_lora`` / ``reset_lora`` leave it, whatever adapter filled it before."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from vllm.lora.layers import base_linear, column_parallel_linear
from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA
from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA

from llmrec_serving.engines import cpu_lora_slots

SLOTS, MAX_RANK, D_IN = 3, 8, 6
QKV = (8, 4, 4)


def pristine(module):
    """A fresh copy of a vLLM module, whatever was installed over the imported one."""
    name = f"{module.__name__}_pristine"
    spec = importlib.util.spec_from_file_location(name, module.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy


BASE, COLUMN = pristine(base_linear), pristine(column_parallel_linear)


class VllmMerged(MergedColumnParallelLinearWithLoRA):
    set_lora = COLUMN.MergedColumnParallelLinearWithLoRA.set_lora
    reset_lora = BASE.BaseLinearLayerWithLoRA.reset_lora


class VllmRow(RowParallelLinearWithLoRA):
    set_lora = BASE.BaseLinearLayerWithLoRA.set_lora
    reset_lora = BASE.BaseLinearLayerWithLoRA.reset_lora


class OursMerged(MergedColumnParallelLinearWithLoRA):
    set_lora = cpu_lora_slots._patched_set_lora(COLUMN.MergedColumnParallelLinearWithLoRA.set_lora)
    reset_lora = cpu_lora_slots.reset_lora


class OursRow(RowParallelLinearWithLoRA):
    set_lora = cpu_lora_slots._patched_set_lora(BASE.BaseLinearLayerWithLoRA.set_lora)
    reset_lora = cpu_lora_slots.reset_lora


def layer(cls, outputs, dtype=torch.bfloat16):
    """A vLLM LoRA layer holding only what writing its slots reads (no base layer)."""
    obj = cls.__new__(cls)
    torch.nn.Module.__init__(obj)
    obj.tp_size, obj.n_slices = 1, len(outputs)
    obj.output_sizes = list(outputs)
    obj.lora_a_stacked = tuple(torch.zeros(SLOTS, 1, MAX_RANK, D_IN, dtype=dtype) for _ in outputs)
    obj.lora_b_stacked = tuple(torch.zeros(SLOTS, 1, n, MAX_RANK, dtype=dtype) for n in outputs)
    return obj


def lora(rank, outputs, seed):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(rank, D_IN, generator=g) for _ in outputs]
    b = [torch.randn(n, rank, generator=g) for n in outputs]
    return a, b


def assert_same_slots(ours, theirs):
    for mine, vllm in zip(
        ours.lora_a_stacked + ours.lora_b_stacked,
        theirs.lora_a_stacked + theirs.lora_b_stacked,
        strict=True,
    ):
        assert torch.equal(mine, vllm)


def test_a_slot_is_what_vllm_writes_through_swaps_of_other_ranks():
    ours, theirs = layer(OursMerged, QKV), layer(VllmMerged, QKV)
    steps = [
        ("set", 1, lora(MAX_RANK, QKV, 0)),
        ("set", 2, lora(4, QKV, 1)),
        ("set", 1, lora(4, QKV, 2)),  # a narrower adapter over a full one: its tails zeroed
        ("reset", 2, None),
        ("set", 2, lora(1, QKV, 3)),
        ("set", 1, lora(MAX_RANK, QKV, 4)),
    ]
    for op, index, weights in steps:
        for target in (ours, theirs):
            if op == "reset":
                target.reset_lora(index)
            else:
                target.set_lora(index, *weights)
        assert_same_slots(ours, theirs)
    assert ours.lora_b_stacked[0][1].abs().sum() > 0  # the slots were written at all


def test_a_single_slice_layer_takes_tensors_not_lists():
    ours, theirs = layer(OursRow, (10,)), layer(VllmRow, (10,))
    for index, rank, seed in [(0, 8, 0), (0, 3, 1), (2, 5, 2)]:
        (a,), (b,) = lora(rank, (10,), seed)
        ours.set_lora(index, a, b)
        theirs.set_lora(index, a, b)
        assert_same_slots(ours, theirs)


@pytest.mark.parametrize(
    "weights",
    [
        ([None, *lora(4, QKV, 5)[0][1:]], [None, *lora(4, QKV, 5)[1][1:]]),  # no q slice
        (lora(4, QKV, 6)[0][:1], [torch.randn(sum(QKV), 4)]),  # one packed group: vLLM splits
    ],
    ids=["missing-slice", "packed-group"],
)
def test_what_does_not_fill_whole_slots_goes_through_vllm(weights):
    ours, theirs = layer(OursMerged, QKV), layer(VllmMerged, QKV)
    for target in (ours, theirs):
        target.set_lora(0, *lora(MAX_RANK, QKV, 7))
        target.set_lora(0, *weights)
    assert not cpu_lora_slots.fits(ours, *weights)
    assert_same_slots(ours, theirs)
    for target in (ours, theirs):  # over what vLLM wrote, a narrower adapter of ours
        target.set_lora(0, *lora(2, QKV, 8))
    assert_same_slots(ours, theirs)


def test_install_is_idempotent():
    cpu_lora_slots.install()
    patched = base_linear.BaseLinearLayerWithLoRA.set_lora
    cpu_lora_slots.install()
    assert base_linear.BaseLinearLayerWithLoRA.set_lora is patched
    assert base_linear.BaseLinearLayerWithLoRA.reset_lora is cpu_lora_slots.reset_lora
    merged = column_parallel_linear.MergedColumnParallelLinearWithLoRA
    own = cpu_lora_slots.VLLM_OWN[(merged, "set_lora")]
    assert own.__module__ == column_parallel_linear.__name__  # vLLM's, not ours twice
