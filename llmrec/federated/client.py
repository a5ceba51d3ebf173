"""The client's round: its examples, local training of the dual LoRA, what it uploads.

Schedule (``decoupling.schedule``). "sequential", the default, trains the shared part first
with the personal part switched off, so the averaged adapter is exactly plain FedAvg's (the
personal part cannot absorb what the crowd would learn), then fits the personal part on top
of it, FedRep-style (Collins et al. 2021) with the roles of the two phases swapped. "joint"
trains both in the same steps.

Two regularizers keep a user's peculiarities in the personal part and what users share in
the shared one: FedProx (Li et al. 2020) ``prox_mu`` on the shared part (a client
cannot drag the shared adapter towards itself) and ``personal_decay``, AdamW's decoupled
weight decay on the personal B matrices (a user's few examples are not memorized).

:class:`ClientUpdate` is the ONLY thing that leaves a client; :func:`run_client` keeps the
new personal state in the client's own folder (:mod:`llmrec.federated.client_state`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmrec.config import FedConfig
from llmrec.data import Catalog, Split
from llmrec.federated.client_state import load_personal, personal_path, save_personal
from llmrec.federated.dual_lora import DualLora, State, init_personal_state
from llmrec.federated.gates import scale_personal
from llmrec.federated.seeds import derive_seed
from llmrec.finetune import IGNORE_INDEX, Example, collate, next_item_examples
from llmrec.foundation import history_sequences

if TYPE_CHECKING:
    from llmrec.model.item_vocab import ItemVocab
    from llmrec.prompts import PromptBuilder


class ClientTimeout(RuntimeError):
    """A client exceeded its straggler budget (``fed.client_timeout_s``)."""


@dataclass(frozen=True)
class ClientUpdate:
    """What a client uploads: its shared delta and example count. Nothing personal."""

    user_id: str
    shared_delta: State
    n_examples: int
    loss: float
    """Mean training loss over the local steps (reported, not used by the server)."""
    seconds: float


@dataclass(frozen=True)
class ClientResult:
    """A client's full outcome: the upload, plus the new personal state it keeps locally."""

    user_id: str
    shared_delta: State
    n_examples: int
    personal_state: State
    loss: float
    seconds: float

    def upload(self) -> ClientUpdate:
        """The part that leaves the client (the personal state is left out by construction)."""
        return ClientUpdate(
            self.user_id, self.shared_delta, self.n_examples, self.loss, self.seconds
        )


def client_examples(
    split: Split,
    catalog: Catalog,
    prompts: PromptBuilder,
    cfg: FedConfig,
    user_id: str,
    vocab: ItemVocab | None = None,
) -> list[Example]:
    """One client's training examples: the last ``targets_per_user`` positions of its own
    training history (titles head), or every position of it (item-token head, ``vocab``
    given). The last ``decoupling.holdout_targets`` of them form one sequence
    marked ``holdout``: never trained on, it is the client's own validation data (with the
    validation item it picks the personal scale at export). The same for every variant, so
    that shared-only and ours train their shared parts on the same data."""
    if cfg.head == "items":
        if vocab is None:
            raise ValueError("fed.head='items' needs the item vocabulary")
        k = min(cfg.decoupling.holdout_targets, max(0, len(split.train[user_id]) - 2))
        return item_examples(split.train[user_id], catalog, prompts, cfg, vocab, holdout=k)
    history = split.train[user_id]
    k = min(cfg.decoupling.holdout_targets, cfg.targets_per_user - 1, max(0, len(history) - 2))
    examples = next_item_examples(
        {user_id: history[: len(history) - k]},
        catalog,
        prompts,
        per_user=cfg.targets_per_user - k,
        per_example=cfg.targets_per_example,
    )
    if k:
        tail = next_item_examples({user_id: history}, catalog, prompts, per_user=k, per_example=k)
        examples += [dataclasses.replace(e, holdout=True) for e in tail]
    return examples


def item_examples(
    history: Sequence[str],
    catalog: Catalog,
    prompts: PromptBuilder,
    cfg: FedConfig,
    vocab: ItemVocab,
    holdout: int = 0,
) -> list[Example]:
    """Item-token examples of one history: every window (``cfg.window`` items) of it but its
    last ``holdout`` items, each position labelled with its next item's catalog index; then,
    with ``holdout``, one ``holdout`` sequence whose last ``holdout`` positions alone are."""
    items = [i for i in history if i in catalog]
    k = min(holdout, len(items))
    seqs = history_sequences(
        {"client": items[: len(items) - k]}, catalog, vocab, prompts, "items", cfg.window
    )
    examples = [
        Example(s.input_ids, s.labels, sum(label != IGNORE_INDEX for label in s.labels))
        for s in seqs
    ]
    if k:
        chunk = items[-(cfg.window + 1) :]
        ids, ends = prompts.item_sequence([vocab.token_id(i) for i in chunk], [""] * len(chunk))
        labels = [IGNORE_INDEX] * len(ids)
        for j in range(len(chunk) - k, len(chunk)):
            labels[ends[j]] = vocab.index(chunk[j])
        examples.append(Example(ids, labels, k, holdout=True))
    return examples


