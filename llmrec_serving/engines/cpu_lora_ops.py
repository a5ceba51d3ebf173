"""vLLM's CPU LoRA ops, grouped by adapter: one matmul per adapter slot and layer.

vLLM's CPU path (``vllm/lora/ops/torch_ops``) gathers every token's own copy of its
adapter's A and B (``weights[token_indices]``) and multiplies token by token with an
einsum. On a 100-token prompt that copies each adapted layer's weights 100 times, which
is what made a LoRA request cost about 8 base requests on this CPU
(docs/experiments.md, "Serving on vLLM's CPU engine"). The tokens of one request share
one adapter and sit next to each other, so here:

- an adapted linear layer (:func:`add_lora_linear`, the hot path) takes each run of tokens
  on one slot as one segment: a single shrink over all of the layer's slices (q, k, v
  together), then a single expand through the slices' B block-diagonal, added in place
  into the output (the stacked A and block-diagonal B of a slot are built once per
  adapter written into it, not once per call);
- the other ops (logits, embeddings) take the same runs, one matmul each.

The GPU path runs Triton kernels and is left alone.

The ops also skip tokens whose slot is ``-1`` ("no LoRA", vLLM's own convention): the
torch ops index ``weights[-1]``, the last slot, so a base request batched beside a full
set of loaded adapters would get the last one's delta.

Installed in every vLLM process as a ``vllm.general_plugins`` entry point (pyproject);
``VLLM_PLUGINS`` (vLLM's allow-list) without ``llmrec_cpu_lora_ops`` switches it off.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

# A child of vLLM's logger, so the line reaches the engine's own log.
log = logging.getLogger("vllm.llmrec_cpu_lora_ops")

NO_LORA = -1


def segments(indices: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(slot, start, end)`` for each run of equal slots in ``indices``, runs with no
    adapter left out."""
    if indices.numel() == 0:
        return []
    starts = [0, *(torch.nonzero(indices[1:] != indices[:-1]).squeeze(1) + 1).tolist()]
    ends = [*starts[1:], indices.numel()]
    slots = indices[starts].tolist()
    return [(slot, a, b) for slot, a, b in zip(slots, starts, ends, strict=True) if slot != NO_LORA]


