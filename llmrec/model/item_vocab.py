"""The recommendation foundation model: the base LLM with one vocabulary token per catalog item.

Item ``catalog.index(i)`` is token ``first_token_id + catalog.index(i)``: a contiguous block
after the base vocabulary, so the next-item distribution over the whole catalog is one slice
of the logits at one position (exact full ranking from one forward pass). SmolLM2 ties its
input and output embeddings, so each new row is both the item's input embedding and its
output-head row; it starts as the mean of the item's title-token embeddings, which puts it
where the base model already represents that title.

The extended base is a plain HF folder (transformers, peft and vLLM load it as any other
model) with ``item_vocab.json`` beside the weights; per-user LoRA adapters over it stay
standard PEFT (the new rows live in the base, never in an adapter: vLLM rejects
``modules_to_save``). A trained foundation-model version is the same kind of folder with
trained rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmrec.atomic import file_lock, make_tmp_dir, publish_dir, replace_dir
from llmrec.model.constants import MARKER_FILE
from llmrec.model.gguf import _read_json, save_hf_folder, write_marker

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmrec.data import Catalog

log = logging.getLogger(__name__)

ITEM_VOCAB_FILE = "item_vocab.json"
ITEM_TOKEN = "<|item:{}|>"
"""Text of item ``catalog.index(i)``'s token; special, so user text can never spell it."""
ITEM_BASE_FORMAT = 1
"""Bump when the token layout or the initialisation changes: cached folders are rebuilt."""


class ItemVocabError(ValueError):
    """A model folder has no item vocabulary, or one for another catalog."""


