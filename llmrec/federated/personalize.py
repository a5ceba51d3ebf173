"""Local personal-adapter refresh: a user's current history -> a new adapter version.

Between federated rounds a user's taste moves (chat feedback, history edits). A refresh
is one more client update run locally for that user alone (``llmrec.federated``): the
shared adapter as last downloaded from the store is loaded and FROZEN (nothing is
uploaded, so nothing may drift from what everybody shares), the user's personal adapter
continues from its client-side state and trains on their current history, and the
stacked adapter is published as the user's next version. Serving resolves the current
version per request, so the next request gets it without a restart. For the item-token head
the refresh trains over the run's served base, whose item rows are the shared ones (frozen
too), on every position of the history.

Client-side personal state lives where federated training keeps it,
``<fed.output_dir>/clients/<user_id>/``: training writes ``personal-rNNNN.safetensors``
per round, a refresh writes ``personal-local.safetensors``; the newer file is the state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from llmrec.adapters import validate_user_id
from llmrec.atomic import write_atomic
from llmrec.config import AppConfig
from llmrec.data import Catalog
from llmrec.federated.client import client_update, item_examples
from llmrec.federated.client_state import personal_path, personal_versions
from llmrec.federated.dual_lora import ITEM_ROWS_KEY, State, build_dual_lora, init_personal_state
from llmrec.federated.export import open_store, user_weights
from llmrec.federated.layout import CLIENTS_DIR, exported_base
from llmrec.finetune import next_item_examples
from llmrec.model import fingerprint_model_dir, load_model, resolve_model_path
from llmrec.model.item_vocab import ItemVocab
from llmrec.prompts import PromptBuilder
from llmrec.pseudonyms import pseudonym, served_name

log = logging.getLogger(__name__)

LOCAL_STATE = "personal-local.safetensors"
"""A refresh's personal state, beside training's ``personal-rNNNN.safetensors``."""


class RefreshError(ValueError):
    """A refresh that cannot run (no shared adapter, too short a history, ...)."""


def client_dir(output_dir: Path, user_id: str) -> Path:
    """Where ``user_id``'s client-side personal state lives."""
    return Path(output_dir) / CLIENTS_DIR / validate_user_id(user_id)


def latest_personal_state(output_dir: Path, user_id: str) -> Path | None:
    """The newer of the user's last federated round state and last refresh state."""
    rounds = personal_versions(output_dir, user_id)
    files = [personal_path(output_dir, user_id, rounds[-1])] if rounds else []
    local = client_dir(output_dir, user_id) / LOCAL_STATE
    files += [local] if local.is_file() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


@dataclass(frozen=True)
class RefreshResult:
    """One published refresh."""

    user_id: str
    adapter_name: str
    """The new served name, ``<user_id>@v<version>``."""
    loss: float
    """Mean local training loss."""
    n_examples: int
    """Next-item targets trained on."""
    seconds: float


class Personalizer:
    """Loads the base model once and refreshes users one after another."""

    def __init__(self, cfg: AppConfig, catalog: Catalog):
        fed = cfg.fed
        if not fed.keeps_personal:
            raise RefreshError("fed.personal_rank is 0: there is no personal adapter to refresh")
        self.cfg = cfg
        self.catalog = catalog
        base_path = self._base_path()
        model, tokenizer = load_model(
            base_path, quantization=cfg.model.quantization, dtype=cfg.model.dtype
        )
        vocab = ItemVocab.read(base_path) if fed.head == "items" else None
        self.dual = build_dual_lora(model, fed, tokenizer.pad_token_id, vocab)
        for param in self.dual.shared.values():
            param.requires_grad_(False)  # frozen: a local refresh uploads nothing
        self.prompts = PromptBuilder.from_config(tokenizer, cfg.prompts)
        self.fingerprint = fingerprint_model_dir(base_path)
        self.store = open_store(fed, base_path, base_fingerprint=self.fingerprint)
        self.shared = self._shared_state()

    def _base_path(self) -> str:
        """The base the store's adapters are for: the configured one (titles head), or the
        served base the finished item-token run exported (its federated item rows)."""
        fed = self.cfg.fed
        if fed.head == "titles":
            return resolve_model_path(self.cfg.model.name_or_path, self.cfg.model.cache_dir)
        base = exported_base(fed.output_dir)
        if not base:
            raise RefreshError(f"no finished item-token run in {fed.output_dir}: train it first")
        return str(base)

    def _shared_state(self) -> State:
        fed = self.cfg.fed
        if not fed.shared_rank:
            return {}
        rows = {}
        if self.dual.initial_rows is not None:  # the served base's rows are the shared ones
            rows = {ITEM_ROWS_KEY: self.dual.initial_rows}
        ref = self.store.shared()
        if ref is None:
            raise RefreshError(
                f"no shared adapter in {self.store.root}: run federated training first"
            )
        if ref.manifest.rank != fed.shared_rank:
            raise RefreshError(
                f"{ref.adapter_name} has rank {ref.manifest.rank}, the config's "
                f"fed.shared_rank is {fed.shared_rank}: use the config it was trained with"
            )
        return {**self.store.load(ref).state, **rows}

    def _personal_state(self, user_id: str) -> State:
        path = latest_personal_state(self.cfg.fed.output_dir, user_id)
        if path is None:  # never a federated client: start as training would
            return init_personal_state(self.dual, self.cfg.fed.seed, user_id)
        state = load_file(path)
        expected = {**self.dual.personal, **self.dual.gates}
        if set(state) != set(expected) or any(
            tuple(state[k].shape) != tuple(p.shape) for k, p in expected.items()
        ):
            raise RefreshError(f"{path} does not fit the config's personal adapter")
        return state

    def refresh(self, user_id: str, history: Sequence[str]) -> RefreshResult:
        """Train ``user_id``'s personal adapter on ``history`` and publish the stacked
        adapter as their next version."""
        start = time.perf_counter()
        fed = self.cfg.fed
        known = [i for i in history if i in self.catalog]
        if self.dual.vocab is not None:
            vocab = self.dual.vocab
            examples = item_examples(known, self.catalog, self.prompts, fed, vocab)
        else:
            examples = next_item_examples(
                {user_id: known},
                self.catalog,
                self.prompts,
                per_user=fed.targets_per_user,
                per_example=fed.targets_per_example,
            )
        if len(known) < 2 or not examples:
            raise RefreshError(f"{user_id}: a refresh needs at least 2 items in the history")
        personal = self._personal_state(user_id)
        current = self.store.current(user_id)
        # The round number only seeds the local batches: one more than the last version.
        step = (current.version if current is not None else 0) + 1
        result = client_update(self.dual, user_id, examples, self.shared, personal, step)
        tensors = {k: v.contiguous() for k, v in result.personal_state.items()}
        state_path = client_dir(fed.output_dir, user_id) / LOCAL_STATE
        write_atomic(state_path, lambda tmp: save_file(tensors, tmp))
        weights = user_weights(self.shared, result.personal_state, fed, self.dual.base_model)
        ref = self.store.publish(
            user_id,
            weights,
            base_fingerprint=self.fingerprint,
            metrics={"refresh_loss": result.loss, "refresh_examples": float(result.n_examples)},
        )
        seconds = time.perf_counter() - start
        log.info(
            "refreshed %s -> %s (loss %.4f, %.1f s)",
            pseudonym(user_id),
            served_name(ref.adapter_name),
            result.loss,
            seconds,
        )
        return RefreshResult(user_id, ref.adapter_name, result.loss, result.n_examples, seconds)
