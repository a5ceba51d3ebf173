"""The title trie: only catalog items can be spelled, excluded items are closed off."""

import pytest

from llmrec.recommend import TitleTrie

EOS = 0
VOCAB = {"the": 1, "matrix": 2, "reloaded": 3, "heat": 4, "(1999)": 5, "(2003)": 6, "(1995)": 7}


def encode(text: str) -> list[int]:
    return [VOCAB[w] for w in text.lower().split()] + [EOS]


ITEMS = [
    ("1", "The Matrix (1999)"),
    ("2", "The Matrix Reloaded (2003)"),
    ("3", "Heat (1995)"),
]


def walk(trie, blocked, excluded):
    """Every item reachable by following open edges from the root."""
    found, stack = [], [trie.root]
    while stack:
        node = stack.pop()
        children = trie.open_children(node, blocked)
        if not node.children:
            found += trie.open_items(node, excluded)
        stack += children.values()
    return sorted(found)


def test_every_path_is_a_catalog_item():
    trie = TitleTrie.build(ITEMS, encode)
    assert len(trie) == 3 and "2" in trie
    assert walk(trie, {}, set()) == ["1", "2", "3"]


def test_excluded_items_are_closed_off_and_shared_prefixes_stay_open():
    trie = TitleTrie.build(ITEMS, encode)
    excluded = {"1", "unknown-id"}
    blocked = trie.exclusion(excluded)
    assert walk(trie, blocked, excluded) == ["2", "3"]
    # "The" still leads to Matrix Reloaded even though The Matrix is excluded.
    assert VOCAB["the"] in trie.open_children(trie.root, blocked)
    all_blocked = trie.exclusion({"1", "2"})
    assert VOCAB["the"] not in trie.open_children(trie.root, all_blocked)


def test_duplicates_and_empty_sequences_are_rejected():
    trie = TitleTrie.build(ITEMS, encode)
    with pytest.raises(ValueError, match="already"):
        trie.insert("1", [9, EOS])
    with pytest.raises(ValueError, match="no tokens"):
        trie.insert("9", [])
    with pytest.raises(ValueError, match="prefix"):
        trie.insert("10", [VOCAB["heat"]])  # "Heat" without the end token is a prefix of item 3