def holdout_examples(examples: Sequence[Example]) -> list[Example]:
    """The client's held-out examples (never trained on; they pick the personal scale)."""
    return [e for e in examples if e.holdout]


def client_update(
    dual: DualLora,
    user_id: str,
    examples: Sequence[Example],
    shared_state: Mapping[str, torch.Tensor],
    personal_state: State,
    server_round: int,
) -> ClientResult:
    """Train the dual LoRA locally on one user's examples; return the shared delta to upload.

    Starts from the downloaded ``shared_state`` and the user's own ``personal_state``. Each
    phase takes ``local_steps`` AdamW steps (fresh optimizer: no optimizer state crosses
    rounds) on batches drawn by a generator seeded from (seed, round, user_id). With
    ``decoupling.schedule="sequential"`` the shared part trains first with the personal part
    off (the very update plain FedAvg makes), then the personal part on top of it (with its
    decay and gates); "joint" trains both in the same steps. Holdout examples are never
    trained on. Raises :class:`ClientTimeout` when
    ``cfg.client_timeout_s`` runs out (checked between steps) and ValueError without examples.
    """
    cfg = dual.cfg
    if not examples:
        raise ValueError(f"client {user_id}: no training examples")
    start = time.perf_counter()
    seed = derive_seed(cfg.seed, "client", server_round, user_id)
    torch.manual_seed(seed)  # anything stochastic left in the model draws from here
    gen = torch.Generator().manual_seed(seed)
    dec = cfg.decoupling
    trained = [e for e in examples if not e.holdout]
    if not trained:
        raise ValueError(f"client {user_id}: every example is held out")

    def steps(groups: list[dict], prox: State | None, n: int = cfg.local_steps) -> list[float]:
        return _local_steps(dual, groups, trained, gen, prox, start, user_id, n)

    personal_groups = param_groups(
        cfg, shared=[], personal=dual.personal, gates=list(dual.gates.values())
    )
    shared_groups = param_groups(cfg, shared=list(dual.shared.values()), personal={}, gates=[])
    trained_personal = bool(personal_steps(dual))
    if dec.schedule == "joint" and dual.shared and dual.personal:
        dual.load(shared_state, personal_state)
        downloaded = dual.shared_state()
        losses = steps(shared_groups + personal_groups, downloaded)
    else:
        losses = []
        n_personal = personal_steps(dual)
        # A caller may have frozen the shared part (a local refresh uploads nothing).
        trainable = {k: p.requires_grad for k, p in dual.shared.items()}
        if any(trainable.values()):
            # The personal part off (B = 0, gates neutral): exactly plain FedAvg's update.
            dual.load(shared_state, scale_personal(personal_state, 0.0))
            downloaded = dual.shared_state()
            losses = steps(shared_groups, downloaded)
        if n_personal:
            dual.load(dual.shared_state() if losses else shared_state, personal_state)
            for param in dual.shared.values():  # frozen: the residual fits on top of it
                param.requires_grad_(False)
            try:
                personal_losses = steps(personal_groups, None, n_personal)
            finally:
                for key, param in dual.shared.items():
                    param.requires_grad_(trainable[key])
            losses = losses or personal_losses
    delta = {
        k: p.detach().float().cpu() - shared_state[k].float().cpu() for k, p in dual.shared.items()
    }
    return ClientResult(
        user_id=user_id,
        shared_delta=delta,
        n_examples=sum(e.targets for e in trained),
        personal_state=dual.personal_state() if trained_personal else dict(personal_state),
        loss=sum(losses) / len(losses),
        seconds=time.perf_counter() - start,
    )


def personal_steps(dual: DualLora) -> int:
    """Steps a client update gives the personal part: ``local_steps``; with schedule
    "after", none while the shared part trains (a round) and ``personal_steps`` where it is
    frozen (the fit after the last round, a local refresh); none without a personal part."""
    dec = dual.cfg.decoupling
    if not dual.personal:
        return 0
    if dec.schedule != "after":
        return dual.cfg.local_steps
    shared_trains = any(p.requires_grad for p in dual.shared.values())
    return 0 if shared_trains else dec.personal_steps


