"""Tests for llmrec.adapters.lora: PEFT folder round trips and the shared + personal stacking.

Everything runs on the tiny Llama from ``conftest.py`` with adapters made by peft itself
(``init_lora_weights=False`` so that B != 0 and every adapter really changes the outputs).
The reference for stacking is peft running BOTH original adapters at once, and independently
a base whose weights were patched by hand from the raw safetensors files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from llmrec.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterValidationError,
    LoraWeights,
    lora_delta,
    read_adapter,
    stack,
    state_equal,
    write_adapter,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INPUT_IDS = torch.tensor([[1, 17, 42, 256, 1001, 7, 99, 3000, 12, 5]])


def _base(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _make_peft_adapter(
    model_dir: Path,
    out: Path,
    r: int,
    alpha: int,
    seed: int,
    targets: list[str] = TARGETS,
    **extra,
) -> Path:
    """Save a random (B != 0) peft LoRA for the tiny model to ``out``."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **extra,
    )
    get_peft_model(_base(model_dir), config).save_pretrained(out)
    return out


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(INPUT_IDS).logits


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A shared (r=4, alpha=8) and a personal (r=2, alpha=7) adapter on the same modules."""
    root = tmp_path_factory.mktemp("lora")
    return {
        "shared": _make_peft_adapter(tiny_model_dir, root / "shared", r=4, alpha=8, seed=1),
        "personal": _make_peft_adapter(tiny_model_dir, root / "personal", r=2, alpha=7, seed=2),
    }


# --------------------------------------------------------------------------- read / write


def test_read_adapter_matches_peft_files(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    w = read_adapter(adapters["shared"])
    assert (w.r, w.alpha, w.scale) == (4, 8.0, 2.0)
    assert w.target_modules == tuple(sorted(TARGETS))
    assert w.base_model == str(tiny_model_dir)
    assert state_equal(w.state, load_file(adapters["shared"] / ADAPTER_WEIGHTS))
    # 2 layers x 7 projections, each with an A and a B.
    assert len(w.modules) == 14 and len(w.state) == 28
    a, b = w.pair("model.layers.0.self_attn.k_proj")
    assert tuple(a.shape) == (4, 128) and tuple(b.shape) == (64, 4)  # 1 kv head x head_dim 64


def test_write_adapter_round_trip_and_config(adapters: dict[str, Path], tmp_path: Path) -> None:
    w = read_adapter(adapters["personal"])
    out = write_adapter(w, tmp_path / "copy")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    again = read_adapter(out)
    assert state_equal(again.state, w.state)
    assert (again.r, again.alpha, again.target_modules, again.base_model) == (
        w.r,
        w.alpha,
        w.target_modules,
        w.base_model,
    )
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 2 and config["lora_alpha"] == 7
    assert config["target_modules"] == sorted(TARGETS)
    assert config["bias"] == "none" and config["use_dora"] is False
    assert config["modules_to_save"] is None and config["use_rslora"] is False
    assert config["base_model_name_or_path"] == w.base_model
    # Stable bytes: the same adapter always hashes the same (the store records sha256s).
    second = write_adapter(w, tmp_path / "copy2")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (out / name).read_bytes() == (second / name).read_bytes()


def test_written_adapter_loads_in_peft_with_same_outputs(
    adapters: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    original = PeftModel.from_pretrained(_base(tiny_model_dir), adapters["shared"]).eval()
    rewritten_dir = write_adapter(read_adapter(adapters["shared"]), tmp_path / "rewritten")
    rewritten = PeftModel.from_pretrained(_base(tiny_model_dir), rewritten_dir).eval()
    assert torch.equal(_logits(original), _logits(rewritten))


def test_lora_delta_matches_peft(adapters: dict[str, Path], tiny_model_dir: Path) -> None:
    w = read_adapter(adapters["personal"])
    model = PeftModel.from_pretrained(_base(tiny_model_dir), adapters["personal"])
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    expected = layer.get_delta_weight("default")
    got = lora_delta(w, "model.layers.1.mlp.down_proj")
    assert got.shape == (128, 256)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # The full PEFT key prefix is accepted too.
    assert torch.equal(lora_delta(w, "base_model.model.model.layers.1.mlp.down_proj"), got)


def test_rslora_is_folded_into_plain_alpha(tiny_model_dir: Path, tmp_path: Path) -> None:
    src = _make_peft_adapter(
        tiny_model_dir, tmp_path / "rs", r=4, alpha=8, seed=3, targets=["q_proj"], use_rslora=True
    )
    w = read_adapter(src)
    assert math.isclose(w.scale, 8 / math.sqrt(4))
    model = PeftModel.from_pretrained(_base(tiny_model_dir), src)
    expected = model.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default")
    torch.testing.assert_close(lora_delta(w, "model.layers.0.self_attn.q_proj"), expected)
    assert (
        json.loads((write_adapter(w, tmp_path / "plain") / ADAPTER_CONFIG).read_text())[
            "use_rslora"
        ]
        is False
    )


# --------------------------------------------------------------------------- stacking


def test_stack_shape_and_config(adapters: dict[str, Path]) -> None:
    shared, personal = read_adapter(adapters["shared"]), read_adapter(adapters["personal"])
    stacked = stack(shared, personal)
    assert (stacked.r, stacked.alpha, stacked.scale) == (6, 6.0, 1.0)
    assert stacked.modules == shared.modules
    a, b = stacked.pair("model.layers.0.mlp.up_proj")
    assert tuple(a.shape) == (6, 128) and tuple(b.shape) == (256, 6)
    # A' = [A_s ; A_p] unchanged; B' = [s_s B_s | s_p B_p].
    a_s, b_s = shared.pair("model.layers.0.mlp.up_proj")
    a_p, b_p = personal.pair("model.layers.0.mlp.up_proj")
    assert torch.equal(a[:4], a_s) and torch.equal(a[4:], a_p)
    torch.testing.assert_close(b[:, :4], shared.scale * b_s)
    torch.testing.assert_close(b[:, 4:], personal.scale * b_p)
    for module in stacked.modules:
        torch.testing.assert_close(
            lora_delta(stacked, module),
            lora_delta(shared, module) + lora_delta(personal, module),
            rtol=1e-5,
            atol=1e-6,
        )


def test_stacked_adapter_equals_both_adapters_active(
    adapters: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The one stacked PEFT adapter computes what shared + personal compute together."""
    stacked_dir = write_adapter(
        stack(read_adapter(adapters["shared"]), read_adapter(adapters["personal"])),
        tmp_path / "stacked",
    )
    base_logits = _logits(_base(tiny_model_dir))

    # Reference 1: peft with both original adapters active at once. peft 0.21's LoRA Linear
    # forward adds the update of every active adapter (a list via the tuner's set_adapter).
    both = PeftModel.from_pretrained(
        _base(tiny_model_dir), adapters["shared"], adapter_name="shared"
    )
    both.load_adapter(adapters["personal"], adapter_name="personal")
    both.base_model.set_adapter(["shared", "personal"])
    both.eval()
    assert both.base_model.active_adapters == ["shared", "personal"]
    both_logits = _logits(both)

    # Reference 2: patch the base weights by hand from the raw files (no llmrec, no peft).
    manual = _base(tiny_model_dir)
    params = dict(manual.named_parameters())
    for name in ("shared", "personal"):
        cfg = json.loads((adapters[name] / ADAPTER_CONFIG).read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        raw = load_file(adapters[name] / ADAPTER_WEIGHTS)
        for key, a in raw.items():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = raw[key.replace("lora_A", "lora_B")]
                with torch.no_grad():
                    params[f"{module}.weight"] += scale * (b @ a)
    manual_logits = _logits(manual)

    stacked_logits = _logits(PeftModel.from_pretrained(_base(tiny_model_dir), stacked_dir).eval())

    assert (stacked_logits - both_logits).abs().max().item() < 1e-5
    assert (stacked_logits - manual_logits).abs().max().item() < 1e-5
    # The base is untouched by all of this, and the adapters really change the outputs.
    assert torch.equal(_logits(_base(tiny_model_dir)), base_logits)
    assert (stacked_logits - base_logits).abs().max().item() > 1e-2


def test_stack_keeps_dtype(adapters: dict[str, Path]) -> None:
    def bf16(w: LoraWeights) -> LoraWeights:
        state = {k: v.to(torch.bfloat16) for k, v in w.state.items()}
        return LoraWeights(state, w.r, w.alpha, w.target_modules, w.base_model)

    stacked = stack(
        bf16(read_adapter(adapters["shared"])), bf16(read_adapter(adapters["personal"]))
    )
    assert {t.dtype for t in stacked.state.values()} == {torch.bfloat16}


def test_stack_rejects_mismatches(
    adapters: dict[str, Path], tiny_model_dir: Path, tmp_path
) -> None:
    shared = read_adapter(adapters["shared"])
    other_targets = read_adapter(
        _make_peft_adapter(
            tiny_model_dir, tmp_path / "qv", r=2, alpha=4, seed=5, targets=["q_proj"]
        )
    )
    with pytest.raises(ValueError, match="target modules differ"):
        stack(shared, other_targets)

    # Same targets, but only layer 0 carries tensors.
    personal = read_adapter(adapters["personal"])
    layer0 = {k: v for k, v in personal.state.items() if ".layers.0." in k}
    partial = LoraWeights(layer0, 2, 7.0, personal.target_modules, shared.base_model)
    with pytest.raises(ValueError, match="adapted modules differ"):
        stack(shared, partial)
    # Same modules, but recorded for another base model.
    elsewhere = LoraWeights(personal.state, 2, 7.0, personal.target_modules, "other-base")
    with pytest.raises(ValueError, match="base models differ"):
        stack(shared, elsewhere)


# --------------------------------------------------------------------------- refusals


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_read_refuses_pickled_weights(adapters: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_bytes((adapters["shared"] / ADAPTER_CONFIG).read_bytes())
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterValidationError, match="pickled"):
        read_adapter(folder)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("use_dora", True, "DoRA"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("bias", "all", "bias"),
        ("peft_type", "IA3", "peft_type"),
        ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
        ("r", 0, "positive integer"),
    ],
)
def test_read_refuses_unsupported_configs(
    adapters: dict[str, Path], tmp_path: Path, field: str, value, match: str
) -> None:
    folder = _copy_adapter(adapters["shared"], tmp_path / "bad")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config[field] = value
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(AdapterValidationError, match=match):
        read_adapter(folder)


def test_read_refuses_unknown_tensors_and_wrong_rank(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    folder = _copy_adapter(adapters["shared"], tmp_path / "dora-tensors")
    state = load_file(folder / ADAPTER_WEIGHTS)
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(
        128
    )
    save_file(state, folder / ADAPTER_WEIGHTS)
    with pytest.raises(AdapterValidationError, match="unsupported tensor keys"):
        read_adapter(folder)

    folder = _copy_adapter(adapters["shared"], tmp_path / "rank")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config["r"] = 3  # the tensors have rank 4
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(AdapterValidationError, match="rank 3"):
        read_adapter(folder)
