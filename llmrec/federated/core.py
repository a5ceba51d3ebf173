"""Federated shared + personal LoRA: the client update, the server step, the per-user export.

Every user owns a LoRA adapter made of two parts on the same modules (DESIGN.md, "Flow of
data"): a SHARED part of rank ``r_s`` that the server averages across clients, and a PERSONAL
part of rank ``r_p`` that never leaves the client and is never averaged. One peft model holds
both as two named adapters, "shared" and "personal", active together in the forward (peft
sums their updates); these are *slots* that each client fills by copying tensors in, so
serving many simulated clients never reloads the model.

Decoupling (how a person's taste survives federation). The position paper behind this
project (arXiv 2506.11563) asks that averaging never wash a user out. Two published
mechanisms shaped what is here:

- FedSA-LoRA (Guo et al., arXiv 2410.01463) shows that in federated LoRA part of the low-rank
  factors carries what clients share and the rest what is client-specific, and shares only the
  former. We keep the split at the adapter level: a whole personal adapter stays local, so the
  server never sees any client-specific factor.
- FedPA (Zhang et al., arXiv 2405.04840) pairs a user-level adapter with a shared one and
  learns an *adaptive gate* that balances the two per user. Our gate (``fed.decoupling.gate``)
  is a learned per-user scalar ``g = 2 * sigmoid(w)`` in (0, 2), one per user ("adapter") or
  per user and module ("module"); the module computes ``(2 - g) * shared + g * personal``.
  ``w = 0`` starts every user at the plain sum, and a user whose taste departs from the crowd
  can turn the shared part down and the personal part up. Because the gate only scales each
  branch, export folds it into ``B`` (``B_s <- (2-g) B_s``, ``B_p <- g B_p``) and the stacked
  adapter stays exactly what training computed.
- Two regularizers are available too: FedProx (Li et al. 2020) ``prox_mu`` on the shared
  part (a client cannot drag the shared adapter towards itself, so its peculiarities must go
  into the personal one) and ``personal_decay``, AdamW's decoupled weight decay on the
  personal B matrices (a user's few examples are not memorized, and what users have in
  common is cheaper to put into the shared one).
- Measure and pick (``decoupling.personal_scales``): at export each client scores the items
  nobody trained on (its ``holdout_targets`` and validation item) with its adapter moved from
  the shared part alone (0) to as trained (1) and publishes the best. A personal part that
  memorized its user's titles instead of learning their taste is turned down for that user
  alone; the pick never leaves the client.

Schedule (``decoupling.schedule``). "sequential", the default, trains the shared part first
with the personal part switched off, so the averaged adapter is exactly plain FedAvg's (the
personal part cannot absorb what the crowd would learn), then fits the personal part on top
of it, FedRep-style (Collins et al. 2021) with the roles of the two phases swapped.

Measured (training/README.md has the tables and commands; the real 135M model, ML-100K):
an unregularized or lightly decayed personal part memorizes its user's few training titles
(lower train loss, higher test NLL); decay 300 on its B keeps it small; with the joint
schedule the shared part itself fell behind plain FedAvg. With the defaults on a 16-user
cohort, 11 of 16 clients pick scale 0 (served exactly the shared-only adapter) and the 5 that
keep a personal part add one hit but not a lower mean test NLL: at about 30 targets per user
the personal part has little to learn that the prompt's history does not already say.

Contract: library code that knows nothing about processes, transports or schedules: a runner
(``training/federated.py`` with accelerate, ``training/flower/`` with Flower) selects clients,
runs :func:`run_client` on each (:func:`client_update` plus the client's own personal-state
folder), ships :class:`ClientUpdate` (the ONLY thing that leaves a client) to the server,
which aggregates (:func:`server_update`, or Flower's strategies). Results depend on
(seed, round, user_id) only, never on which process or machine ran a client.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from llmrec.adapters import (
    DEFAULT_MAX_RANK,
    KEY_PREFIX,
    AdapterStore,
    LoraWeights,
    module_shapes_for,
    stack,
)
from llmrec.atomic import write_atomic
from llmrec.config import FedConfig
from llmrec.data import Catalog, Split, user_sort_key
from llmrec.federated.aggregate import aggregate, filter_updates, update_norm
from llmrec.federated.privacy import private_mean
from llmrec.finetune import IGNORE_INDEX, Example, collate, next_item_examples, sample_users

if TYPE_CHECKING:
    from llmrec.adapters import AdapterRef
    from llmrec.prompts import PromptBuilder
    from llmrec.recommend import Recommender

log = logging.getLogger(__name__)

SHARED = "shared"
PERSONAL = "personal"
"""peft adapter names of the two slots (and the words used everywhere for the two parts)."""
GATE_SUFFIX = ".gate"
"""Personal-state key of a module's gate logit: ``base_model.model.<module>.gate``."""
ADAPTER_GATE_KEY = "gate"
"""Personal-state key of the single gate logit in ``gate="adapter"`` mode."""