def param_groups(
    cfg: FedConfig,
    shared: list[torch.nn.Parameter],
    personal: Mapping[str, torch.nn.Parameter],
    gates: list[torch.nn.Parameter],
) -> list[dict]:
    """AdamW parameter groups of a local phase (the non-empty ones): the shared part, the
    personal A, the personal B with ``personal_decay``, the gates at their own rate."""
    dec = cfg.decoupling
    personal_lr = cfg.personal_learning_rate
    groups = [
        {"params": shared, "lr": cfg.learning_rate, "shared": True},
        {"params": [p for k, p in personal.items() if "lora_B" not in k], "lr": personal_lr},
        # Decoupled decay on B only (B = 0 is "no personal update"; A is a projection). As a
        # loss term, Adam would rescale it away; AdamW's decay shrinks by lr * decay per step.
        {
            "params": [p for k, p in personal.items() if "lora_B" in k],
            "lr": personal_lr,
            "weight_decay": dec.personal_decay,
        },
        {"params": gates, "lr": dec.gate_learning_rate},
    ]
    return [g for g in groups if g["params"]]


def local_optimizers(
    cfg: FedConfig, groups: list[dict], fused: bool = False
) -> list[torch.optim.Optimizer]:
    """The optimizers of a local phase: the shared group by ``fed.local_optimizer`` (AdamW or
    plain SGD), every other group by AdamW (``fused``: torch's one-pass kernel)."""
    sgd = cfg.local_optimizer == "sgd"
    plain = [g for g in groups if sgd and g.get("shared")]
    adam = [g for g in groups if g not in plain]
    optimizers: list[torch.optim.Optimizer] = []
    if plain:
        optimizers.append(torch.optim.SGD(plain, lr=cfg.learning_rate))
    if adam:
        optimizers.append(torch.optim.AdamW(adam, weight_decay=0.0, fused=fused or None))
    for optimizer in optimizers:
        # Gradients an earlier phase left on these (the personal part is in the forward
        # while the shared part trains) must not leak into this phase's first step.
        optimizer.zero_grad(set_to_none=True)
    return optimizers


def draw_batch(
    order: list[int], n: int, batch_size: int, gen: torch.Generator
) -> tuple[list[int], list[int]]:
    """The next batch of example indices and what is left of the shuffled order (one more
    permutation of the ``n`` examples is appended when fewer than ``batch_size`` remain)."""
    if len(order) < batch_size:
        order = order + torch.randperm(n, generator=gen).tolist()
    return order[:batch_size], order[batch_size:]


def _local_steps(
    dual: DualLora,
    groups: list[dict],
    examples: Sequence[Example],
    gen: torch.Generator,
    prox_anchor: State | None,
    start: float,
    user_id: str,
    n_steps: int,
) -> list[float]:
    """``n_steps`` AdamW steps on ``groups`` over batches of ``examples``; the losses.

    ``prox_anchor`` (the downloaded shared state) adds FedProx's ``mu/2 ||shared - anchor||^2``.
    """
    cfg = dual.cfg
    optimizers = local_optimizers(cfg, groups)
    dual.model.train()
    mu = cfg.decoupling.prox_mu
    order: list[int] = []
    losses: list[float] = []
    for _ in range(n_steps):
        batch_ids, order = draw_batch(order, len(examples), cfg.local_batch_size, gen)
        loss = dual.loss(collate([examples[i] for i in batch_ids], dual.pad_id))
        objective = loss
        if mu and prox_anchor is not None:
            drift = sum(
                ((p - prox_anchor[k].to(p.device)) ** 2).sum() for k, p in dual.shared.items()
            )
            objective = objective + mu / 2 * drift
        objective.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if time.perf_counter() - start > cfg.client_timeout_s:
            raise ClientTimeout(
                f"client {user_id}: over the {cfg.client_timeout_s:g} s budget "
                f"after {len(losses)} local steps"
            )
    return losses


ClientFn = Callable[[DualLora, str, Sequence[Example], State, State, int], ClientResult]
"""The signature of :func:`client_update` (a test may wrap it to inject failures)."""


def personal_to_train(dual: DualLora, client_dir: Path, user_id: str, server_round: int) -> State:
    """The personal state a client's round starts from: its latest version before the round,
    or its first (from (seed, user)). A version of this round left by a crashed attempt is
    deleted: it must not outlive a failure now."""
    personal_path(client_dir, user_id, server_round).unlink(missing_ok=True)
    personal = load_personal(client_dir, user_id, before=server_round)
    return personal if personal is not None else init_personal_state(dual, dual.cfg.seed, user_id)


def run_client(
    dual: DualLora,
    client_dir: Path,
    user_id: str,
    examples: Sequence[Example],
    shared_state: State,
    server_round: int,
    client_fn: ClientFn = client_update,
) -> ClientResult:
    """One client's round: its latest personal state, local training, the new state saved.

    The caller uploads ``result.upload()`` and nothing else. Raises what ``client_fn``
    raises; the new personal version is then absent, so a retry starts from the same state.
    """
    personal = personal_to_train(dual, client_dir, user_id, server_round)
    result = client_fn(dual, user_id, examples, shared_state, personal, server_round)
    if personal_steps(dual):  # a new version (it stays on the client); else it is unchanged
        save_personal(client_dir, user_id, server_round, result.personal_state)
    return result
