"""The generative recommender: history in, ranked catalog items out.

``recommend`` runs beam search constrained to a trie of catalog titles: the
model can only spell items that exist, seen items are closed off in the trie,
and each item's score is the log-probability of its full title. Because
log-probabilities only fall as a beam grows, the search stops as soon as the
k-th finished item beats every open beam, so the top-k it returns is exact
within the beam. The search itself (:func:`trie_beam_search`) is a generator that
asks for next-token log-probabilities and knows nothing about models, so the
local KV-cache scorer here and a remote vLLM server (``llmrec_serving``) run the very
same search with the same scores. ``chat`` is the free-text path: the model writes an answer
and the grounder maps the titles it names onto catalog items.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch

from llmrec.config import AppConfig
from llmrec.data import Catalog, Dataset
from llmrec.prompts import PromptBuilder
from llmrec.recommend.grounding import GroundedItem, Grounder
from llmrec.recommend.trie import TitleTrie, TrieNode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recommendation:
    """One ranked catalog item; ``score`` is the log-probability of its title."""

    item_id: str
    title: str
    score: float


@dataclass(frozen=True)
class BeamStep:
    """One round of the search: score every candidate token after every open beam.

    ``paths[i]`` is beam i's tokens after the prompt (empty at the first step);
    ``parents[i]`` is the row of the previous step it grew from (a KV-cache backend
    reorders its cache by them and feeds ``paths[i][-1]``; a stateless backend sends
    the prompt plus the whole path); ``candidates[i]`` are its open trie children.
    """

    paths: list[tuple[int, ...]]
    parents: list[int]
    candidates: list[list[int]]


Scores = list[list[float]]
"""Per beam, the full-vocabulary log-probability of each of its candidates, in order."""

BeamSearch = Generator[BeamStep, Scores, list[tuple[float, str]]]


@dataclass
class _Beam:
    score: float
    node: TrieNode
    path: tuple[int, ...]
    parent: int  # row in the previous step's batch (for the KV cache)


def trie_beam_search(
    trie: TitleTrie, k: int, width: int, excluded: set[str] = frozenset()
) -> BeamSearch:
    """Trie-constrained beam search as a generator that knows nothing about models.

    It yields a :class:`BeamStep` and is sent back the candidates' log-probabilities
    (whatever computes them: a local model, a vLLM server); it returns the top ``k``
    unexcluded items as ``(score, item_id)``, best first, where the score is the sum of
    the log-probabilities of the item's tokens. Drive it with :func:`run_search`, or an
    async loop around ``send`` where the scores come over the network.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    blocked = trie.exclusion(excluded)
    beams = [_Beam(0.0, trie.root, (), 0)]
    finished: list[tuple[float, str]] = []
    width = max(width, k)
    while beams:
        children = [trie.open_children(b.node, blocked) for b in beams]
        scores = yield BeamStep(
            [b.path for b in beams], [b.parent for b in beams], [list(c) for c in children]
        )
        candidates = [
            _Beam(beam.score + s, child[t], (*beam.path, t), row)
            for row, (beam, child, row_scores) in enumerate(
                zip(beams, children, scores, strict=True)
            )
            for t, s in zip(child, row_scores, strict=True)
        ]
        candidates.sort(key=lambda b: b.score, reverse=True)
        beams = []
        for cand in candidates:
            if not cand.node.children:  # a leaf: the title is complete
                finished += [(cand.score, i) for i in trie.open_items(cand.node, excluded)]
            elif len(beams) < width:
                beams.append(cand)
        if len(finished) >= k:
            kth = sorted((s for s, _ in finished), reverse=True)[k - 1]
            # Scores only decrease as beams grow: an open beam below the k-th is hopeless.
            beams = [b for b in beams if b.score > kth]
    finished.sort(key=lambda f: f[0], reverse=True)
    return finished[:k]


def run_search(search: BeamSearch, score: Callable[[BeamStep], Scores]) -> list[tuple[float, str]]:
    """Drive a :func:`trie_beam_search` with a synchronous scorer; returns its result."""
    try:
        step = next(search)
        while True:
            step = search.send(score(step))
    except StopIteration as done:
        return done.value