State = dict[str, torch.Tensor]
"""Tensors keyed as in a saved PEFT adapter (``base_model.model.<module>.lora_A.weight``)."""


class ClientTimeout(RuntimeError):
    """A client exceeded its straggler budget (``fed.client_timeout_s``)."""


# --------------------------------------------------------------------------- seeds, selection


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, e.g. ``(seed, "client", round, user_id)``.

    sha256 of their text, so it is the same in every process and Python run (``hash()`` is
    salted per process and would make a client's result depend on where it ran).
    """
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def select_clients(cohort: Sequence[str], n: int, seed: int, round: int) -> list[str]:
    """The ``n`` clients of ``round``: a seeded sample of the cohort, in user order."""
    chosen = random.Random(derive_seed(seed, "select", round)).sample(
        list(cohort), min(n, len(cohort))
    )
    return sorted(chosen, key=user_sort_key)


def shard(clients: Sequence[str], process_index: int, num_processes: int) -> list[str]:
    """Clients one process runs: client ``i`` goes to process ``i % num_processes``."""
    return list(clients[process_index::num_processes])


# --------------------------------------------------------------------------- key names


def saved_key(param_name: str, adapter_name: str) -> str | None:
    """peft's in-memory name -> the saved-format key, or None if not ``adapter_name``'s.

    ``base_model.model.<m>.lora_A.shared.weight`` -> ``base_model.model.<m>.lora_A.weight``.
    The one place where the two naming schemes meet.
    """
    for part in ("lora_A", "lora_B"):
        infix = f".{part}.{adapter_name}.weight"
        if param_name.endswith(infix):
            return param_name[: -len(infix)] + f".{part}.weight"
    return None


def _module_of(key: str) -> str:
    """Module path of a saved LoRA key (``base_model.model.<m>.lora_A.weight`` -> ``<m>``)."""
    return key.removeprefix(KEY_PREFIX).rsplit(".", 2)[0]


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state's tensors (what crosses the network when it is sent)."""
    return sum(t.numel() * t.element_size() for t in state.values())


# --------------------------------------------------------------------------- slots


@dataclass
class Slots:
    """The frozen base with a "shared" and a "personal" LoRA slot, both active.

    ``shared``/``personal`` map saved-format keys to the live parameters; ``gates`` maps gate
    keys to the gate logits (empty when ``gate="none"``). Absent parts (rank 0) are empty.
    """

    model: torch.nn.Module
    cfg: FedConfig
    pad_id: int
    base_model: str
    shared: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    personal: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    gates: dict[str, torch.nn.Parameter] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(iter({**self.shared, **self.personal}.values())).device

    def load(self, shared_state: Mapping[str, torch.Tensor], personal_state: State) -> None:
        """Copy a client's downloaded shared state and its own personal state into the slots."""
        with torch.no_grad():
            for key, param in self.shared.items():
                param.copy_(shared_state[key])
            for key, param in {**self.personal, **self.gates}.items():
                param.copy_(personal_state[key])

    def shared_state(self) -> State:
        """A float32 CPU copy of the shared slot."""
        return {k: p.detach().float().cpu().clone() for k, p in self.shared.items()}

    def personal_state(self) -> State:
        """A float32 CPU copy of the personal slot and the gate logits."""
        items = {**self.personal, **self.gates}.items()
        return {k: p.detach().float().cpu().clone() for k, p in items}


def _peft_config(rank: int, alpha: float, targets: Sequence[str]):
    from peft import LoraConfig as PeftLoraConfig

    # Dropout 0: a client's result must depend on (seed, round, user) only; plain LoRA
    # (no bias, no DoRA) so the exported adapter is servable by vLLM.
    return PeftLoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_slots(model: torch.nn.Module, cfg: FedConfig, pad_id: int) -> Slots:
    """Wrap the frozen base in peft with the two LoRA slots (and gate hooks), both trainable.

    ``cfg.target_modules`` must be resolved (``AppConfig`` does it). Adapter weights are
    float32 whatever the base dtype (peft upcasts them), so updates are not rounded to bf16.
    """
    from peft import get_peft_model

    targets = cfg.target_modules
    if not targets:
        raise ValueError("fed.target_modules is empty (load the config through AppConfig)")
    names = [n for n, r in ((SHARED, cfg.shared_rank), (PERSONAL, cfg.personal_rank)) if r]
    ranks = {
        SHARED: (cfg.shared_rank, cfg.shared_alpha),
        PERSONAL: (cfg.personal_rank, cfg.personal_alpha),
    }
    base_model = str(getattr(model.config, "_name_or_path", "") or "")
    peft_model = get_peft_model(
        model, _peft_config(*ranks[names[0]], targets), adapter_name=names[0]
    )
    for name in names[1:]:
        peft_model.add_adapter(name, _peft_config(*ranks[name], targets))
    # peft's LoraModel.set_adapter takes a list and activates all of them; PeftModel's does not.
    peft_model.base_model.set_adapter(names)
    slots = Slots(peft_model, cfg, pad_id, base_model)
    for param_name, param in peft_model.named_parameters():
        for name, table in ((SHARED, slots.shared), (PERSONAL, slots.personal)):
            key = saved_key(param_name, name)
            if key is not None:
                table[key] = param
    frozen = [k for k, p in {**slots.shared, **slots.personal}.items() if not p.requires_grad]
    if frozen:
        raise RuntimeError(f"adapter weights not trainable after set_adapter: {frozen[:3]}")
    if cfg.decoupling.gate != "none" and cfg.shared_rank and cfg.personal_rank:
        _install_gates(slots)
    log.info(
        "slots: shared r=%d, personal r=%d, gate=%s, %d adapted modules",
        cfg.shared_rank,
        cfg.personal_rank,
        cfg.decoupling.gate,
        len({_module_of(k) for k in {**slots.shared, **slots.personal}}),
    )
    return slots


def _install_gates(slots: Slots) -> None:
    """Gate logits + forward hooks scaling each lora_B output: (2-g) shared, g personal."""
    modules = sorted({_module_of(k) for k in slots.personal})
    device = slots.device
    if slots.cfg.decoupling.gate == "adapter":
        one = torch.nn.Parameter(torch.zeros(1, device=device))
        slots.gates[ADAPTER_GATE_KEY] = one
        logits = dict.fromkeys(modules, one)
    else:
        logits = {m: torch.nn.Parameter(torch.zeros(1, device=device)) for m in modules}
        slots.gates.update({f"{KEY_PREFIX}{m}{GATE_SUFFIX}": p for m, p in logits.items()})
    named = dict(slots.model.named_modules())
    for module in modules:
        layer = named[f"{KEY_PREFIX}{module}"]
        w = logits[module]
        # peft adds lora_B(lora_A(x)) * scaling to the base output: scaling lora_B's output
        # is scaling B, which is why export can fold the gate into B exactly.
        layer.lora_B[SHARED].register_forward_hook(
            lambda _m, _i, out, w=w: out * (2.0 - 2.0 * torch.sigmoid(w)).to(out.dtype)
        )
        layer.lora_B[PERSONAL].register_forward_hook(
            lambda _m, _i, out, w=w: out * (2.0 * torch.sigmoid(w)).to(out.dtype)
        )


# --------------------------------------------------------------------------- initialization


def _lora_init(table: Mapping[str, torch.nn.Parameter], generator: torch.Generator) -> State:
    """peft's default LoRA init, drawn from ``generator``: A Kaiming-uniform, B zero."""
    state: State = {}
    for key in sorted(table):
        shape = tuple(table[key].shape)
        if key.endswith(".lora_B.weight"):
            state[key] = torch.zeros(shape)
        else:
            # kaiming_uniform_(a=sqrt(5)) on (r, in): bound = 1 / sqrt(in)
            bound = 1.0 / math.sqrt(shape[1])
            state[key] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    return state


def init_shared_state(slots: Slots, seed: int) -> State:
    """The round-0 shared adapter, a function of ``seed`` only (B = 0: the base's output)."""
    return _lora_init(slots.shared, torch.Generator().manual_seed(derive_seed(seed, SHARED)))


def init_personal_state(slots: Slots, seed: int, user_id: str) -> State:
    """A user's first personal adapter (B = 0) and neutral gates (g = 1), from (seed, user)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, PERSONAL, user_id))
    state = _lora_init(slots.personal, gen)
    state.update({k: torch.zeros(tuple(p.shape)) for k, p in slots.gates.items()})
    return state


# --------------------------------------------------------------------------- client


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


def client_update(
    slots: Slots,
    user_id: str,
    examples: Sequence[Example],
    shared_state: Mapping[str, torch.Tensor],
    personal_state: State,
    round: int,
) -> ClientResult:
    """Train the slots locally on one user's examples; return the shared delta to upload.

    Starts from the downloaded ``shared_state`` and the user's own ``personal_state``. Each
    phase takes ``local_steps`` AdamW steps (fresh optimizer: no optimizer state crosses
    rounds) on batches drawn by a generator seeded from (seed, round, user_id). With
    ``decoupling.schedule="sequential"`` the shared part trains first with the personal part
    off (the very update plain FedAvg makes), then the personal part on top of it (with its
    decay and gates); "joint" trains both in the same steps. Holdout examples are never
    trained on. Raises :class:`ClientTimeout` when
    ``cfg.client_timeout_s`` runs out (checked between steps) and ValueError without examples.
    """
    cfg = slots.cfg
    if not examples:
        raise ValueError(f"client {user_id}: no training examples")
    start = time.perf_counter()
    seed = derive_seed(cfg.seed, "client", round, user_id)
    torch.manual_seed(seed)  # anything stochastic left in the model draws from here
    gen = torch.Generator().manual_seed(seed)
    dec = cfg.decoupling
    trained = [e for e in examples if not e.holdout]
    if not trained:
        raise ValueError(f"client {user_id}: every example is held out")

    def steps(groups: list[dict], data: Sequence[Example], prox: State | None) -> list[float]:
        return _local_steps(slots, groups, data, gen, prox, start, user_id)

    personal_b = [p for k, p in slots.personal.items() if "lora_B" in k]
    personal_a = [p for k, p in slots.personal.items() if "lora_B" not in k]
    personal_groups = [
        {"params": personal_a, "lr": cfg.learning_rate},
        # Decoupled decay on B only (B = 0 is "no personal update"; A is a projection). As a
        # loss term, Adam would rescale it away; AdamW's decay shrinks by lr * decay per step.
        {"params": personal_b, "lr": cfg.learning_rate, "weight_decay": dec.personal_decay},
        {"params": list(slots.gates.values()), "lr": dec.gate_learning_rate},
    ]
    shared_groups = [{"params": list(slots.shared.values()), "lr": cfg.learning_rate}]
    if dec.schedule == "joint" and slots.shared and slots.personal:
        slots.load(shared_state, personal_state)
        downloaded = slots.shared_state()
        losses = steps(shared_groups + personal_groups, trained, downloaded)
    else:
        losses = []
        # A caller may have frozen the shared part (a local refresh uploads nothing).
        trainable = {k: p.requires_grad for k, p in slots.shared.items()}
        if any(trainable.values()):
            # The personal part off (B = 0, gates neutral): exactly plain FedAvg's update.
            slots.load(shared_state, scale_personal(personal_state, 0.0))
            downloaded = slots.shared_state()
            losses = steps(shared_groups, trained, downloaded)
        if slots.personal:
            slots.load(slots.shared_state() if losses else shared_state, personal_state)
            for param in slots.shared.values():  # frozen: the residual fits on top of it
                param.requires_grad_(False)
            try:
                personal_losses = steps(personal_groups, trained, None)
            finally:
                for key, param in slots.shared.items():
                    param.requires_grad_(trainable[key])
            losses = losses or personal_losses
    delta = {
        k: p.detach().float().cpu() - shared_state[k].float().cpu() for k, p in slots.shared.items()
    }
    return ClientResult(
        user_id=user_id,
        shared_delta=delta,
        n_examples=sum(e.targets for e in trained),
        personal_state=slots.personal_state(),
        loss=sum(losses) / len(losses),
        seconds=time.perf_counter() - start,
    )


def _local_steps(
    slots: Slots,
    groups: list[dict],
    examples: Sequence[Example],
    gen: torch.Generator,
    prox_anchor: State | None,
    start: float,
    user_id: str,
) -> list[float]:
    """``local_steps`` AdamW steps on ``groups`` over batches of ``examples``; the losses.

    ``prox_anchor`` (the downloaded shared state) adds FedProx's ``mu/2 ||shared - anchor||^2``.
    """
    cfg = slots.cfg
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    slots.model.train()
    device = slots.device
    mu = cfg.decoupling.prox_mu
    order: list[int] = []
    losses: list[float] = []
    for _ in range(cfg.local_steps):
        if len(order) < cfg.local_batch_size:  # reshuffle when an epoch runs out
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch_ids, order = order[: cfg.local_batch_size], order[cfg.local_batch_size :]
        batch = collate([examples[i] for i in batch_ids], slots.pad_id)
        loss = slots.model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
        objective = loss
        if mu and prox_anchor is not None:
            drift = sum(
                ((p - prox_anchor[k].to(p.device)) ** 2).sum() for k, p in slots.shared.items()
            )
            objective = objective + mu / 2 * drift
        objective.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if time.perf_counter() - start > cfg.client_timeout_s:
            raise ClientTimeout(
                f"client {user_id}: over the {cfg.client_timeout_s:g} s budget "
                f"after {len(losses)} local steps"
            )
    return losses


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerOutcome:
    """One aggregation: the new shared state and the verdict on every client update."""

    shared_state: State
    accepted: list[str]
    rejected: dict[str, str]
    """Client id -> why its update was not averaged."""
    norms: dict[str, float]
    """L2 norm of each accepted update (before DP clipping)."""
    noised: bool
    """True when a DP-noised aggregate was applied (one accountant step)."""


def server_update(
    shared_state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    cfg: FedConfig,
    generator: torch.Generator | None = None,
) -> ServerOutcome:
    """Validate the clients' shared deltas, aggregate the accepted ones, apply the result.

    Malformed, non-finite or (without DP) oversized deltas are rejected and logged, never
    averaged. Accepted ones are summed in user order (reproducible bits) with
    ``cfg.aggregation``, or with DP on by ``privacy.private_mean`` (clip, uniform mean,
    noise from ``generator``). With nothing accepted the shared state is unchanged.
    """
    state = {k: v.detach().clone() for k, v in shared_state.items()}
    if not state:  # personal-only ablation: nothing is federated
        return ServerOutcome(state, [], {}, {}, noised=False)
    reference = {k: tuple(v.shape) for k, v in state.items()}
    # With DP, clipping bounds every client; a data-dependent rejection would change n.
    max_norm = None if cfg.dp.enabled else cfg.max_update_norm
    by_user = {u.user_id: (u.shared_delta, u.n_examples) for u in updates}
    accepted, rejected = filter_updates(by_user, reference, max_norm)
    ids = sorted(accepted, key=user_sort_key)
    if not ids:
        log.warning("no acceptable update this round: the shared adapter is unchanged")
        return ServerOutcome(state, [], rejected, {}, noised=False)
    deltas = [{k: accepted[u][0][k].float() for k in reference} for u in ids]
    norms = {u: update_norm(d) for u, d in zip(ids, deltas, strict=True)}
    if cfg.dp.enabled:
        if generator is None:
            raise ValueError("dp.enabled needs a noise generator (privacy.secure_generator)")
        mean, _ = private_mean(deltas, cfg.dp.clip_norm, cfg.dp.noise_multiplier, generator)
    else:
        counts = [float(accepted[u][1]) for u in ids]
        # In float64 and added in float64: the exact mean is rounded once, as the Flower
        # server rounds its float64 mean of weights (numerically the same adapter).
        wide = [{k: d[k].double() for k in d} for d in deltas]
        mean = aggregate(cfg.aggregation, wide, counts, cfg.trim_ratio)
    for key in state:
        state[key] = (state[key].double() + mean[key].double()).to(state[key].dtype)
    return ServerOutcome(state, ids, rejected, norms, noised=cfg.dp.enabled)


# --------------------------------------------------------------------------- export


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
    modules = {_module_of(k) for k in personal_state if k.endswith(".lora_A.weight")}
    return sum(gate_values(personal_state, m)[1] for m in modules) / len(modules)


def scale_personal(personal_state: Mapping[str, torch.Tensor], scale: float) -> State:
    """The personal state whose adapter sits ``scale`` of the way from shared-only to as trained.

    A module computes ``s * shared + p * personal`` with ``(s, p) = (2 - g, g)``; the result
    computes ``(1 + scale * (s - 1), scale * p)``: scale 0 is exactly the shared adapter, 1 the
    state unchanged. It rewrites the gate logit to ``g' = 1 - scale * (1 - g)`` and multiplies
    the personal B by ``scale * g / g'``, so slots and export read it like any other state.
    """
    if scale == 1.0:
        return dict(personal_state)
    out = dict(personal_state)
    factors: dict[str, float] = {}
    for key in personal_state:
        if key.endswith(".lora_A.weight"):
            module = _module_of(key)
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
            out[key] = (tensor.double() * factors[_module_of(key)]).float()
    return out


def _weights(
    state: Mapping[str, torch.Tensor],
    rank: int,
    alpha: float,
    cfg: FedConfig,
    base_model: str,
    b_scale: Mapping[str, float] | None = None,
) -> LoraWeights:
    """LoraWeights of the LoRA keys in ``state``; ``b_scale[module]`` multiplies that B."""
    out: State = {}
    for key, tensor in state.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            continue  # gate logits are folded, not exported
        scale = (b_scale or {}).get(_module_of(key), 1.0) if key.endswith("lora_B.weight") else 1.0
        out[key] = (tensor.double() * scale).float() if scale != 1.0 else tensor.float().clone()
    return LoraWeights(
        out, rank, float(alpha), tuple(sorted(set(cfg.target_modules or []))), base_model
    )


def shared_weights(
    shared_state: Mapping[str, torch.Tensor], cfg: FedConfig, base_model: str
) -> LoraWeights:
    """The shared adapter as a plain PEFT LoRA (what cold-start users are served)."""
    return _weights(shared_state, cfg.shared_rank, cfg.shared_alpha, cfg, base_model)


def user_weights(
    shared_state: Mapping[str, torch.Tensor],
    personal_state: Mapping[str, torch.Tensor],
    cfg: FedConfig,
    base_model: str,
) -> LoraWeights:
    """One user's adapter: shared and personal stacked into ONE LoRA of rank r_s + r_p.

    The gates are folded into the B matrices first, so the result computes exactly what
    the two gated slots computed in training. With ``shared_rank == 0`` it is the
    (gate-free) personal adapter alone; with ``personal_rank == 0`` there is no user adapter
    (ValueError): such users are served the shared one.
    """
    if not cfg.personal_rank:
        raise ValueError("personal_rank is 0: every user is served the shared adapter")
    modules = sorted({_module_of(k) for k in personal_state if k.endswith(".lora_A.weight")})
    weights = {m: gate_values(personal_state, m) for m in modules}
    personal = _weights(
        personal_state,
        cfg.personal_rank,
        cfg.personal_alpha,
        cfg,
        base_model,
        {m: w[1] for m, w in weights.items()},
    )
    if not cfg.shared_rank:
        return personal
    shared = _weights(
        shared_state,
        cfg.shared_rank,
        cfg.shared_alpha,
        cfg,
        base_model,
        {m: w[0] for m, w in weights.items()},
    )
    return stack(shared, personal)


def adapter_for(store: AdapterStore, user_id: str) -> AdapterRef | None:
    """The adapter to serve ``user_id``: their own current version, else the shared one.

    Cold-start users (never in a federated cohort) get the shared adapter; None before any
    federated training was published.
    """
    ref = store.current(user_id)
    return ref if ref is not None else store.shared()


# --------------------------------------------------------------------------- client side
# What every runner's client does the same way (the accelerate processes and the Flower
# ClientApp): pick its examples, keep its personal state in its own folder, validate with
# its own adapter, publish its stacked adapter. The personal state never leaves this folder.

CLIENTS_DIR = "clients"
"""Sub-folder of a client's folder holding ``<user>/personal-rXXXX.safetensors``."""
VAL_K = 10
"""Cut-off of the validation HR/NDCG."""
_PERSONAL_RE = re.compile(r"^personal-r(\d{4,})\.safetensors$")


def eligible_users(split: Split) -> list[str]:
    """Users who can be clients: a validation item and at least two training items."""
    users = [u for u in split.valid if len(split.train[u]) >= 2]
    return sorted(users, key=user_sort_key)


def federated_cohort(split: Split, cfg: FedConfig) -> list[str]:
    """The run's cohort: a ``cfg.seed`` sample of ``cfg.n_users`` eligible users, in user order."""
    return sample_users(eligible_users(split), cfg.n_users, cfg.seed)


def client_examples(
    split: Split, catalog: Catalog, prompts: PromptBuilder, cfg: FedConfig, user_id: str
) -> list[Example]:
    """One client's training examples: the last ``targets_per_user`` positions of its own
    training history. The last ``decoupling.holdout_targets`` of them form one sequence
    marked ``holdout``: never trained on, it is the client's own validation data (with the
    validation item it picks the personal scale at export). The same for every variant, so
    that shared-only and ours train their shared parts on the same data."""
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


def holdout_examples(examples: Sequence[Example]) -> list[Example]:
    """The client's held-out examples (never trained on; they pick the personal scale)."""
    return [e for e in examples if e.holdout]


def personal_path(client_dir: Path, user_id: str, round: int) -> Path:
    """Where ``user_id`` keeps its personal state after ``round``."""
    return Path(client_dir) / CLIENTS_DIR / user_id / f"personal-r{round:04d}.safetensors"


def personal_versions(client_dir: Path, user_id: str) -> list[int]:
    """Rounds for which ``user_id`` holds a personal state, ascending."""
    folder = Path(client_dir) / CLIENTS_DIR / user_id
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _PERSONAL_RE.fullmatch(p.name)))