def lora_delta(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``inputs[t] @ weights[indices[t]].T`` for every token ``t``, in ``dtype``; zero for
    tokens with no adapter. ``weights`` is ``[slots, out, in]`` or ``[slots, 1, out, in]``."""
    if weights.dim() == 4:
        weights = weights[:, 0]
    x = inputs.to(dtype)
    runs = segments(indices)
    if len(runs) == 1 and runs[0][1:] == (0, x.shape[0]):  # one adapter for every token
        return F.linear(x, weights[runs[0][0]].to(dtype))
    out = x.new_zeros(x.shape[0], weights.shape[1])
    for slot, start, end in runs:
        out[start:end] = F.linear(x[start:end], weights[slot].to(dtype))
    return out


def batch_segments(wrapper) -> list[tuple[int, int, int]]:
    """:func:`segments` of the wrapper's per-token mapping, computed once per batch: every
    adapted layer of a forward reads the same mapping, and vLLM rewrites it in place for
    the next batch, which bumps the tensor's version."""
    indices = wrapper.token_lora_indices
    key = (indices.data_ptr(), indices._version, indices.numel())
    cached = getattr(wrapper, "_llmrec_segments", None)
    if cached is None or cached[0] != key:
        cached = wrapper._llmrec_segments = (key, segments(indices))
    return cached[1]


def slot_weights(wrapper, lora_a_stacked, lora_b_stacked, slot: int, dtype) -> tuple:
    """``(A, B)`` of one layer's adapter in ``slot``, every slice at once: the slices' A rows
    stacked (``[n r, in]``) and their B block-diagonal (``[sum out_i, n r]``), so a segment
    costs one shrink and one expand. A single slice is its own slot's views; several are
    copied once and cached on the wrapper until any of the layer's stacked tensors is
    written again (their version counters: vLLM writes slots in place)."""
    if len(lora_a_stacked) == 1:
        return lora_a_stacked[0][slot, 0].to(dtype), lora_b_stacked[0][slot, 0].to(dtype)
    cache = wrapper.__dict__.setdefault("_llmrec_slot_weights", {})
    key = (lora_a_stacked[0].data_ptr(), slot, dtype)
    versions = tuple(t._version for t in (*lora_a_stacked, *lora_b_stacked))
    hit = cache.get(key)
    if hit is None or hit[0] != versions:
        a = torch.cat([a_i[slot, 0] for a_i in lora_a_stacked]).to(dtype)
        b = torch.block_diag(*(b_i[slot, 0] for b_i in lora_b_stacked)).to(dtype)
        hit = cache[key] = (versions, a, b)
    return hit[1], hit[2]


def add_lora_linear(
    self,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: torch.Tensor | None = None,
    add_inputs: bool = True,
    **kwargs,
) -> None:
    """``PunicaWrapperCPU.add_lora_linear``: ``y[:, slice i] (+)= scale * x @ A_i.T @ B_i.T``
    with each token's own slot (``[slots, 1, r, in]`` and ``[slots, 1, out_i, r]``).
    ``buffer`` is unused: the shrink of a segment is its own small tensor."""
    y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    if not add_inputs:
        y2.zero_()
    if self.no_lora:
        return
    width = sum(output_slices)
    for slot, start, end in batch_segments(self):
        a, b = slot_weights(self, lora_a_stacked, lora_b_stacked, slot, y2.dtype)
        h = F.linear(x2[start:end].to(y2.dtype), a)
        # addmm_ writes the slices' columns of y in place (BLAS's leading dimension).
        y2[start:end, :width].addmm_(h, b.T, alpha=scale)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    """``output[:, :r] = scaling * x @ A[slot].T`` per token (vLLM's signature)."""
    delta = lora_delta(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : delta.shape[1]] = scaling * delta


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    """``output[:, :n] (+)= x @ B[slot].T`` per token, ``n`` the narrower of the two widths
    (an adapter and the model may pad differently); one row of ``x`` broadcasts."""
    delta = lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    rows = 1 if delta.shape[0] == 1 else output_tensor.shape[0]
    width = min(delta.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :width] += delta[:rows, :width]
    else:
        output_tensor[:, :width] = delta[:rows, :width]


def bgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    lora_indices_tensor,
    slice_offset,
    slice_size,
    add_inputs=True,
):
    """``output[:, offset:offset + size] (+)= x @ B[slot].T`` per token."""
    delta = lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += delta
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = delta


def _per_sequence(op):
    """The ``sgmv_`` twin of a ``bgmv_`` op (prefill): vLLM's prefill metadata, one slot per
    sequence, in place of one slot per token."""

    def sgmv(inputs, weights, output, starts, seq_lens, slots, batches, longest, tokens, *a, **kw):
        op(inputs, weights, output, torch.repeat_interleave(slots, seq_lens), *a, **kw)

    sgmv.__name__ = sgmv.__qualname__ = "s" + op.__name__[1:]
    return sgmv


sgmv_shrink = _per_sequence(bgmv_shrink)
sgmv_expand = _per_sequence(bgmv_expand)
sgmv_expand_slice = _per_sequence(bgmv_expand_slice)

OPS = {
    f.__name__: f
    for f in (
        bgmv_shrink,
        bgmv_expand,
        bgmv_expand_slice,
        sgmv_shrink,
        sgmv_expand,
        sgmv_expand_slice,
    )
}

INSTALLED_MESSAGE = "llmrec: vLLM's CPU LoRA ops grouped by adapter"

VLLM_OWN: dict[tuple[object, str], object] = {}
"""What :func:`install` replaced: ``(class or module, name) -> vLLM's own`` (for
``bench/lora_cpu.py``, which runs the two side by side)."""


def install() -> None:
    """Point vLLM's CPU punica wrapper at these ops (idempotent: vLLM calls general plugins
    once in each of its processes)."""
    from vllm.lora.punica_wrapper import punica_cpu

    wrapper = punica_cpu.PunicaWrapperCPU
    if wrapper.add_lora_linear is add_lora_linear:
        return
    for name, op in OPS.items():
        VLLM_OWN[(punica_cpu, name)] = getattr(punica_cpu, name)
        setattr(punica_cpu, name, op)
    VLLM_OWN[(wrapper, "add_lora_linear")] = wrapper.add_lora_linear
    wrapper.add_lora_linear = add_lora_linear
    log.info(INSTALLED_MESSAGE)
