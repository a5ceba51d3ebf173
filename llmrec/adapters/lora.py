"""LoRA adapters as plain tensors: read and write PEFT folders, stack shared + personal.

Contract: an adapter on disk is a *plain PEFT LoRA folder* (``adapter_config.json`` +
``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` and vLLM load as they are.
In memory it is a :class:`LoraWeights`: the saved state dict (keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``, no adapter name) plus
the few config fields that give the tensors their meaning. Only the subset of PEFT that every
LoRA engine serves is representable: no DoRA, no LoRA bias, no ``modules_to_save``, no
per-module ranks. Anything else is refused with an :class:`AdapterValidationError` rather than
silently dropped. Pickled weights (``adapter_model.bin``) are never read.

Stacking (``docs/design.md``, "Flow of data"): federated training gives each user a shared LoRA
``(A_s, B_s, scale s_s)`` and a personal one ``(A_p, B_p, s_p)`` on the same modules. Their
summed update ``s_s B_s A_s + s_p B_p A_p`` equals ``B' A'`` with
``B' = [s_s B_s | s_p B_p]`` (columns) and ``A' = [A_s ; A_p]`` (rows), a single LoRA of rank
``r_s + r_p`` whose ``lora_alpha = r_s + r_p`` makes its own scale 1. So one standard adapter
per user serves exactly what the two adapters compute together.

This module knows nothing about the store layout, manifests or the base model's weights.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmrec.adapters.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX, PICKLE_WEIGHTS
from llmrec.atomic import write_atomic

logger = logging.getLogger(__name__)

_KEY_RE = re.compile(rf"^{re.escape(KEY_PREFIX)}(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")

# Config fields whose non-default value changes what the tensors mean (or adds tensors) in a
# way LoraWeights cannot represent and vLLM does not serve. Value: the accepted "off" values.
_UNSUPPORTED_FEATURES: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "lora_bias": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layer_replication": (None,),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "fan_in_fan_out": (False, None),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
}


class AdapterValidationError(ValueError):
    """An adapter folder that must not be loaded or served; ``reason`` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True, eq=False)  # eq on tensor dicts is ambiguous: use state_equal
class LoraWeights:
    """One LoRA adapter in PEFT's saved format, held in memory.

    ``state`` maps ``base_model.model.<module path>.lora_{A,B}.weight`` to tensors: ``lora_A``
    is ``(r, in_features)`` and ``lora_B`` is ``(out_features, r)``, so a module's update is
    ``scale * B @ A``. ``target_modules`` are the module-name suffixes PEFT matches (e.g.
    ``"q_proj"``); ``base_model`` is the ``base_model_name_or_path`` recorded in the config.
    """

    state: dict[str, torch.Tensor]
    r: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str

    @classmethod
    def random(
        cls,
        module_shapes: Mapping[str, tuple[int, int]],
        target_modules: tuple[str, ...],
        r: int,
        seed: int,
        base_model: str,
        std: float = 0.5,
        alpha: float | None = None,
    ) -> LoraWeights:
        """Seeded random A and B for every targeted module, for tests and benchmarks.

        ``module_shapes`` maps module paths to ``(out_features, in_features)`` (as
        ``module_shapes_for`` gives them); modules are drawn in sorted order, A then B, so a
        seed always gives the same adapter. ``alpha`` defaults to ``2 * r`` (scale 2).
        """
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for module, (out_f, in_f) in sorted(module_shapes.items()):
            if module.rsplit(".", 1)[-1] in target_modules:
                state[f"{KEY_PREFIX}{module}.lora_A.weight"] = (
                    torch.randn(r, in_f, generator=gen) * std
                )
                state[f"{KEY_PREFIX}{module}.lora_B.weight"] = (
                    torch.randn(out_f, r, generator=gen) * std
                )
        return cls(
            state, r, float(2 * r if alpha is None else alpha), tuple(target_modules), base_model
        )

    def __post_init__(self) -> None:
        # Checked once here so every function below can trust the shapes.
        if self.r < 1:
            raise ValueError(f"rank must be >= 1, got {self.r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("target_modules is empty")
        if not self.state:
            raise ValueError("the adapter holds no tensors")
        parts: dict[str, set[str]] = {}
        for key, tensor in self.state.items():
            m = _KEY_RE.match(key)
            if m is None:
                raise ValueError(f"not a PEFT LoRA weight key: {key!r}")
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
                raise ValueError(f"{key}: expected a 2-d tensor")
            if not tensor.is_floating_point():
                raise ValueError(f"{key}: expected a floating-point tensor, got {tensor.dtype}")
            parts.setdefault(m["module"], set()).add(m["part"])
        for module, seen in parts.items():
            if seen != {"lora_A", "lora_B"}:
                raise ValueError(f"module {module!r} lacks {sorted({'lora_A', 'lora_B'} - seen)}")
            a, b = self.pair(module)
            if a.shape[0] != self.r or b.shape[1] != self.r:
                raise ValueError(
                    f"module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                    f"do not have rank {self.r}"
                )
            if not matches_targets(module, self.target_modules):
                raise ValueError(f"module {module!r} is not one of {list(self.target_modules)}")

    @property
    def scale(self) -> float:
        """The factor PEFT multiplies ``B @ A`` by: ``lora_alpha / r``."""
        return self.alpha / self.r

    @property
    def modules(self) -> tuple[str, ...]:
        """Module paths (as in the base model's ``named_modules``) that carry an update."""
        return tuple(sorted({_KEY_RE.match(k)["module"] for k in self.state}))  # type: ignore[index]

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A, lora_B)`` of one module, given its path or its full key prefix."""
        module = module.removeprefix(KEY_PREFIX)
        try:
            return (
                self.state[f"{KEY_PREFIX}{module}.lora_A.weight"],
                self.state[f"{KEY_PREFIX}{module}.lora_B.weight"],
            )
        except KeyError:
            raise KeyError(f"no LoRA weights for module {module!r}") from None


def matches_targets(module: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of targets: the module name equals one or ends with ``.<one>``."""
    return any(module == t or module.endswith(f".{t}") for t in targets)