def load_personal(client_dir: Path, user_id: str, before: int) -> State | None:
    """The user's latest personal state from a round < ``before`` (None: never trained).

    Versions >= ``before`` belong to a round being (re)done and are ignored, which is what
    makes a resumed round read the same state the uninterrupted run read.
    """
    older = [v for v in personal_versions(client_dir, user_id) if v < before]
    return load_file(personal_path(client_dir, user_id, older[-1])) if older else None


def save_personal(client_dir: Path, user_id: str, round: int, state: State) -> None:
    """Write the user's personal state after ``round`` (atomically: whole or absent)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_atomic(personal_path(client_dir, user_id, round), lambda t: save_file(tensors, t))


ClientFn = Callable[[Slots, str, Sequence[Example], State, State, int], ClientResult]
"""The signature of :func:`client_update` (a test may wrap it to inject failures)."""


def run_client(
    slots: Slots,
    client_dir: Path,
    user_id: str,
    examples: Sequence[Example],
    shared_state: State,
    round: int,
    client_fn: ClientFn = client_update,
) -> ClientResult:
    """One client's round: its latest personal state, local training, the new state saved.

    The caller uploads ``result.upload()`` and nothing else. Raises what ``client_fn``
    raises; the new personal version is then absent, so a retry starts from the same state.
    """
    # A version of this round left by a crashed attempt must not outlive a failure now.
    personal_path(client_dir, user_id, round).unlink(missing_ok=True)
    personal = load_personal(client_dir, user_id, before=round)
    if personal is None:
        personal = init_personal_state(slots, slots.cfg.seed, user_id)
    result = client_fn(slots, user_id, examples, shared_state, personal, round)
    save_personal(client_dir, user_id, round, result.personal_state)  # stays on the client
    return result


def validate_user(
    slots: Slots,
    recommender: Recommender,
    split: Split,
    client_dir: Path,
    user_id: str,
    shared_state: State,
    round: int,
) -> tuple[list[str], str, float]:
    """(top-k item ids, validation item, its answer NLL) with the user's own adapter.

    The adapter is ``shared_state`` plus the user's personal state after ``round`` (the
    shared part alone for a user never trained). The NLL of the validation title is a
    cheap, continuous companion to HR@10: on a small cohort a hit rate moves in steps of
    1/users, the loss shows smaller differences.
    """
    slots.model.eval()
    personal = load_personal(client_dir, user_id, before=round + 1)
    if personal is None:
        personal = init_personal_state(slots, slots.cfg.seed, user_id)
    slots.load(shared_state, personal)
    target = split.valid[user_id]
    ranked = recommender.recommend(split.history_for_valid(user_id), k=VAL_K)
    return [x.item_id for x in ranked], target, validation_loss(slots, recommender, split, user_id)


def validation_loss(slots: Slots, recommender: Recommender, split: Split, user_id: str) -> float:
    """Mean answer-token NLL of the user's validation item with what the slots hold now."""
    return _answer_loss(slots, [_validation_example(recommender, split, user_id)])