def catalog_digest(catalog: Catalog) -> str:
    """sha256 of the catalog's ids and display titles, in order: what the item rows encode."""
    h = hashlib.sha256()
    for item in catalog:
        h.update(json.dumps([item.item_id, item.display]).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ItemVocab:
    """Where a model's item tokens are: ``item_ids[j]`` is token ``first_token_id + j``."""

    first_token_id: int
    item_ids: tuple[str, ...]
    catalog_sha256: str
    _pos: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # frozen: the lookup table is derived once, here
        object.__setattr__(self, "_pos", {i: j for j, i in enumerate(self.item_ids)})

    def __len__(self) -> int:
        return len(self.item_ids)

    def token_id(self, item_id: str) -> int:
        """The vocabulary id of ``item_id``'s token (KeyError if it is not in the vocabulary)."""
        return self.first_token_id + self._pos[item_id]

    def index(self, item_id: str) -> int:
        """Position of ``item_id`` in the item block (its column in item scores)."""
        return self._pos[item_id]

    def check_catalog(self, catalog: Catalog) -> None:
        """Raise ItemVocabError unless the vocabulary was built for exactly ``catalog``."""
        if self.catalog_sha256 != catalog_digest(catalog):
            raise ItemVocabError(
                f"the model's item tokens were built for another catalog "
                f"({len(self)} items, sha256 {self.catalog_sha256[:12]}), "
                f"not this one ({len(catalog)} items)"
            )

    def to_json(self) -> dict:
        return {
            "format": ITEM_BASE_FORMAT,
            "first_token_id": self.first_token_id,
            "catalog_sha256": self.catalog_sha256,
            "item_ids": list(self.item_ids),
        }

    @classmethod
    def read(cls, model_dir: str | Path) -> ItemVocab:
        """The vocabulary of an extended base folder (ItemVocabError if it has none)."""
        path = Path(model_dir) / ITEM_VOCAB_FILE
        data = _read_json(path)
        if data is None:
            raise ItemVocabError(f"{model_dir} is not an item-token base (no {ITEM_VOCAB_FILE})")
        return cls(int(data["first_token_id"]), tuple(data["item_ids"]), data["catalog_sha256"])


def has_item_vocab(model_dir: str | Path) -> bool:
    """True when ``model_dir`` is an item-token base (trained or not)."""
    return (Path(model_dir) / ITEM_VOCAB_FILE).is_file()


def history_reading(model_dir: str | Path, window: int = 50) -> tuple[str, int]:
    """(render, window) a trained version was trained to read, from its marker; an untrained
    extended base reads item tokens over ``window`` items."""
    marker = _read_json(Path(model_dir) / MARKER_FILE) or {}
    trained = marker.get("llm") or {}
    return trained.get("render", "items"), int(trained.get("window", window))


def title_embedding_init(
    embeddings: torch.Tensor, tokenizer: PreTrainedTokenizerBase, titles: list[str]
) -> torch.Tensor:
    """One row per title: the mean of the title's token embeddings (" Title (Year)")."""
    import torch

    rows = []
    for title in titles:
        ids = tokenizer.encode(" " + title, add_special_tokens=False)
        rows.append(embeddings[torch.tensor(ids)].float().mean(0))
    return torch.stack(rows).to(embeddings.dtype)


def extend_with_items(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, catalog: Catalog
) -> ItemVocab:
    """Add one special token per catalog item to ``tokenizer`` and ``model``, in place.

    The new embedding rows start from their titles' token embeddings (the output head
    shares them when the model ties its embeddings, as SmolLM2 does).
    """
    import torch

    if not model.config.tie_word_embeddings:
        # An untied head would need its own rows initialised and kept in step; every base
        # this project ships ties them, so say so rather than half-support it.
        raise ItemVocabError("item tokens need a base with tied input and output embeddings")
    titles = [item.display for item in catalog]
    first = len(tokenizer)
    init = title_embedding_init(model.get_input_embeddings().weight.detach(), tokenizer, titles)
    added = tokenizer.add_tokens(
        [ITEM_TOKEN.format(j) for j in range(len(catalog))], special_tokens=True
    )
    if added != len(catalog):
        raise ItemVocabError(f"the tokenizer already had {len(catalog) - added} item tokens")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[first : first + len(catalog)] = init
    model.tie_weights()
    return ItemVocab(first, tuple(catalog.ids), catalog_digest(catalog))


def save_item_base(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    vocab: ItemVocab,
    dst: Path,
    fields: dict,
) -> None:
    """Write an extended base into the empty folder ``dst``; the marker (``fields`` plus the
    fingerprint) goes last."""
    save_hf_folder(model, tokenizer, dst)
    (dst / ITEM_VOCAB_FILE).write_text(json.dumps(vocab.to_json()))
    write_marker(dst, fields)


def item_base_dir(base_dir: Path, catalog: Catalog) -> Path:
    """Where the extended base of ``base_dir`` for ``catalog`` is cached (beside the base)."""
    return base_dir.parent / f"{base_dir.name}+items-{catalog_digest(catalog)[:16]}"


def prepare_item_base(base_dir: str | Path, catalog: Catalog, force: bool = False) -> Path:
    """The extended base of ``base_dir`` for ``catalog``, built once and cached.

    Reproducible: the same base and catalog give the same weights (the rows are a
    deterministic function of the base embeddings and the titles). Built in a temp folder and
    renamed into place under a lock, like the prepared base.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from llmrec.model.fingerprint import fingerprint_model_dir
    from llmrec.model.tokenizer import load_tokenizer

    base_dir = Path(base_dir)
    final = item_base_dir(base_dir, catalog)
    expected = {
        "format_version": ITEM_BASE_FORMAT,
        "kind": "item-base",
        "base_fingerprint": fingerprint_model_dir(base_dir),
        "catalog_sha256": catalog_digest(catalog),
    }

    def ready() -> bool:
        marker = _read_json(final / MARKER_FILE)
        return marker is not None and all(marker.get(k) == v for k, v in expected.items())

    if not force and ready():
        return final
    with file_lock(final.parent / f".{final.name}.lock"):
        if not force and ready():
            return final
        log.info("building the item-token base for %d items from %s", len(catalog), base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        tokenizer = load_tokenizer(str(base_dir))
        vocab = extend_with_items(model, tokenizer, catalog)
        tmp = make_tmp_dir(final)
        try:
            save_item_base(model, tokenizer, vocab, tmp, expected)
            if final.exists():
                replace_dir(tmp, final)
            else:
                publish_dir(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
