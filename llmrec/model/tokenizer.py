"""Tokenizers as every caller here needs them: a pad token that is not eos, a padding side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # heavy imports stay lazy so `import llmrec` is fast
    from transformers import PreTrainedTokenizerBase


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token that is NOT its eos token, when it has one to spare.

    SmolLM2 ships ``pad = eos = <|im_end|>``; a collator that masks pad positions out of the
    labels would then also mask every end-of-turn, and the fine-tuned model would never learn
    to stop. ``<|endoftext|>`` (the unk token; byte-level BPE never emits unk) is unused in
    chats, so it pads. With no spare token we fall back to eos, as most recipes do.
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return
    unk = tokenizer.unk_token
    if unk is not None and unk != eos:
        tokenizer.pad_token = unk
    elif tokenizer.pad_token is None and eos is not None:
        tokenizer.pad_token = eos


def load_tokenizer(
    path: str, padding_side: Literal["left", "right"] = "left"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from an HF folder or hub id, with a pad token and ``padding_side``.

    Left padding is the default because batched generation needs every prompt to end at the
    same position; training code that packs right-padded batches passes ``"right"``.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


def tokenizer_from_gguf(gguf_path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer (vocab, merges, ChatML template) embedded in a GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