def _validation_example(recommender: Recommender, split: Split, user_id: str) -> Example:
    prompts = recommender.prompts
    history = recommender.history_titles(split.history_for_valid(user_id))
    prompt = prompts.recommend_prompt_ids(history)
    answer = prompts.target_ids(recommender.catalog.display(split.valid[user_id]))
    return Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


def _answer_loss(slots: Slots, examples: Sequence[Example]) -> float:
    """Mean answer-token NLL over ``examples`` (one at a time: no padding)."""
    total, tokens = 0.0, 0
    slots.model.eval()
    with torch.inference_mode():
        for example in examples:
            inputs = {k: v.to(slots.device) for k, v in collate([example], slots.pad_id).items()}
            n = sum(label != IGNORE_INDEX for label in example.labels[1:])
            total += float(slots.model(**inputs, use_cache=False).loss) * n
            tokens += n
    return total / tokens


def pick_personal_scale(
    slots: Slots,
    recommender: Recommender,
    split: Split,
    user_id: str,
    shared_state: State,
    personal_state: State,
) -> tuple[float, dict[float, float]]:
    """Measure and pick: the ``decoupling.personal_scales`` value with the lowest loss on
    the items the personal part never trained on (the holdout targets and the validation
    item), ties to the smaller (the shared side); and every value's loss.

    It runs where the user's data is (the client), so a personal part that memorized rather
    than generalized is turned down for that user only.
    """
    cfg = slots.cfg
    examples = client_examples(split, recommender.catalog, recommender.prompts, cfg, user_id)
    scored = holdout_examples(examples) + [_validation_example(recommender, split, user_id)]
    losses = {}
    for scale in sorted(set(cfg.decoupling.personal_scales)):
        slots.load(shared_state, scale_personal(personal_state, scale))
        losses[scale] = _answer_loss(slots, scored)
    return min(losses, key=lambda s: (losses[s], s)), losses


