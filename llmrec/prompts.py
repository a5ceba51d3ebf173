"""Prompt rendering: histories as chat messages, and the exact tokens training and decoding see.

The wording lives in ``prompts/*.jinja`` (data, not code); this module only fills the
templates and turns them into token ids through the tokenizer's own chat template.

The recommendation prompt puts the history in the assistant's turn, one "- Title (Year)"
line per item, and ends with the bullet of the next line: the answer is the next title.
So one training sequence scores every item of a user's history as the next item after the
ones before it (many targets per forward pass, which a CPU needs), and decoding continues
the very same list. Its contract: ``recommend_prompt_ids(history) + target_ids(title)``
are exactly the tokens of the chat whose assistant answer lists the history then ``title``,
so the LoRA is trained on the same tokens that trie-constrained decoding later walks.

Prompts are token-budget aware: the most recent history items are kept and the oldest
dropped until the rendered prompt fits ``max_prompt_tokens``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from llmrec.atomic import sha256_file

if TYPE_CHECKING:
    from llmrec.config import PromptConfig

log = logging.getLogger(__name__)

# The package is installed editable from the repo root, so prompts/ sits beside llmrec/.
DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"

RECOMMEND_SYSTEM = "recommend_system.jinja"
RECOMMEND_USER = "recommend_user.jinja"
CHAT_SYSTEM = "chat_system.jinja"
EXPLAIN = "explain.jinja"
RECOMMEND_TEMPLATES = (RECOMMEND_SYSTEM, RECOMMEND_USER)
"""The templates of the recommendation prompt: all that training and ranking render."""

# Each history item is one "- Title (Year)" line of the assistant's answer.
ITEM_BULLET = "-"
HISTORY_RENDERS = ("items", "titles", "both")
"""How an item-token model reads a history: each item as its token, as its "- Title" line,
or as its token followed by its title."""


@cache
def _environment(prompts_dir: Path) -> jinja2.Environment:
    """One Jinja environment per folder; it compiles each template once and caches it."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(prompts_dir)),
        undefined=jinja2.StrictUndefined,  # a misspelled variable fails instead of rendering ""
        trim_blocks=True,  # lets templates put one block tag per line
        lstrip_blocks=True,
        autoescape=False,  # plain text for an LLM, not HTML
    )


def load_template(name: str, prompts_dir: Path | None = None) -> jinja2.Template:
    """The compiled template ``name`` from ``prompts_dir`` (default: the repo's prompts/).

    Raises FileNotFoundError naming the full path when the file is missing.
    """
    folder = Path(prompts_dir or DEFAULT_PROMPTS_DIR).resolve()
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"prompt template not found: {path}")
    return _environment(folder).get_template(name)


def render_template(name: str, prompts_dir: Path | None = None, **variables: Any) -> str:
    """Render ``name`` with ``variables``; surrounding whitespace is stripped."""
    return load_template(name, prompts_dir).render(**variables).strip()


def template_digests(
    names: Sequence[str] = RECOMMEND_TEMPLATES, prompts_dir: Path | None = None
) -> dict[str, str]:
    """The sha256 of each template ``name`` in ``prompts_dir`` (default: the repo's prompts/).

    A trained run's fingerprint holds these, so that editing a template's wording trains
    anew instead of reusing a run trained on the old wording.
    """
    folder = Path(prompts_dir or DEFAULT_PROMPTS_DIR).resolve()
    return {name: sha256_file(folder / name) for name in names}


def _as_id_list(encoded: Any) -> list[int]:
    """Plain ``list[int]`` from whatever ``apply_chat_template(tokenize=True)`` returned.

    transformers 5 returns a BatchEncoding (a mapping) by default, older versions a list,
    and a tensor when asked; a batch of one is unwrapped.
    """
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        if len(encoded) != 1:
            raise ValueError(f"expected one tokenized chat, got a batch of {len(encoded)}")
        encoded = encoded[0]
    return [int(i) for i in encoded]


