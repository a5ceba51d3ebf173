"""The dual LoRA: a frozen base with two trainable LoRA adapters, "shared" and "personal".

Every user owns a LoRA adapter made of two parts on the same modules (docs/design.md, "Flow
of data"): a SHARED part of rank ``r_s`` that the server averages across clients, and a
PERSONAL part of rank ``r_p`` that never leaves the client and is never averaged. One peft
model, :class:`DualLora`, holds both as two named adapters active together in the forward
(peft sums their updates). Each client copies its tensors into them
(:meth:`DualLora.load`), so serving many simulated clients never reloads the model.

The split follows FedSA-LoRA (Guo et al., arXiv 2410.01463), which shows that in federated
LoRA part of the low-rank factors carries what clients share and the rest what is
client-specific, and shares only the former. We keep the split at the adapter level: a whole
personal adapter stays local, so the server never sees any client-specific factor.

The gate (``fed.decoupling.gate``) follows FedPA (Zhang et al., arXiv 2405.04840), which pairs
a user-level adapter with a shared one and learns an *adaptive gate* that balances the two per
user: a learned per-user scalar ``g = 2 * sigmoid(w)`` in (0, 2), one per user ("adapter") or
per user and module ("module"); the module computes ``(2 - g) * shared + g * personal``.
``w = 0`` starts every user at the plain sum, and a user whose taste departs from the crowd
can turn the shared part down and the personal part up. :mod:`llmrec.federated.gates` reads
and rescales gates in a saved personal state.

Key names: tensors are keyed as in a saved PEFT adapter
(``base_model.model.<module>.lora_A.weight``); :func:`saved_key` is the one bridge from peft's
in-memory names.

The item-token head (``fed.head="items"``, over the extended base of
:mod:`llmrec.model.item_vocab`): the item rows, each item's input embedding and output-head
row at once, are one more shared tensor (:data:`ITEM_ROWS_KEY`), trained by every client and
averaged with the shared adapter, so what users share about items is federated and nothing
of the base but those rows changes. The loss is the cross-entropy of the next item over the
item tokens at every labelled position (:meth:`DualLora.loss`). With ``shared_rank=0`` (the
personal-only ablation) nothing is federated and the rows keep their title initialisation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from llmrec.adapters import KEY_PREFIX
from llmrec.config import FedConfig
from llmrec.federated.seeds import derive_seed
from llmrec.finetune import IGNORE_INDEX
from llmrec.foundation import ItemLM
from llmrec.model.item_vocab import ItemVocab

log = logging.getLogger(__name__)

SHARED = "shared"
PERSONAL = "personal"
"""peft adapter names of the two parts (and the words used everywhere for them)."""
GATE_SUFFIX = ".gate"
"""Personal-state key of a module's gate logit: ``base_model.model.<module>.gate``."""
ADAPTER_GATE_KEY = "gate"
"""Personal-state key of the single gate logit in ``gate="adapter"`` mode."""

ITEM_ROWS_KEY = "item_rows"
"""Shared-state key of the item-token rows (item-token head only): (n_items, hidden)."""

State = dict[str, torch.Tensor]
"""Tensors keyed as in a saved PEFT adapter (``base_model.model.<module>.lora_A.weight``)."""


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


def module_of(key: str) -> str:
    """Module path of a saved LoRA key (``base_model.model.<m>.lora_A.weight`` -> ``<m>``)."""
    return key.removeprefix(KEY_PREFIX).rsplit(".", 2)[0]


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state's tensors (what crosses the network when it is sent)."""
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclass
class DualLora:
    """The frozen base with a "shared" and a "personal" LoRA adapter, both active.

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
    items: ItemLM | None = None
    """The item-token head (its rows are ``shared[ITEM_ROWS_KEY]``); None for titles."""
    initial_rows: torch.Tensor | None = None
    """The extended base's item rows, the round-0 value of ``shared[ITEM_ROWS_KEY]``."""

    @property
    def device(self) -> torch.device:
        return next(iter({**self.shared, **self.personal}.values())).device

    @property
    def vocab(self) -> ItemVocab | None:
        """The item vocabulary of the item-token head (None for the titles head)."""
        return self.items.vocab if self.items is not None else None

    def load(self, shared_state: Mapping[str, torch.Tensor], personal_state: State) -> None:
        """Copy a client's downloaded shared state and its own personal state into the model
        (item rows included, into the embedding too: ranking reads them there)."""
        with torch.no_grad():
            for key, param in self.shared.items():
                param.copy_(shared_state[key])
            for key, param in {**self.personal, **self.gates}.items():
                param.copy_(personal_state[key])
        if self.items is not None:
            self.items.write_rows()

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean training loss of a collated batch (``llmrec.finetune.collate``).

        Titles head: the causal LM loss of the labelled tokens. Item-token head: ``labels``
        holds, per position, the catalog index of the item to predict there; the loss is the
        cross-entropy over the item tokens.
        """
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.items is None:
            return self.model(**batch, use_cache=False).loss
        return self.items.loss(batch)

    def scored_positions(self, labels: Sequence[int]) -> int:
        """How many predictions :meth:`loss` averages over in one example's ``labels``."""
        # The LM loss shifts: label t is predicted at t - 1, and label 0 never is.
        scored = labels if self.items is not None else labels[1:]
        return sum(label != IGNORE_INDEX for label in scored)

    def shared_state(self) -> State:
        """A float32 CPU copy of the shared adapter."""
        return {k: p.detach().float().cpu().clone() for k, p in self.shared.items()}

    def personal_state(self) -> State:
        """A float32 CPU copy of the personal adapter and the gate logits."""
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