def lora_delta(weights: LoraWeights, module_key: str) -> torch.Tensor:
    """The weight update ``scale * B @ A`` (``(out, in)``, float32) of one module.

    ``module_key`` is the module path (``model.layers.0.self_attn.q_proj``) or the same with
    PEFT's ``base_model.model.`` prefix. Computed in float32 so tests compare exact algebra.
    """
    a, b = weights.pair(module_key)
    return weights.scale * (b.float() @ a.float())


# --------------------------------------------------------------------------- reading


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a folder, checked for everything that needs no tensors.

    Raises :class:`AdapterValidationError` unless it is a plain LoRA config (``peft_type``
    LORA, no DoRA, no ``modules_to_save``, ``bias == "none"``, no per-module ranks, a positive
    integer ``r`` and a positive ``lora_alpha``).
    """
    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterValidationError(path, f"no {ADAPTER_CONFIG}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterValidationError(path, f"unreadable {ADAPTER_CONFIG}: {e}") from e
    if not isinstance(config, dict):
        raise AdapterValidationError(path, f"{ADAPTER_CONFIG} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterValidationError(
            path, f"peft_type must be 'LORA', got {config.get('peft_type')!r}"
        )
    if config.get("use_dora"):
        raise AdapterValidationError(path, "DoRA adapters are not supported (use_dora=true)")
    if config.get("modules_to_save"):
        raise AdapterValidationError(
            path, f"modules_to_save is not supported: {config.get('modules_to_save')!r}"
        )
    if config.get("bias", "none") != "none":
        raise AdapterValidationError(path, f"bias must be 'none', got {config.get('bias')!r}")
    for field, off_values in _UNSUPPORTED_FEATURES.items():
        if field in config and config[field] not in off_values:
            raise AdapterValidationError(
                path, f"unsupported LoRA feature {field}={config[field]!r}"
            )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterValidationError(path, f"r must be a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        raise AdapterValidationError(path, f"lora_alpha must be a positive number, got {alpha!r}")
    return config


def _target_modules(path: Path, config: dict[str, Any], modules: list[str]) -> tuple[str, ...]:
    """The config's target modules as a sorted tuple of name suffixes.

    A regex string (PEFT allows one) is replaced by the leaf names of the modules that carry
    tensors: that is what the weights actually cover, and a list is what every engine reads.
    """
    targets = config.get("target_modules")
    if isinstance(targets, str):
        regex = re.compile(targets)
        if not all(regex.fullmatch(m) for m in modules):
            raise AdapterValidationError(path, f"tensor modules do not match {targets!r}")
        return tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterValidationError(path, f"target_modules must be a list of names: {targets!r}")
    return tuple(sorted(set(targets)))


def read_adapter(path: str | Path, weights_bytes: bytes | None = None) -> LoraWeights:
    """Read a PEFT LoRA folder (safetensors only) into :class:`LoraWeights`; the weights
    from ``weights_bytes`` when given (the file's content, already read and hashed).

    Raises :class:`AdapterValidationError` for anything that is not a plain LoRA: a pickled
    ``adapter_model.bin`` (never unpickled), DoRA, LoRA bias, ``modules_to_save``, per-module
    ranks, unknown tensor keys or ranks that disagree with ``r``. rsLoRA (scale
    ``alpha/sqrt(r)``) is folded into an equivalent plain ``alpha`` so the update is unchanged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    path = Path(path)
    config = read_adapter_config(path)
    weights_file = path / ADAPTER_WEIGHTS
    if weights_bytes is None and not weights_file.is_file():
        if (path / PICKLE_WEIGHTS).exists():
            raise AdapterValidationError(
                path, f"only {ADAPTER_WEIGHTS} is accepted; refusing pickled {PICKLE_WEIGHTS}"
            )
        raise AdapterValidationError(path, f"no {ADAPTER_WEIGHTS}")
    try:
        state = load(weights_bytes) if weights_bytes is not None else load_file(weights_file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterValidationError(path, f"unreadable {ADAPTER_WEIGHTS}: {e}") from e

    bad = sorted(k for k in state if not _KEY_RE.match(k))
    if bad:
        # lora_magnitude_vector (DoRA), lora_B.bias, lora_embedding_A/B, modules_to_save copies.
        raise AdapterValidationError(path, f"unsupported tensor keys, e.g. {bad[:3]}")
    modules = sorted({_KEY_RE.match(k)["module"] for k in state})  # type: ignore[index]
    r = config["r"]
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # alpha'/r == alpha/sqrt(r): same update, plain scaling
    try:
        return LoraWeights(
            state=state,
            r=r,
            alpha=alpha,
            target_modules=_target_modules(path, config, modules),
            base_model=str(config.get("base_model_name_or_path") or ""),
        )
    except ValueError as e:
        raise AdapterValidationError(path, str(e)) from e


# --------------------------------------------------------------------------- writing


def adapter_config_dict(weights: LoraWeights) -> dict[str, Any]:
    """The ``adapter_config.json`` content for ``weights``: peft's own LoraConfig, serialized.

    Built through ``peft.LoraConfig`` so every field peft and vLLM expect is there with
    peft's defaults; sets become sorted lists so the file's bytes (and sha256) are stable.
    """
    from peft import LoraConfig

    alpha: int | float = int(weights.alpha) if float(weights.alpha).is_integer() else weights.alpha
    config = LoraConfig(
        r=weights.r,
        lora_alpha=alpha,
        target_modules=list(weights.target_modules),
        lora_dropout=0.0,
        bias="none",
        use_dora=False,
        use_rslora=False,
        modules_to_save=None,
        task_type="CAUSAL_LM",
        base_model_name_or_path=weights.base_model or None,
        inference_mode=True,
    )
    out: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        elif hasattr(value, "value") and isinstance(value.value, str):  # PeftType/TaskType enums
            value = value.value
        out[key] = value
    return out


def write_adapter(weights: LoraWeights, path: str | Path) -> Path:
    """Write ``weights`` as a plain PEFT LoRA folder at ``path`` (created if missing).

    Each file is replaced atomically, but the folder as a whole is not: publish through
    :class:`llmrec.adapters.AdapterStore` when readers may be looking.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Own, contiguous CPU copies: safetensors refuses views and tensors that share storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.state.items()}
    write_atomic(
        path / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    text = json.dumps(adapter_config_dict(weights), indent=2, sort_keys=True) + "\n"
    write_atomic(path / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(text, "utf-8"))
    return path


# --------------------------------------------------------------------------- stacking


def stack(shared: LoraWeights, personal: LoraWeights) -> LoraWeights:
    """One LoRA whose update is the sum of ``shared``'s and ``personal``'s, exactly.

    Rank ``r_s + r_p``, ``lora_alpha = r_s + r_p`` (scale 1), ``B' = [s_s B_s | s_p B_p]``,
    ``A' = [A_s ; A_p]``. Both adapters must cover the same modules with the same target list
    and name the same base; tensors keep their common dtype (scaling is done in float32).
    """
    if set(shared.target_modules) != set(personal.target_modules):
        raise ValueError(
            f"target modules differ: shared {list(shared.target_modules)} vs "
            f"personal {list(personal.target_modules)}"
        )
    if shared.modules != personal.modules:
        only_s = sorted(set(shared.modules) - set(personal.modules))
        only_p = sorted(set(personal.modules) - set(shared.modules))
        raise ValueError(f"adapted modules differ: only shared {only_s}, only personal {only_p}")
    if shared.base_model != personal.base_model:
        # The name is all we can compare here; manifests compare base fingerprints.
        raise ValueError(
            f"base models differ: shared {shared.base_model!r} vs personal {personal.base_model!r}"
        )
    state: dict[str, torch.Tensor] = {}
    for module in shared.modules:
        a_s, b_s = shared.pair(module)
        a_p, b_p = personal.pair(module)
        if a_s.shape[1] != a_p.shape[1] or b_s.shape[0] != b_p.shape[0]:
            raise ValueError(
                f"module {module!r}: shapes differ (shared A {tuple(a_s.shape)}, B "
                f"{tuple(b_s.shape)}; personal A {tuple(a_p.shape)}, B {tuple(b_p.shape)})"
            )
        dtype = torch.promote_types(
            torch.promote_types(a_s.dtype, a_p.dtype), torch.promote_types(b_s.dtype, b_p.dtype)
        )
        # The scales go into B (not A) so that A' is the plain row stack of the two A's.
        b = torch.cat([shared.scale * b_s.float(), personal.scale * b_p.float()], dim=1)
        state[f"{KEY_PREFIX}{module}.lora_A.weight"] = torch.cat([a_s, a_p], dim=0).to(dtype)
        state[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.to(dtype)
    rank = shared.r + personal.r
    return LoraWeights(
        state=state,
        r=rank,
        alpha=float(rank),
        target_modules=tuple(sorted(set(shared.target_modules))),
        base_model=shared.base_model,
    )


def state_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """True when two state dicts hold the same keys with bit-identical tensors."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )
