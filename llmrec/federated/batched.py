"""Many clients' local steps in one batched forward (item-token head).

:func:`~llmrec.federated.client.client_update` trains one client at a time: each step is a
forward of one short sequence through the whole base, which leaves most of a CPU's matmul
rate unused. :func:`batched_client_updates` trains a group of clients together and returns
what ``client_update`` returns for each of them, within float rounding (a test pins it).

Why our own code and not peft's: peft runs one set of adapters per forward (its mixed-batch
mode is for inference and loops over the adapters). Here every client's tensors (shared LoRA,
item rows, personal LoRA, gates) are stacked on a leading client axis. The batch's rows are
grouped by client; every adapted Linear adds ``bmm(bmm(x_c, A_c^T), B_c^T) * scaling`` to the
frozen base's output for client ``c``'s rows (in float32, as peft does), and client ``c``'s
own item rows embed its item tokens and score its positions. The objective is the SUM over
clients of each client's mean loss, so client ``c``'s gradient is its own, and AdamW is
elementwise, so one optimizer over the stacks is one optimizer per client.
:func:`batched_losses` runs the same forward without training: the export's personal-scale
pick scores every (user, scale) of a group at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from llmrec.adapters import KEY_PREFIX
from llmrec.federated.client import (
    ClientResult,
    ClientTimeout,
    draw_batch,
    local_optimizers,
    param_groups,
    personal_steps,
    personal_to_train,
)
from llmrec.federated.client_state import save_personal
from llmrec.federated.dual_lora import (
    ADAPTER_GATE_KEY,
    GATE_SUFFIX,
    ITEM_ROWS_KEY,
    DualLora,
    State,
    module_of,
)
from llmrec.federated.seeds import derive_seed
from llmrec.finetune import IGNORE_INDEX, Example, collate


@dataclass(frozen=True)
class ClientJob:
    """One client of a group: who, its examples, and the personal state it starts from."""

    user_id: str
    examples: Sequence[Example]
    personal_state: State


def _stack(states: Sequence[Mapping[str, torch.Tensor]], keys, device, trainable) -> State:
    """(clients, *shape) float32 parameters of ``keys``, one row per state."""
    return {
        k: torch.nn.Parameter(
            torch.stack([s[k].float() for s in states]).to(device), requires_grad=trainable(k)
        )
        for k in keys
    }


def _row(stacks: Mapping[str, torch.Tensor], c: int) -> State:
    return {k: p.detach()[c].cpu().clone() for k, p in stacks.items()}


class _Group:
    """A group's stacked tensors and the forward hooks that apply them.

    While :meth:`active`, peft's own adapters are off (``_disable_adapters``, the flag peft's
    ``disable_adapter()`` sets; set directly because that context manager also flips the
    adapters' ``requires_grad``), so each adapted layer computes base + the stacked updates.
    """

    def __init__(self, dual: DualLora, shared: State, personal: State, gates: State) -> None:
        self.dual, self.shared, self.personal, self.gates = dual, shared, personal, gates
        self.modules = sorted(
            {module_of(k) for k in {**dual.shared, **dual.personal} if k != ITEM_ROWS_KEY}
        )
        self.with_personal = True
        self.dtype = next(dual.model.parameters()).dtype
        cfg = dual.cfg
        self.parts = [
            (shared, cfg.shared_alpha / max(cfg.shared_rank, 1), False),
            (personal, cfg.personal_alpha / max(cfg.personal_rank, 1), True),
        ]

    def _factors(self, module: str, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The module's A and its B times scaling (and gate), per part in the forward."""
        logit = self.gates.get(
            f"{KEY_PREFIX}{module}{GATE_SUFFIX}", self.gates.get(ADAPTER_GATE_KEY)
        )
        a_parts, b_parts = [], []
        for stacks, scaling, is_personal in self.parts:
            a = stacks.get(f"{KEY_PREFIX}{module}.lora_A.weight")
            if a is None or (is_personal and not self.with_personal):
                continue
            b_key = f"{KEY_PREFIX}{module}.lora_B.weight"
            # FedSA-LoRA (fed.share="lora_a"): the shared A's B is the client's own.
            b = (stacks[b_key] if b_key in stacks else self.personal[b_key]) * scaling
            # Without the personal part its gate is neutral (g = 1): the shared weight is 1.
            if logit is not None and self.with_personal:
                g = 2.0 * torch.sigmoid(logit).view(n, 1, 1)
                b = b * (g if is_personal else 2.0 - g)
            a_parts.append(a)
            b_parts.append(b)
        return a_parts, b_parts

    def _hook(self, module: str):
        def add_updates(_layer, args, out):
            n = self.n
            a_parts, b_parts = self._factors(module, n)
            # Both parts in one pair of bmm: [A_s; A_p] then [B_s, B_p] (scaling and gate
            # folded into the small B, not applied to the (tokens, out) update).
            a = torch.cat(a_parts, 1).to(self.dtype)
            b = torch.cat(b_parts, 2).to(self.dtype)
            x = args[0].to(self.dtype).reshape(n, -1, args[0].shape[-1])
            base = out.to(self.dtype).reshape(n, -1, out.shape[-1])
            total = torch.baddbmm(base, torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
            return total.reshape(out.shape).to(out.dtype)

        return add_updates

    @property
    def n(self) -> int:
        return next(iter({**self.shared, **self.personal}.values())).shape[0]

    @contextmanager
    def active(self) -> Iterator[None]:
        named = dict(self.dual.model.named_modules())
        layers = [named[f"{KEY_PREFIX}{m}"] for m in self.modules]
        handles = [
            layer.register_forward_hook(self._hook(m))
            for m, layer in zip(self.modules, layers, strict=True)
        ]
        before = [layer._disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, flag in zip(layers, before, strict=True):
                layer._disable_adapters = flag
            for handle in handles:
                handle.remove()

    def losses(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Each client's mean item cross-entropy, (clients,), over a batch whose rows are
        grouped by client (the same number of rows each)."""
        items = self.dual.items
        assert items is not None
        n = self.n
        rows = self.shared.get(ITEM_ROWS_KEY)
        if rows is None:  # personal-only: the rows are the base's, frozen
            rows = items.item_rows.detach().expand(n, -1, -1)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = batch["labels"].reshape(n, -1)
        embed = items.decoder.get_input_embeddings()
        is_item = ids >= items.first
        x = embed(ids.masked_fill(is_item, 0))
        client = torch.arange(n, device=ids.device).repeat_interleave(ids.shape[0] // n)
        flat = client[:, None] * items.n_items + (ids - items.first).clamp(0, items.n_items - 1)
        # An embedding lookup into the clients' rows side by side: its backward accumulates
        # far faster than advanced indexing's.
        own = torch.nn.functional.embedding(flat, rows.reshape(-1, rows.shape[-1]))
        x = torch.where(is_item.unsqueeze(-1), own.to(x.dtype), x)
        with self.active():
            hidden = items.decoder(inputs_embeds=x, attention_mask=mask).last_hidden_state
        logits = torch.bmm(hidden.float().reshape(n, -1, hidden.shape[-1]), rows.transpose(1, 2))
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).reshape(n, -1)
        return nll.sum(1) / (labels != IGNORE_INDEX).sum(1)


def batched_client_updates(
    dual: DualLora,
    jobs: Sequence[ClientJob],
    shared_state: Mapping[str, torch.Tensor],
    server_round: int,
) -> list[ClientResult]:
    """:func:`~llmrec.federated.client.client_update` for every job at once, in job order.

    The same schedule, optimizer groups, batch draws (each client's generator seeded from
    (seed, round, user)), FedProx term and results. The straggler budget
    ``client_timeout_s`` is the group's: :class:`ClientTimeout` fails the whole group.
    Item-token head only; ValueError for a client without training examples.
    """
    cfg, dec = dual.cfg, dual.cfg.decoupling
    if dual.items is None:
        raise ValueError("batched clients need the item-token head (fed.head='items')")
    start = time.perf_counter()
    trained = [[e for e in job.examples if not e.holdout] for job in jobs]
    for job, data in zip(jobs, trained, strict=True):
        if not data:
            raise ValueError(f"client {job.user_id}: no training examples")
    gens = [
        torch.Generator().manual_seed(derive_seed(cfg.seed, "client", server_round, j.user_id))
        for j in jobs
    ]
    device = dual.device
    starts = [job.personal_state for job in jobs]
    group = _Group(
        dual,
        _stack(
            [shared_state] * len(jobs), dual.shared, device, lambda k: dual.shared[k].requires_grad
        ),
        _stack(starts, dual.personal, device, lambda _k: True),
        _stack(starts, dual.gates, device, lambda _k: True),
    )
    anchor = {k: shared_state[k].float().to(device) for k in dual.shared}
    filler = Example([dual.pad_id], [IGNORE_INDEX], 0)  # evens a short client's rows; no loss

    def steps(train_shared: bool, train_personal: bool, n: int) -> list[list[float]]:
        """``n`` AdamW steps of the group; each client's losses."""
        groups = param_groups(
            cfg,
            shared=list(group.shared.values()) if train_shared else [],
            personal=group.personal if train_personal else {},
            gates=list(group.gates.values()) if train_personal else [],
        )
        # The fused AdamW kernel: one pass over the stacks (the same update as the loop's, to
        # float rounding).
        optimizers = local_optimizers(cfg, groups, fused=True)
        dual.model.train()
        orders: list[list[int]] = [[] for _ in jobs]
        losses: list[list[float]] = [[] for _ in jobs]
        for _ in range(n):
            rows: list[Example] = []
            for c, data in enumerate(trained):
                ids, orders[c] = draw_batch(orders[c], len(data), cfg.local_batch_size, gens[c])
                rows += [data[i] for i in ids] + [filler] * (cfg.local_batch_size - len(ids))
            batch = {k: v.to(device) for k, v in collate(rows, dual.pad_id).items()}
            per_client = group.losses(batch)
            objective = per_client.sum()
            if dec.prox_mu and train_shared:
                drift = sum(((p - anchor[k]) ** 2).sum() for k, p in group.shared.items())
                objective = objective + dec.prox_mu / 2 * drift
            objective.backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for c, value in enumerate(per_client.detach().tolist()):
                losses[c].append(value)
            if time.perf_counter() - start > cfg.client_timeout_s:
                raise ClientTimeout(
                    f"{len(jobs)} batched clients: over the {cfg.client_timeout_s:g} s budget "
                    f"after {len(losses[0])} local steps"
                )
        return losses

    n_personal = personal_steps(dual)
    if dec.schedule == "joint" and dual.shared and dual.personal:
        losses = steps(train_shared=True, train_personal=True, n=cfg.local_steps)
    else:
        losses = []
        if any(p.requires_grad for p in group.shared.values()):
            group.with_personal = False  # exactly plain FedAvg's update
            losses = steps(train_shared=True, train_personal=False, n=cfg.local_steps)
            group.with_personal = True
        if n_personal:
            for param in group.shared.values():  # frozen: the residual fits on top of it
                param.requires_grad_(False)
            personal_losses = steps(train_shared=False, train_personal=True, n=n_personal)
            losses = losses or personal_losses
    trained_personal = bool(n_personal) or dec.schedule == "joint"
    elapsed = time.perf_counter() - start
    results = []
    for c, (job, data) in enumerate(zip(jobs, trained, strict=True)):
        new = _row(group.shared, c)
        results.append(
            ClientResult(
                user_id=job.user_id,
                shared_delta={k: v - shared_state[k].float().cpu() for k, v in new.items()},
                n_examples=sum(e.targets for e in data),
                personal_state=(
                    {**_row(group.personal, c), **_row(group.gates, c)}
                    if trained_personal
                    else dict(job.personal_state)
                ),
                loss=sum(losses[c]) / len(losses[c]),
                seconds=elapsed / len(jobs),
            )
        )
    return results


def run_clients(
    dual: DualLora,
    client_dir: Path,
    jobs: Sequence[tuple[str, Sequence[Example]]],
    shared_state: State,
    server_round: int,
) -> list[ClientResult]:
    """:func:`~llmrec.federated.client.run_client` for a group trained together: each
    client's latest personal state, one batched training, each new state saved on its own
    client's disk. Raises what :func:`batched_client_updates` raises (no new version saved)."""
    starts = [
        ClientJob(user_id, examples, personal_to_train(dual, client_dir, user_id, server_round))
        for user_id, examples in jobs
    ]
    results = batched_client_updates(dual, starts, shared_state, server_round)
    if personal_steps(dual):  # new versions; else each is unchanged
        for result in results:
            save_personal(client_dir, result.user_id, server_round, result.personal_state)
    return results


def batched_losses(
    dual: DualLora,
    shared_state: Mapping[str, torch.Tensor],
    personal_states: Sequence[State],
    examples: Sequence[Sequence[Example]],
) -> list[float]:
    """Client ``c``'s mean item NLL over ``examples[c]`` (token-weighted, as one forward per
    example gives) with ``shared_state`` + ``personal_states[c]``: every client in one
    inference forward. Item-token head only."""
    if dual.items is None:
        raise ValueError("batched losses need the item-token head (fed.head='items')")
    n, device = len(personal_states), dual.device
    # One shared state for all: a view per client, not a copy.
    shared = {
        k: shared_state[k].float().to(device).expand(n, *shared_state[k].shape) for k in dual.shared
    }
    group = _Group(
        dual,
        shared,
        _stack(personal_states, dual.personal, device, lambda _k: False),
        _stack(personal_states, dual.gates, device, lambda _k: False),
    )
    per_client = max(len(e) for e in examples)
    filler = Example([dual.pad_id], [IGNORE_INDEX], 0)
    rows = [row for e in examples for row in [*e, *[filler] * (per_client - len(e))]]
    dual.model.eval()
    with torch.inference_mode():
        batch = {k: v.to(device) for k, v in collate(rows, dual.pad_id).items()}
        return group.losses(batch).tolist()
