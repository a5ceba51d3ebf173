"""vLLM's CPU LoRA ops grouped by adapter: the same deltas as token by token and as vLLM's
own wrapper, no LoRA for slot -1, and installed over vLLM's own ops."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from vllm.lora.ops import torch_ops
from vllm.lora.punica_wrapper import punica_cpu

from llmrec_serving.engines import cpu_lora_ops
from llmrec_serving.engines.cpu_lora_ops import NO_LORA

SLOTS, RANK, D_IN, D_OUT = 4, 8, 24, 40


def weights(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def per_token(x, w, indices, dtype):
    """The reference: each token through its own slot's weight, zero without one."""
    w = w[:, 0] if w.dim() == 4 else w
    rows = [
        torch.zeros(w.shape[1], dtype=dtype)
        if int(i) == NO_LORA
        else x[t].to(dtype) @ w[int(i)].to(dtype).T
        for t, i in enumerate(indices)
    ]
    return torch.stack(rows)


# A prefill batch: three sequences on slots 2, 0 and 2, one base sequence.
SEQ_LENS = torch.tensor([5, 3, 4, 2])
SEQ_SLOTS = torch.tensor([2, 0, 2, NO_LORA])
TOKENS = int(SEQ_LENS.sum())
TOKEN_SLOTS = torch.repeat_interleave(SEQ_SLOTS, SEQ_LENS)


def prefill_meta():
    starts = torch.cumsum(SEQ_LENS, 0) - SEQ_LENS
    return starts, SEQ_LENS, SEQ_SLOTS, len(SEQ_LENS), int(SEQ_LENS.max()), TOKENS


@pytest.mark.parametrize("indices", [TOKEN_SLOTS, torch.full((TOKENS,), 3)])
def test_shrink_then_expand_is_each_tokens_own_adapter(indices):
    x = weights((TOKENS, D_IN), 0)
    a, b = weights((SLOTS, 1, RANK, D_IN), 1), weights((SLOTS, 1, D_OUT, RANK), 2)
    buffer = torch.zeros(TOKENS, RANK)
    cpu_lora_ops.bgmv_shrink(x, a, buffer, indices, 0.5)
    expected_buffer = 0.5 * per_token(x, a, indices, torch.float32)
    torch.testing.assert_close(buffer, expected_buffer)

    y = weights((TOKENS, 3 * D_OUT), 3)
    before = y.clone()
    cpu_lora_ops.bgmv_expand_slice(buffer, b, y, indices, D_OUT, D_OUT, add_inputs=True)
    delta = per_token(buffer, b, indices, torch.bfloat16)
    torch.testing.assert_close(y[:, D_OUT : 2 * D_OUT], before[:, D_OUT : 2 * D_OUT] + delta)
    torch.testing.assert_close(y[:, :D_OUT], before[:, :D_OUT])
    torch.testing.assert_close(y[:, 2 * D_OUT :], before[:, 2 * D_OUT :])


def test_prefill_ops_match_vllms_own_where_every_token_has_an_adapter():
    x = weights((TOKENS, D_IN), 4)
    a, b = weights((SLOTS, 1, RANK, D_IN), 5), weights((SLOTS, 1, D_OUT, RANK), 6)
    meta = list(prefill_meta())
    meta[2] = torch.tensor([2, 0, 2, 1])  # vLLM's torch ops give slot -1 the last slot
    ours, theirs = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    cpu_lora_ops.sgmv_shrink(x, a, ours, *meta, 2.0)
    torch_ops.sgmv_shrink(x, a, theirs, *meta, 2.0)
    torch.testing.assert_close(ours, theirs)

    y_ours, y_theirs = weights((TOKENS, D_OUT), 7), weights((TOKENS, D_OUT), 7)
    cpu_lora_ops.sgmv_expand(ours, b, y_ours, *meta, add_inputs=True)
    torch_ops.sgmv_expand(theirs, b, y_theirs, *meta, add_inputs=True)
    torch.testing.assert_close(y_ours, y_theirs)


def test_a_base_sequence_gets_no_delta_beside_adapted_ones():
    x = weights((TOKENS, D_IN), 8)
    a, b = weights((SLOTS, 1, RANK, D_IN), 9), weights((SLOTS, 1, D_OUT, RANK), 10)
    buffer = torch.full((TOKENS, RANK), 7.0)  # shrink assigns: stale values must go
    cpu_lora_ops.sgmv_shrink(x, a, buffer, *prefill_meta(), 1.0)
    y = weights((TOKENS, D_OUT), 11)
    before = y.clone()
    cpu_lora_ops.sgmv_expand_slice(buffer, b, y, *prefill_meta(), 0, D_OUT, add_inputs=True)
    base = TOKEN_SLOTS == NO_LORA
    assert torch.equal(buffer[base], torch.zeros(int(base.sum()), RANK))
    assert torch.equal(y[base], before[base])
    assert not torch.equal(y[~base], before[~base])


def test_expand_writes_the_narrower_width_and_broadcasts_one_row():
    b = weights((SLOTS, D_OUT + 8, RANK), 12)  # an adapter padded wider than the output
    x = weights((1, RANK), 13).float()
    y = torch.zeros(3, D_OUT, dtype=torch.bfloat16)
    cpu_lora_ops.bgmv_expand(x, b, y, torch.tensor([1]), add_inputs=False)
    row = per_token(x, b, torch.tensor([1]), torch.bfloat16)[0, :D_OUT]
    torch.testing.assert_close(y, row.expand(3, D_OUT))


