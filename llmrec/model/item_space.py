"""The item-token base's own item space: which items the model places near which.

Each catalog item of an item-token base (``llmrec.model.item_vocab``) is one row of the tied
embedding / output head. Two items whose rows point the same way are scored alike after the
same history, so the cosine of their rows is the model's own notion of "close": a reason can
cite the history items nearest a recommendation as what drove it, without any text model
guessing. Rows are read straight from the served folder's safetensors (only the item slice),
so the gateway need not load the model to explain.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmrec.model.item_vocab import ItemVocab

EMBEDDING_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight", "lm_head.weight")
"""Where the item rows live in a saved causal LM (tied, so the first found is both)."""


@dataclass(frozen=True)
class ItemSpace:
    """Unit-length item rows, ``rows[j]`` for ``item_ids[j]``."""

    item_ids: tuple[str, ...]
    rows: np.ndarray
    _pos: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rows.shape[0] != len(self.item_ids):
            raise ValueError(f"{self.rows.shape[0]} rows for {len(self.item_ids)} items")
        object.__setattr__(self, "_pos", {i: j for j, i in enumerate(self.item_ids)})

    @classmethod
    def from_rows(cls, item_ids: Iterable[str], rows) -> ItemSpace:
        """From raw rows (a numpy array or a torch tensor), normalised here."""
        if hasattr(rows, "detach"):
            rows = rows.detach().float().cpu().numpy()
        rows = np.asarray(rows, dtype=np.float32)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return cls(tuple(item_ids), rows / np.maximum(norms, 1e-12))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ItemSpace:
        """The item rows of the item-token base saved in ``model_dir``."""
        from safetensors import safe_open

        model_dir = Path(model_dir)
        vocab = ItemVocab.read(model_dir)
        lo, hi = vocab.first_token_id, vocab.first_token_id + len(vocab)
        for path in _safetensors_files(model_dir):
            with safe_open(str(path), framework="pt") as f:  # pt: numpy has no bf16
                name = next((n for n in EMBEDDING_NAMES if n in f.keys()), None)
                if name is not None:
                    return cls.from_rows(vocab.item_ids, f.get_slice(name)[lo:hi])
        raise FileNotFoundError(f"{model_dir}: no embedding matrix ({', '.join(EMBEDDING_NAMES)})")

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._pos

    def nearest(self, item_id: str, among: Iterable[str], n: int) -> list[tuple[str, float]]:
        """Up to ``n`` of ``among`` (other than ``item_id``) closest to ``item_id``, as
        ``(item_id, cosine)``, closest first; ties keep ``among``'s order. Empty when the
        space does not hold ``item_id``; items it does not hold are skipped."""
        if item_id not in self._pos:
            return []
        others = list(dict.fromkeys(i for i in among if i in self._pos and i != item_id))
        if not others:
            return []
        cos = self.rows[[self._pos[i] for i in others]] @ self.rows[self._pos[item_id]]
        order = np.argsort(-cos, kind="stable")[:n]
        return [(others[j], float(cos[j])) for j in order]


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))
