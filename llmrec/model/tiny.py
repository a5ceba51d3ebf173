"""A tiny Llama with the real SmolLM2 tokenizer, built locally in seconds, for tests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmrec.atomic import write_dir_atomic
from llmrec.model.constants import BASE_MODEL_ALIAS, FORMAT_VERSION
from llmrec.model.gguf import (
    default_cache_dir,
    packaged_gguf_path,
    prepared_dir_if_ready,
    save_hf_folder,
    write_marker,
)
from llmrec.model.tokenizer import ensure_pad_token, tokenizer_from_gguf

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _load_source_tokenizer(source: str | None) -> tuple[PreTrainedTokenizerBase, str]:
    """Tokenizer for the tiny model and a description of where it came from.

    ``None`` or the alias means the SmolLM2 tokenizer: read from an already prepared base
    folder when there is one (the faster source) and straight from the GGUF otherwise; both
    give the same tokenizer. A ``.gguf`` path, a folder or a hub id are also accepted.
    """
    from transformers import AutoTokenizer

    if source is None or source == BASE_MODEL_ALIAS:
        gguf = packaged_gguf_path()
        ready = prepared_dir_if_ready(default_cache_dir(), gguf)
        if ready is not None:
            return AutoTokenizer.from_pretrained(ready), BASE_MODEL_ALIAS
        return tokenizer_from_gguf(gguf), BASE_MODEL_ALIAS
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return tokenizer_from_gguf(path), path.name
    return AutoTokenizer.from_pretrained(source), source


def build_tiny_model(out_dir: Path, tokenizer_source: str | None = None, seed: int = 0) -> Path:
    """Build a 6.6M-parameter, 2-layer Llama with the real SmolLM2 tokenizer, for fast tests.

    Same folder layout as a prepared base (so transformers, peft, bitsandbytes and vLLM run
    their real loading code on it); head size 64 because vLLM's attention backends accept
    it. Deterministic: the same seed gives byte-identical weights. ``out_dir`` must not
    exist or be empty; the folder is built beside it and renamed into place.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"out_dir exists and is not an empty folder: {out_dir}")
    tokenizer, source_name = _load_source_tokenizer(tokenizer_source)
    ensure_pad_token(tokenizer)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)

    def fill(tmp: Path) -> None:
        save_hf_folder(model, tokenizer, tmp)
        fields = {"format_version": FORMAT_VERSION, "kind": "tiny", "seed": seed}
        write_marker(tmp, {**fields, "source": source_name})

    # Replacing works on the empty out_dir allowed above: it is moved aside, then deleted.
    write_dir_atomic(out_dir, fill)
    return out_dir