class KVCacheScorer:
    """Scores beam steps with a local causal LM, reusing its KV cache across steps.

    The first step runs the prompt; every later step reorders the cache by the beams'
    parents and feeds only their last token, so a step costs one token per beam.
    """

    def __init__(self, model: torch.nn.Module, prompt_ids: Sequence[int]):
        self.model = model
        self.prompt_ids = list(prompt_ids)
        self._cache = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def __call__(self, step: BeamStep) -> Scores:
        """Full-vocabulary log-probabilities of ``step``'s candidates."""
        if self._cache is None:
            ids = torch.tensor([self.prompt_ids], device=self.device)
            out = self.model(input_ids=ids, use_cache=True)
        else:
            self._cache.reorder_cache(torch.tensor(step.parents, device=self.device))
            ids = torch.tensor([[p[-1]] for p in step.paths], device=self.device)
            out = self.model(input_ids=ids, past_key_values=self._cache, use_cache=True)
        self._cache = out.past_key_values
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        return [logp[row, tokens].tolist() for row, tokens in enumerate(step.candidates)]


def catalog_trie(catalog: Catalog, prompts: PromptBuilder) -> TitleTrie:
    """The trie of every catalog title as the prompts tokenize an answer line."""
    return TitleTrie.build(((item.item_id, item.display) for item in catalog), prompts.target_ids)


class Recommender:
    """Ranks catalog items for a history with a causal LM (optionally LoRA-adapted)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        catalog: Catalog,
        prompts: PromptBuilder,
        beam_width: int = 20,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.prompts = prompts
        self.beam_width = beam_width
        self.trie = catalog_trie(catalog, prompts)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def history_titles(self, history: Sequence[str]) -> list[str]:
        """Display titles of a history of item ids (unknown ids are skipped)."""
        return self.catalog.displays(history)

    def recommend(
        self,
        history: Sequence[str],
        k: int = 10,
        context: str | None = None,
        exclude: Sequence[str] = (),
        exclude_seen: bool = True,
    ) -> list[Recommendation]:
        """Top-k unseen catalog items for ``history``, best first.

        ``exclude`` adds items never to return (e.g. "never show me X");
        ``exclude_seen=False`` allows items from the history itself.
        """
        excluded = set(exclude) | (set(history) if exclude_seen else set())
        prompt = self.prompts.recommend_prompt_ids(self.history_titles(history), context)
        search = trie_beam_search(self.trie, k, self.beam_width, excluded)
        ranked = run_search(search, KVCacheScorer(self.model, prompt))
        return [
            Recommendation(item_id, self.catalog.display(item_id), score)
            for score, item_id in ranked
        ]

    @torch.inference_mode()
    def item_logprob(
        self, history: Sequence[str], item_id: str, context: str | None = None
    ) -> float:
        """Log-probability of ``item_id``'s title as the next item: the very score the beam
        search would give it (no beam pruning), in one forward pass."""
        prompt = self.prompts.recommend_prompt_ids(self.history_titles(history), context)
        target = self.prompts.target_ids(self.catalog.display(item_id))
        ids = torch.tensor([prompt + target], device=self.device)
        logp = torch.log_softmax(
            self.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1
        )
        return logp.gather(1, torch.tensor(target, device=self.device)[:, None]).sum().item()

    @torch.inference_mode()
    def generate(
        self, messages: list[dict], max_new_tokens: int = 96, temperature: float = 0.0
    ) -> str:
        """Free-text answer to chat ``messages`` (greedy when temperature is 0)."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = {key: value.to(self.device) for key, value in ids.items()}
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
        out = self.model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            **({"do_sample": False} | sampling),
        )
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    def chat(
        self,
        history: Sequence[str],
        message: str,
        grounder: Grounder,
        k: int = 5,
        exclude: Sequence[str] = (),
        max_new_tokens: int = 96,
    ) -> ChatAnswer:
        """Answer a free-text request; the items it names are grounded to the catalog.

        Named titles that match no catalog item (above the grounder's threshold),
        or that the user has seen or excluded, are dropped from ``items``.
        """
        titles = self.history_titles(history)
        excluded = set(history) | set(exclude)
        messages = [
            {
                "role": "system",
                "content": self.prompts.chat_system(
                    titles[-self.prompts.max_history_items :],
                    [self.catalog.display(i) for i in exclude if i in self.catalog],
                ),
            },
            {"role": "user", "content": message},
        ]
        text = self.generate(messages, max_new_tokens=max_new_tokens)
        return ChatAnswer(text, grounder.ground(text, exclude=excluded, k=k))


@dataclass(frozen=True)
class ChatAnswer:
    """The model's free text and the catalog items grounded from it."""

    text: str
    items: list[GroundedItem]


def build_recommender(
    cfg: AppConfig, dataset: Dataset, model: torch.nn.Module, tokenizer
) -> Recommender:
    """A recommender over ``dataset``'s catalog with the config's prompt and decoding settings."""
    prompts = PromptBuilder.from_config(tokenizer, cfg.prompts)
    return Recommender(
        model, tokenizer, dataset.catalog, prompts, beam_width=cfg.recommend.beam_width
    )
