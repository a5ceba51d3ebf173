"""What every federated process loads once: the base, the dual LoRA over it, and its ranker.

The accelerate runner, the Flower server and client apps all start here, so that they train
and validate the same model for a config: the prepared base (titles head) or its extended
item-token base for the catalog (``fed.head="items"``), the dual LoRA of
:mod:`llmrec.federated.dual_lora`, and what validation ranks with (the trie decoder, or the
one-pass item scorer reading ``fed.window`` items).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmrec.config import AppConfig
from llmrec.data import Catalog
from llmrec.federated.dual_lora import DualLora, build_dual_lora
from llmrec.federated.validation import Ranker
from llmrec.prompts import PromptBuilder


@dataclass
class FederatedModel:
    """The loaded model of one federated process."""

    base_path: str
    """The folder the adapters are trained on (the extended base for the item-token head)."""
    dual: DualLora
    prompts: PromptBuilder
    ranker: Ranker
    """Validation and export rank with it; it scores with whatever ``dual`` holds."""

    @property
    def base_bytes(self) -> int:
        """Bytes of the frozen base's weights (what a full-model upload would cost)."""
        params = self.dual.model.named_parameters()
        return sum(p.numel() * p.element_size() for n, p in params if "lora_" not in n)


def load_federated_model(cfg: AppConfig, catalog: Catalog, device: str = "cpu") -> FederatedModel:
    """The base for ``cfg`` (built once and cached for the item-token head), the dual LoRA
    over it and its ranker."""
    from llmrec.model import load_model, resolve_model_path
    from llmrec.model.item_vocab import ItemVocab, prepare_item_base
    from llmrec.recommend.item_scorer import ItemScorer
    from llmrec.recommend.recommender import Recommender

    fed = cfg.fed
    base_path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir)
    if fed.head == "items":
        base_path = str(prepare_item_base(base_path, catalog))
    model, tokenizer = load_model(
        base_path, quantization=cfg.model.quantization, dtype=cfg.model.dtype, device=device
    )
    vocab = ItemVocab.read(base_path) if fed.head == "items" else None
    if vocab is not None:
        # The item head's sequences are short (window + prompt, ~100 tokens): there the plain
        # attention trains faster on a CPU than the fused SDPA kernel (docs/experiments.md).
        model.set_attn_implementation("eager")
    dual = build_dual_lora(model, fed, tokenizer.pad_token_id, vocab)
    prompts = PromptBuilder.from_config(tokenizer, cfg.prompts)
    ranker: Ranker
    if vocab is not None:
        ranker = ItemScorer(dual.model, vocab, catalog, prompts, "items", fed.window)
    else:
        ranker = Recommender(dual.model, tokenizer, catalog, prompts, cfg.recommend.beam_width)
    return FederatedModel(base_path, dual, prompts, ranker)