def build_dual_lora(
    model: torch.nn.Module, cfg: FedConfig, pad_id: int, vocab: ItemVocab | None = None
) -> DualLora:
    """Wrap the frozen base in peft with the two LoRA adapters (and gate hooks), both trainable.

    ``cfg.target_modules`` must be resolved (``AppConfig`` does it). Adapter weights are
    float32 whatever the base dtype (peft upcasts them), so updates are not rounded to bf16.
    With ``cfg.head="items"``, ``model`` is an extended base and ``vocab`` its item vocabulary:
    the item rows become a shared float32 parameter.
    """
    from peft import get_peft_model

    targets = cfg.target_modules
    if not targets:
        raise ValueError("fed.target_modules is empty (load the config through AppConfig)")
    if (cfg.head == "items") != (vocab is not None):
        need = "an" if vocab is None else "no"
        raise ValueError(f"fed.head={cfg.head!r} needs {need} item vocabulary")
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
    dual = DualLora(peft_model, cfg, pad_id, base_model)
    for param_name, param in peft_model.named_parameters():
        for name, table in ((SHARED, dual.shared), (PERSONAL, dual.personal)):
            key = saved_key(param_name, name)
            if key is not None:
                table[key] = param
    if cfg.share == "lora_a":  # FedSA-LoRA: the shared adapter's B is each client's own
        for key in [k for k in dual.shared if k.endswith(".lora_B.weight")]:
            dual.personal[key] = dual.shared.pop(key)
    if vocab is not None:
        dual.items = ItemLM(peft_model, vocab)
        dual.initial_rows = dual.items.item_rows.detach().cpu().clone()
        if cfg.shared_rank:
            dual.shared[ITEM_ROWS_KEY] = dual.items.item_rows
        else:
            dual.items.item_rows.requires_grad_(False)
    frozen = [k for k, p in {**dual.shared, **dual.personal}.items() if not p.requires_grad]
    if frozen:
        raise RuntimeError(f"adapter weights not trainable after set_adapter: {frozen[:3]}")
    if cfg.decoupling.gate != "none" and cfg.shared_rank and cfg.personal_rank:
        _install_gates(dual)
    log.info(
        "dual LoRA: shared r=%d, personal r=%d, share=%s, gate=%s, %d adapted modules",
        cfg.shared_rank,
        cfg.personal_rank,
        cfg.share,
        cfg.decoupling.gate,
        len({module_of(k) for k in {**dual.shared, **dual.personal} if k != ITEM_ROWS_KEY}),
    )
    return dual


def _install_gates(dual: DualLora) -> None:
    """Gate logits + forward hooks scaling each lora_B output: (2-g) shared, g personal."""
    modules = sorted({module_of(k) for k in dual.personal})
    device = dual.device
    if dual.cfg.decoupling.gate == "adapter":
        one = torch.nn.Parameter(torch.zeros(1, device=device))
        dual.gates[ADAPTER_GATE_KEY] = one
        logits = dict.fromkeys(modules, one)
    else:
        logits = {m: torch.nn.Parameter(torch.zeros(1, device=device)) for m in modules}
        dual.gates.update({f"{KEY_PREFIX}{m}{GATE_SUFFIX}": p for m, p in logits.items()})
    named = dict(dual.model.named_modules())
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


def init_shared_state(dual: DualLora, seed: int) -> State:
    """The round-0 shared adapter, a function of ``seed`` only (B = 0: the base's output),
    and the extended base's item rows for the item-token head."""
    lora = {k: p for k, p in dual.shared.items() if k != ITEM_ROWS_KEY}
    state = _lora_init(lora, torch.Generator().manual_seed(derive_seed(seed, SHARED)))
    if ITEM_ROWS_KEY in dual.shared:
        assert dual.initial_rows is not None
        state[ITEM_ROWS_KEY] = dual.initial_rows.clone()
    return state


def init_personal_state(dual: DualLora, seed: int, user_id: str) -> State:
    """A user's first personal adapter (B = 0) and neutral gates (g = 1), from (seed, user)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, PERSONAL, user_id))
    state = _lora_init(dual.personal, gen)
    state.update({k: torch.zeros(tuple(p.shape)) for k, p in dual.gates.items()})
    return state
