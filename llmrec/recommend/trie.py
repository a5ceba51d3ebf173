"""A token trie over catalog titles, for constrained decoding.

Every path from the root to a leaf is the exact token sequence the model is
trained to emit for one catalog item (title tokens + end-of-turn), so a
decoder that only follows trie edges can never produce an item outside the
catalog. Seen items are excluded per request without rebuilding the trie:
a node stays open while some unexcluded item remains below it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass
class TrieNode:
    """One token position; ``item_ids`` is non-empty only at leaves."""

    node_id: int
    children: dict[int, TrieNode] = field(default_factory=dict)
    item_ids: list[str] = field(default_factory=list)
    n_items: int = 0  # items in this subtree, for exclusion counting


class TitleTrie:
    """Trie of token sequences, one per catalog item."""

    def __init__(self) -> None:
        self.root = TrieNode(0)
        self._n_nodes = 1
        self._paths: dict[str, list[TrieNode]] = {}

    @classmethod
    def build(
        cls, items: Iterable[tuple[str, str]], encode: Callable[[str], list[int]]
    ) -> TitleTrie:
        """Build from (item_id, text) pairs; ``encode`` maps text to the answer's token ids."""
        trie = cls()
        for item_id, text in items:
            trie.insert(item_id, encode(text))
        return trie

    def insert(self, item_id: str, tokens: list[int]) -> None:
        """Add one item under its token path."""
        if not tokens:
            raise ValueError(f"item {item_id!r} encodes to no tokens")
        if item_id in self._paths:
            raise ValueError(f"item {item_id!r} is already in the trie")
        node, path = self.root, [self.root]
        for tok in tokens:
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = TrieNode(self._n_nodes)
                self._n_nodes += 1
            node = child
            path.append(node)
        if node.children:
            # A leaf that is also a prefix would make "stop here" ambiguous; the
            # end-of-turn token at the end of every path rules this out.
            raise ValueError(f"item {item_id!r}: its tokens are a prefix of another item's")
        node.item_ids.append(item_id)
        for n in path:
            n.n_items += 1
        self._paths[item_id] = path

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._paths

    def exclusion(self, excluded: Iterable[str]) -> dict[int, int]:
        """Per-node count of excluded items below it (items not in the trie are ignored)."""
        blocked: dict[int, int] = {}
        for item_id in set(excluded):
            for node in self._paths.get(item_id, ()):
                blocked[node.node_id] = blocked.get(node.node_id, 0) + 1
        return blocked

    @staticmethod
    def open_children(node: TrieNode, blocked: dict[int, int]) -> dict[int, TrieNode]:
        """Children of ``node`` with at least one unexcluded item below."""
        return {
            tok: child
            for tok, child in node.children.items()
            if blocked.get(child.node_id, 0) < child.n_items
        }

    def open_items(self, node: TrieNode, excluded: set[str]) -> list[str]:
        """Item ids ending at ``node`` that are not excluded."""
        return [i for i in node.item_ids if i not in excluded]
