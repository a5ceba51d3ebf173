"""Ranking the catalog: the generative recommender, grounding, baselines and ranking metrics."""

from .baselines import (
    ItemKNN,
    Popularity,
    top_k,
)
from .grounding import (
    MINILM_PACKAGE,
    GroundedItem,
    Grounder,
    extract_title_mentions,
    load_encoder,
    minilm_path,
    normalize_title,
    split_year,
)
from .metrics import (
    hit_rate_at_k,
    mean_metrics,
    ndcg_at_k,
)
from .recommender import (
    BeamSearch,
    BeamStep,
    ChatAnswer,
    KVCacheScorer,
    Recommendation,
    Recommender,
    Scores,
    build_recommender,
    catalog_trie,
    run_search,
    trie_beam_search,
)
from .sasrec import (
    PAD,
    SASRec,
    SASRecConfig,
)
from .trie import (
    TitleTrie,
    TrieNode,
)

__all__ = [
    "BeamSearch",
    "BeamStep",
    "ChatAnswer",
    "GroundedItem",
    "Grounder",
    "ItemKNN",
    "KVCacheScorer",
    "MINILM_PACKAGE",
    "PAD",
    "Popularity",
    "Recommendation",
    "Recommender",
    "SASRec",
    "SASRecConfig",
    "Scores",
    "TitleTrie",
    "TrieNode",
    "build_recommender",
    "catalog_trie",
    "extract_title_mentions",
    "hit_rate_at_k",
    "load_encoder",
    "mean_metrics",
    "minilm_path",
    "ndcg_at_k",
    "normalize_title",
    "run_search",
    "split_year",
    "top_k",
    "trie_beam_search",
]
