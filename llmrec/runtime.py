"""Builds the runtime objects (base model, adapter, prompts, recommender) from the config."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from llmrec.config import AppConfig
from llmrec.data import Dataset, load_dataset
from llmrec.model import load_model
from llmrec.prompts import PromptBuilder
from llmrec.recommender import Recommender


def dataset_from_config(cfg: AppConfig) -> Dataset:
    """The data set the config names."""
    return load_dataset(cfg.data.name, cfg.data.interactions, cfg.data.catalog)


def load_base(cfg: AppConfig) -> tuple[torch.nn.Module, object]:
    """The frozen base model and its tokenizer, as the config describes them."""
    return load_model(
        cfg.model.name_or_path,
        quantization=cfg.model.quantization,
        dtype=cfg.model.dtype,
        cache_dir=cfg.model.cache_dir,
    )


def attach_adapter(
    model: torch.nn.Module, adapter_dir: Path, merge: bool = True
) -> torch.nn.Module:
    """The base with a PEFT LoRA adapter on top; merged into the weights for speed when possible."""
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    # Merging is exact for full-precision bases and removes the LoRA overhead at inference;
    # a quantized base cannot absorb the update, so it keeps the adapter as a side branch.
    quantized = getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None)
    return peft_model.merge_and_unload() if merge and not quantized else peft_model


def build_recommender(
    cfg: AppConfig, dataset: Dataset, model: torch.nn.Module, tokenizer
) -> Recommender:
    """A recommender over ``dataset``'s catalog with the config's prompt and decoding settings."""
    prompts = PromptBuilder(
        tokenizer,
        max_history_items=cfg.prompts.max_history_items,
        max_prompt_tokens=cfg.prompts.max_prompt_tokens,
    )
    return Recommender(
        model, tokenizer, dataset.catalog, prompts, beam_width=cfg.recommend.beam_width
    )
