"""Prompt rendering: histories as chat messages, and the exact tokens training and decoding see.

The wording lives in ``prompts/*.jinja`` (data, not code); this module only fills the
templates and turns them into token ids through the tokenizer's own chat template. Its
contract: ``recommend_prompt_ids(history) + target_ids(title)`` are exactly the tokens of
the whole chat rendered with ``title`` as the assistant answer, so the LoRA is trained on
the same tokens that trie-constrained decoding later walks.

Prompts are token-budget aware: the most recent history items are kept and the oldest
dropped until the rendered prompt fits ``max_prompt_tokens``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

log = logging.getLogger(__name__)

# The package is installed editable from the repo root, so prompts/ sits beside llmrec/.
DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"

RECOMMEND_SYSTEM = "recommend_system.jinja"
RECOMMEND_USER = "recommend_user.jinja"
CHAT_SYSTEM = "chat_system.jinja"
EXPLAIN = "explain.jinja"

# Any text the assistant might write; only its end-of-turn tokens matter (see _end_of_turn_id).
_PROBE_ANSWER = "Probe (2000)"


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
        self.eot_id = self._end_of_turn_id()
        bare = len(self._chat_ids(self._recommend_messages([], None)))
        if bare > max_prompt_tokens:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens} cannot hold the bare recommendation "
                f"prompt ({bare} tokens with no history and no context)"
            )

    # ----- messages -------------------------------------------------------------------

    def recommend_messages(
        self, history_titles: Sequence[str], context: str | None = None
    ) -> list[dict[str, str]]:
        """Chat messages asking for the next item after the most recent history items.

        No token budget here (see ``recommend_prompt_ids``); only ``max_history_items``.
        """
        titles = self._recent(history_titles)
        return self._recommend_messages(titles, self._clean(context) if context else None)

    def recommend_prompt_ids(
        self, history_titles: Sequence[str], context: str | None = None
    ) -> list[int]:
        """Token ids of the recommendation prompt, ending with the assistant generation prompt.

        Keeps the most recent items that fit ``max_prompt_tokens`` (binary search over the
        number kept, so a long history costs a few renders). If even no items plus the
        context overflow, the context is cut at the end and a warning is logged.
        """
        titles = self._recent(history_titles)
        ctx = self._clean(context) if context else None
        budget = self.max_prompt_tokens

        def encode(n_items: int, ctx: str | None) -> list[int]:
            kept = titles[len(titles) - n_items :] if n_items else []
            return self._chat_ids(self._recommend_messages(kept, ctx))

        # Each listed item costs at least two tokens ("-" and its title), so more than
        # budget // 2 items can never fit: skip rendering them at all.
        hi = min(len(titles), budget // 2)
        ids = encode(hi, ctx)
        if len(ids) <= budget:
            return ids
        best = encode(0, ctx)
        if len(best) > budget:
            return self._truncate_context(ctx or "")
        lo = 0  # invariant: lo items fit (ids in best), hi items do not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ids = encode(mid, ctx)
            if len(ids) <= budget:
                lo, best = mid, ids
            else:
                hi = mid
        if lo < len(titles):
            log.debug("prompt budget %d: kept %d of %d history items", budget, lo, len(titles))
        return best

    def target_ids(self, title: str) -> list[int]:
        """Tokens of ``title`` as the assistant answer: the title, then the end-of-turn token.

        Equals what the chat template produces after the generation prompt (minus any
        text the template appends after the end-of-turn token, e.g. a newline).
        """
        return self._encode(self._clean(title)) + [self.eot_id]

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
        self, history_titles: Sequence[str], item_title: str
    ) -> list[dict[str, str]]:
        """Chat messages asking for a one-line reason why ``item_title`` fits the history."""
        return [
            {"role": "system", "content": self._render(RECOMMEND_SYSTEM)},
            {
                "role": "user",
                "content": self._render(
                    EXPLAIN, history=self._recent(history_titles), item=self._clean(item_title)
                ),
            },
        ]

    # ----- internals ------------------------------------------------------------------

    def _recommend_messages(self, titles: list[str], context: str | None) -> list[dict[str, str]]:
        # titles and context are already cleaned and capped
        return [
            {"role": "system", "content": self._render(RECOMMEND_SYSTEM)},
            {
                "role": "user",
                "content": self._render(RECOMMEND_USER, history=titles, context=context),
            },
        ]

    def _truncate_context(self, context: str) -> list[int]:
        """Prompt with no history and the longest context prefix (in tokens) that fits."""
        ctx_ids = self._encode(context)

        def encode(n_tokens: int) -> list[int]:
            cut = self.tokenizer.decode(ctx_ids[:n_tokens]).strip() if n_tokens else ""
            return self._chat_ids(self._recommend_messages([], cut or None))

        lo, hi, best = 0, len(ctx_ids), encode(0)  # 0 fits (checked at init), hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ids = encode(mid)
            if len(ids) <= self.max_prompt_tokens:
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

    def _end_of_turn_id(self) -> int:
        """The token the chat template closes an assistant turn with.

        Read off the template itself (``<|im_end|>`` for ChatML/SmolLM2/Qwen,
        ``<|eot_id|>`` for Llama 3), so any chat model gets the right training target;
        the tokenizer's eos is the fallback.
        """
        messages = self._recommend_messages([], None)
        messages.append({"role": "assistant", "content": _PROBE_ANSWER})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        at = text.rfind(_PROBE_ANSWER)
        suffix = self._encode(text[at + len(_PROBE_ANSWER) :]) if at >= 0 else []
        if suffix:
            return suffix[0]
        if self.tokenizer.eos_token_id is None:
            raise ValueError("cannot tell the end-of-turn token: no chat-template suffix, no eos")
        return int(self.tokenizer.eos_token_id)


def _special_token_strings(tokenizer: Any) -> set[str]:
    """Every special token's text (eos, bos, ChatML markers, added control tokens)."""
    found = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    return {s for s in found if s}
