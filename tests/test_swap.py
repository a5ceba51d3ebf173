"""Swapping adapters through one SwappableLora gives exactly what loading each would."""

import pytest
import torch
from peft import PeftModel

from llmrec.adapters import LoraWeights, SwappableLora, pad_rank, read_adapter, write_adapter
from llmrec.model import load_model

TARGETS = ("q_proj", "v_proj")


def random_adapter(model, rank, alpha, seed, base) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS and isinstance(module, torch.nn.Linear):
            a = torch.randn(rank, module.in_features, generator=gen) * 0.1
            b = torch.randn(module.out_features, rank, generator=gen) * 0.1
            state[f"base_model.model.{name}.lora_A.weight"] = a
            state[f"base_model.model.{name}.lora_B.weight"] = b
    return LoraWeights(state, rank, float(alpha), TARGETS, base)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir)


def test_swapped_lora_matches_peft_loading(tiny, tmp_path):
    base, _ = load_model(tiny)
    ids = torch.tensor([[1, 50, 300, 7000, 12]])
    small = random_adapter(base, 2, 8, seed=1, base=tiny)
    big = random_adapter(base, 6, 3, seed=2, base=tiny)
    expected = {}
    for name, weights in (("small", small), ("big", big)):
        write_adapter(weights, tmp_path / name)
        fresh, _ = load_model(tiny)
        expected[name] = logits(PeftModel.from_pretrained(fresh, str(tmp_path / name)), ids)
    swap = SwappableLora(base, rank=8, target_modules=TARGETS)
    for name in ("small", "big", "small"):
        weights = read_adapter(tmp_path / name)
        swap.use(weights, name)
        assert torch.allclose(logits(swap.model, ids), expected[name], atol=1e-5)
    assert not torch.allclose(expected["small"], expected["big"], atol=1e-3)


def test_padding_keeps_the_update_and_refuses_shrinking(tiny):
    base, _ = load_model(tiny)
    w = random_adapter(base, 3, 6, seed=0, base=tiny)
    padded = pad_rank(w, 5)
    module = w.modules[0]
    a, b = w.pair(module)
    pa, pb = padded.pair(module)
    assert torch.allclose(pb @ pa * padded.scale, b @ a * w.scale, atol=1e-6)
    with pytest.raises(ValueError, match="pad"):
        pad_rank(w, 2)