def open_store(cfg: FedConfig, base_path: str, store_dir: Path | None = None) -> AdapterStore:
    """The adapter store the run publishes to, checking adapters against ``base_path``."""
    return AdapterStore(
        store_dir if store_dir is not None else cfg.store_dir,
        max_rank=max(DEFAULT_MAX_RANK, cfg.shared_rank + cfg.personal_rank),
        module_shapes=module_shapes_for(base_path),
    )


@dataclass(frozen=True)
class Published:
    """A user's adapter as published: its store entry, mean gate g, and picked scale."""

    ref: AdapterRef
    personal_weight: float | None
    personal_scale: float


def publish_user(
    store: AdapterStore,
    client_dir: Path,
    user_id: str,
    shared_state: State,
    slots: Slots,
    base_fingerprint: str,
    round: int,
    metrics: Mapping[str, float],
    validation: tuple[Recommender, Split] | None = None,
) -> Published | None:
    """Publish the user's stacked adapter after ``round``; None if the user never trained.

    With ``validation`` (and both ranks set, and more than one ``personal_scales``) the
    personal part is first scaled by :func:`pick_personal_scale`. Never-trained users are
    cold start: they are served the shared adapter.
    """
    personal = load_personal(client_dir, user_id, before=round + 1)
    if personal is None:
        return None
    cfg = slots.cfg
    scale, metrics = 1.0, dict(metrics)
    if (
        validation is not None
        and cfg.shared_rank
        and cfg.personal_rank
        and len(set(cfg.decoupling.personal_scales)) > 1
        and user_id in validation[1].valid
    ):
        scale, losses = pick_personal_scale(slots, *validation, user_id, shared_state, personal)
        personal = scale_personal(personal, scale)
        metrics.update(personal_scale=scale, val_loss_picked=losses[scale])
    weights = user_weights(shared_state, personal, cfg, slots.base_model)
    ref = store.publish(
        user_id, weights, base_fingerprint=base_fingerprint, round=round, metrics=metrics
    )
    return Published(ref, personal_weight_mean(personal), scale)


def prune_personal(client_dir: Path, user_id: str, before: int) -> None:
    """Delete the user's personal versions older than round ``before`` (no longer read)."""
    for v in personal_versions(client_dir, user_id):
        if v < before:
            personal_path(client_dir, user_id, v).unlink(missing_ok=True)