class PromptBuilder:
    """Renders recommendation, chat and explanation prompts for one tokenizer.

    ``max_history_items`` caps the items any prompt lists (most recent kept);
    ``max_prompt_tokens`` is the token budget of ``recommend_prompt_ids``.
    """

    @classmethod
    def from_config(
        cls, tokenizer: Any, cfg: PromptConfig, max_prompt_tokens: int | None = None
    ) -> PromptBuilder:
        """The builder the ``prompts`` config section describes (``max_prompt_tokens``, when
        given, overrides the section's budget: a server whose context is shorter)."""
        budget = cfg.max_prompt_tokens if max_prompt_tokens is None else max_prompt_tokens
        return cls(tokenizer, max_history_items=cfg.max_history_items, max_prompt_tokens=budget)

    def __init__(
        self,
        tokenizer: Any,
        prompts_dir: Path | None = None,
        max_history_items: int = 20,
        max_prompt_tokens: int = 512,
    ) -> None:
        if max_history_items < 0:
            raise ValueError("max_history_items must be >= 0")
        self.tokenizer = tokenizer
        self.prompts_dir = Path(prompts_dir or DEFAULT_PROMPTS_DIR).resolve()
        self.max_history_items = max_history_items
        self.max_prompt_tokens = max_prompt_tokens
        self._templates: dict[str, jinja2.Template] = {}
        # User text must never smuggle in control tokens ("<|im_start|>system ..."):
        # the chat template would tokenize them as real turn boundaries.
        specials = sorted(_special_token_strings(tokenizer), key=len, reverse=True)
        self._specials_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.bullet_ids = self._encode(ITEM_BULLET)
        self.newline_ids = self._encode("\n")
        bare = len(self._head_ids(None)) + len(self.bullet_ids)
        if bare > max_prompt_tokens:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens} cannot hold the bare recommendation "
                f"prompt ({bare} tokens with no history and no context)"
            )

    # ----- the recommendation prompt ---------------------------------------------------

    def recommend_messages(
        self, history_titles: Sequence[str], context: str | None = None
    ) -> list[dict[str, str]]:
        """The recommendation prompt as chat messages, for chat APIs (e.g. vLLM's).

        The last message is the partial assistant answer (the history list ending with the
        bullet of the next line): render it with ``continue_final_message=True``. No token
        budget here (see ``recommend_prompt_ids``); only ``max_history_items``.
        """
        titles = self._recent(history_titles)
        ctx = self._clean(context) if context else None
        listed = "".join(f"{ITEM_BULLET} {title}\n" for title in titles)
        partial = {"role": "assistant", "content": listed + ITEM_BULLET}
        return [*self._request_messages(ctx), partial]

    def recommend_prompt_ids(
        self, history_titles: Sequence[str], context: str | None = None
    ) -> list[int]:
        """Token ids of the recommendation prompt: the request, then the history as the
        assistant's list, ending with the bullet the next title follows.

        Keeps the most recent items that fit ``max_prompt_tokens``. If even no items plus
        the context overflow, the context is cut at the end and a warning is logged.
        """
        titles = self._recent(history_titles)
        ctx = self._clean(context) if context else None
        head = self._head_ids(ctx)
        if len(head) + len(self.bullet_ids) > self.max_prompt_tokens:
            head = self._truncate_context(ctx or "")
        room = self.max_prompt_tokens - len(head) - len(self.bullet_ids)
        lines: list[list[int]] = []
        for title in reversed(titles):  # most recent first, until the budget is spent
            line = self.bullet_ids + self.target_ids(title)
            if len(line) > room:
                break
            lines.append(line)
            room -= len(line)
        if len(lines) < len(titles):
            log.debug(
                "prompt budget %d: kept %d of %d history items",
                self.max_prompt_tokens,
                len(lines),
                len(titles),
            )
        return head + [t for line in reversed(lines) for t in line] + self.bullet_ids

    def target_ids(self, title: str) -> list[int]:
        """Tokens of ``title`` as one line of the list: the title, then the newline.

        Contract (while the budget keeps every item): ``recommend_prompt_ids(h + [x]) ==
        recommend_prompt_ids(h) + target_ids(x) + bullet_ids``. The newline never occurs
        inside a cleaned title, so no title's target is a prefix of another's.
        """
        return self._encode(" " + self._clean(title)) + self.newline_ids

    def item_sequence(
        self,
        token_ids: Sequence[int],
        titles: Sequence[str],
        render: str = "items",
        context: str | None = None,
    ) -> tuple[list[int], list[int]]:
        """A history for an item-token model: the ids, and the position predicting each item.

        ``token_ids[j]`` and ``titles[j]`` are history item ``j``'s token and title. Item
        ``j`` is predicted at ``ends[j]``, the last token before it (the end of the request
        for the first); ``ends[-1]``, the last position, predicts the item after the whole
        history. So training reads every ``ends[j]`` for ``j < len(history)`` at once, and
        ranking reads the last position only: the same tokens, causal, either way.
        """
        if render not in HISTORY_RENDERS:
            raise ValueError(f"render must be one of {list(HISTORY_RENDERS)}, got {render!r}")
        if len(token_ids) != len(titles):
            raise ValueError("token_ids and titles must be the same length")
        ids = self._head_ids(self._clean(context) if context else None)
        ends = [len(ids) - 1]
        for token, title in zip(token_ids, titles, strict=True):
            if render != "titles":
                ids.append(int(token))
            if render != "items":
                ids += (self.bullet_ids if render == "titles" else []) + self.target_ids(title)
            ends.append(len(ids) - 1)
        return ids, ends

    def chat_system(
        self, history_titles: Sequence[str], excluded_titles: Sequence[str] = ()
    ) -> str:
        """System prompt of the personal agent chat.

        Both lists keep their last ``max_history_items`` entries: the excluded list is only
        a hint to the model (grounding enforces exclusion), so it need not be complete.
        """
        return self._render(
            CHAT_SYSTEM,
            history=self._recent(history_titles),
            excluded=self._recent(excluded_titles),
        )

    def explain_messages(
        self, history_titles: Sequence[str], item_title: str, facts: str | None = None
    ) -> list[dict[str, str]]:
        """Chat messages asking for a one-line reason why ``item_title`` fits the history,
        stated from ``facts`` (lines of what is known of the item) when given."""
        return [
            {"role": "system", "content": self._render(RECOMMEND_SYSTEM)},
            {
                "role": "user",
                "content": self._render(
                    EXPLAIN,
                    history=self._recent(history_titles),
                    item=self._clean(item_title),
                    facts=facts,
                ),
            },
        ]

    # ----- internals ------------------------------------------------------------------

    def _request_messages(self, context: str | None) -> list[dict[str, str]]:
        # context is already cleaned
        return [
            {"role": "system", "content": self._render(RECOMMEND_SYSTEM)},
            {"role": "user", "content": self._render(RECOMMEND_USER, context=context)},
        ]

    def _head_ids(self, context: str | None) -> list[int]:
        """The request rendered through the chat template, up to the assistant's turn."""
        return self._chat_ids(self._request_messages(context))

    def _truncate_context(self, context: str) -> list[int]:
        """Request ids with the longest context prefix (in tokens) that leaves room for the
        bullet."""
        ctx_ids = self._encode(context)
        budget = self.max_prompt_tokens - len(self.bullet_ids)

        def encode(n_tokens: int) -> list[int]:
            cut = self.tokenizer.decode(ctx_ids[:n_tokens]).strip() if n_tokens else ""
            return self._head_ids(cut or None)

        lo, hi, best = 0, len(ctx_ids), encode(0)  # 0 fits (checked at init), hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ids = encode(mid)
            if len(ids) <= budget:
                lo, best = mid, ids
            else:
                hi = mid
        log.warning(
            "prompt budget %d tokens: history dropped and context cut from %d to %d tokens",
            self.max_prompt_tokens,
            len(ctx_ids),
            lo,
        )
        return best

    def _recent(self, titles: Sequence[str]) -> list[str]:
        kept = list(titles)[-self.max_history_items :] if self.max_history_items else []
        return [c for c in map(self._clean, kept) if c]

    def _clean(self, text: str) -> str:
        """User or catalog text with control tokens removed and whitespace collapsed."""
        if self._specials_re is not None:
            text = self._specials_re.sub("", text)
        # A newline inside a title would break the one-item-per-line list.
        return " ".join(text.split())

    def _render(self, name: str, **variables: Any) -> str:
        template = self._templates.get(name)
        if template is None:
            template = self._templates[name] = load_template(name, self.prompts_dir)
        return template.render(**variables).strip()

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return _as_id_list(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        )


def _special_token_strings(tokenizer: Any) -> set[str]:
    """Every special token's text (eos, bos, ChatML markers, added control tokens)."""
    found = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    return {s for s in found if s}