def test_install_replaces_vllms_cpu_ops_once(monkeypatch):
    for name in cpu_lora_ops.OPS:
        monkeypatch.setattr(punica_cpu, name, getattr(torch_ops, name))
    own = punica_cpu.PunicaWrapperCPU.add_lora_linear  # set, so that it is restored after
    monkeypatch.setattr(punica_cpu.PunicaWrapperCPU, "add_lora_linear", own)
    cpu_lora_ops.install()
    cpu_lora_ops.install()
    for name, op in cpu_lora_ops.OPS.items():
        assert getattr(punica_cpu, name) is op
    assert punica_cpu.PunicaWrapperCPU.add_lora_linear is cpu_lora_ops.add_lora_linear


def vllms_own_wrapper_class():
    """A fresh copy of vLLM's CPU punica wrapper module, whatever was installed over the
    imported one (vLLM loads its plugins in any process that builds an engine)."""
    name = "vllm.lora.punica_wrapper._pristine_cpu"
    spec = importlib.util.spec_from_file_location(name, punica_cpu.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PunicaWrapperCPU


def decode_wrapper(token_slots, cls=punica_cpu.PunicaWrapperCPU):
    """A CPU punica wrapper with ``token_slots`` as its per-token mapping."""
    wrapper = cls(64, 8, "cpu")
    wrapper._token_lora_indices[: len(token_slots)] = token_slots
    wrapper.indices_len = [len(token_slots)] * 6
    wrapper.is_prefill, wrapper.no_lora = False, False
    return wrapper


def linear_world(seed):
    """A q/k/v-like layer: three slices of 40, 16 and 16 columns, rank 8."""
    sizes = (D_OUT, 16, 16)
    a = tuple(weights((SLOTS, 1, RANK, D_IN), seed + i) for i in range(3))
    b = tuple(weights((SLOTS, 1, size, RANK), seed + 3 + i) for i, size in enumerate(sizes))
    return weights((TOKENS, D_IN), seed + 6), a, b, sizes


def test_segments_are_the_runs_of_one_slot():
    assert cpu_lora_ops.segments(TOKEN_SLOTS) == [(2, 0, 5), (0, 5, 8), (2, 8, 12)]
    assert cpu_lora_ops.segments(torch.full((3,), NO_LORA)) == []


def test_a_batchs_segments_are_computed_once_and_follow_the_next_batch():
    wrapper = decode_wrapper(TOKEN_SLOTS)
    first = cpu_lora_ops.batch_segments(wrapper)
    assert cpu_lora_ops.batch_segments(wrapper) is first
    # vLLM's next batch: the mapping rewritten in place, as _update_base_metadata does.
    wrapper._token_lora_indices[:TOKENS].copy_(torch.full((TOKENS,), 1))
    assert cpu_lora_ops.batch_segments(wrapper) == [(1, 0, TOKENS)]


def test_add_lora_linear_matches_vllms_own_wrapper():
    slots = torch.tensor([2, 2, 2, 0, 0, 2, 1, 1, 1, 1, 3, 3, 0, 0])
    x, a, b, sizes = linear_world(20)
    y_ours, y_theirs = weights((TOKENS, sum(sizes)), 30), weights((TOKENS, sum(sizes)), 30)
    cpu_lora_ops.add_lora_linear(decode_wrapper(slots), y_ours, x, a, b, 0.5, sizes)
    theirs = decode_wrapper(slots, vllms_own_wrapper_class())
    theirs.add_lora_linear(y_theirs, x, a, b, 0.5, sizes)
    torch.testing.assert_close(y_ours, y_theirs, rtol=2e-2, atol=2e-2)


def test_add_lora_linear_leaves_base_tokens_alone():
    x, a, b, sizes = linear_world(40)
    y = weights((TOKENS, sum(sizes)), 50)
    before = y.clone()
    cpu_lora_ops.add_lora_linear(decode_wrapper(TOKEN_SLOTS), y, x, a, b, 1.0, sizes)
    base = TOKEN_SLOTS == NO_LORA
    assert torch.equal(y[base], before[base])
    assert not torch.equal(y[~base], before[~base])


def test_a_slots_cached_weights_follow_its_next_adapter():
    """A slot's stacked A and block-diagonal B are cached per wrapper; a write into any of
    the layer's slots (vLLM's reset, or ``torch._foreach_copy_`` as ``cpu_lora_slots``
    writes them) makes the next call read the new weights."""
    slots = torch.tensor([2, 2, 2, 0, 0, 2, 1, 1, 1, 1, 3, 3, 0, 0])
    x, a, b, sizes = linear_world(60)
    ours, theirs = decode_wrapper(slots), decode_wrapper(slots, vllms_own_wrapper_class())
    _, new_a, new_b, _ = linear_world(70)
    writes = [
        lambda: None,
        lambda: torch._foreach_copy_(
            [t[2, 0] for t in (*a, *b)], [t[2, 0] for t in (*new_a, *new_b)]
        ),
        lambda: a[1].__setitem__(0, 0),  # vLLM's reset_lora of slot 0, one slice of it
    ]
    for write in writes:
        write()
        y_ours, y_theirs = weights((TOKENS, sum(sizes)), 80), weights((TOKENS, sum(sizes)), 80)
        cpu_lora_ops.add_lora_linear(ours, y_ours, x, a, b, 0.5, sizes)
        theirs.add_lora_linear(y_theirs, x, a, b, 0.5, sizes)
        torch.testing.assert_close(y_ours, y_theirs, rtol=2e-2, atol=2e-2)
