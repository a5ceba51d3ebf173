"""The check every adapter passes before it is stored or served, and the base shapes it needs.

vLLM may only fail on a bad adapter at the first generation and take the engine down, so
everything the store writes or reads back goes through :func:`validate_adapter` first.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from llmrec.adapters.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST
from llmrec.adapters.lora import (
    AdapterValidationError,
    LoraWeights,
    matches_targets,
    read_adapter,
    read_adapter_config,
)
from llmrec.adapters.manifest import AdapterManifest, read_manifest

_NUMPY_FLOATS = frozenset({torch.float16, torch.float32, torch.float64})
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


def module_shapes_for(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """``{module path: (out_features, in_features)}`` of a base model's linear layers.

    Built on the meta device from ``config.json`` alone (no weights are read), so it is cheap
    even for large bases. Keys are module paths as they appear in PEFT keys after
    ``base_model.model.``, e.g. ``model.layers.0.self_attn.q_proj``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
        elif type(module).__name__ == "Conv1D":  # GPT-2 style: weight stored as (in, out)
            in_features, out_features = module.weight.shape
            shapes[name] = (int(out_features), int(in_features))
    return shapes


def validate_adapter(
    path: str | Path,
    module_shapes: Mapping[str, tuple[int, int]] | None,
    max_rank: int,
    base_fingerprint: str | None = None,
    *,
    require_manifest: bool = False,
) -> LoraWeights:
    """Check that a folder is an adapter vLLM and peft can serve safely; return its weights.

    Raises :class:`AdapterValidationError` naming the first problem: not a plain LoRA (see
    :func:`llmrec.adapters.read_adapter_config`), ``r > max_rank``, a pickle file in the
    folder, a manifest whose sha256s do not match the files or whose rank/alpha/targets
    disagree with the config, tensor modules that do not match ``target_modules``, shapes
    that do not fit ``module_shapes`` (``(out, in)`` per module path; skipped when None),
    non-finite values, or a manifest fingerprint other than ``base_fingerprint`` (skipped
    when None). A folder without ``manifest.json`` passes only if neither
    ``require_manifest`` nor ``base_fingerprint`` is set. Files are hashed before they are
    parsed, and tensors are read last, from the very bytes that were hashed: nothing can
    swap the file between the check and the parse, and a cold load reads it once.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterValidationError(path, "not a folder")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise AdapterValidationError(path, f"pickle files are never loaded: {pickles}")
    manifest, hashed = _hashed_manifest(
        path, required=require_manifest or base_fingerprint is not None
    )
    if base_fingerprint is not None and manifest is not None:
        if manifest.base_fingerprint != base_fingerprint:
            raise AdapterValidationError(
                path,
                f"trained on base {manifest.base_fingerprint[:12]}, "
                f"but the served base is {base_fingerprint[:12]}",
            )

    config = read_adapter_config(path)
    if config["r"] > max_rank:
        raise AdapterValidationError(path, f"rank {config['r']} exceeds max_rank {max_rank}")

    weights = read_adapter(path, hashed.get(ADAPTER_WEIGHTS))
    if manifest is not None:
        _check_manifest_fits(path, manifest, weights)
    _check_modules(path, weights, module_shapes)
    for key, tensor in weights.state.items():
        if not _finite(tensor):
            raise AdapterValidationError(path, f"non-finite values in {key}")
    return weights


def _finite(tensor: torch.Tensor) -> bool:
    """Every value finite. numpy's check costs a few microseconds a call against torch's
    tens: an adapter has hundreds of tensors, and this runs on every cold load."""
    if tensor.dtype in _NUMPY_FLOATS:
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


def _hashed_manifest(path: Path, required: bool) -> tuple[AdapterManifest | None, dict[str, bytes]]:
    """The folder's manifest once every file it lists matches its sha256 (None if absent),
    and those files' bytes as hashed.

    Hashing comes before parsing anything else: a tampered file is refused without being read.
    """
    if not (path / MANIFEST).exists():
        if required:
            raise AdapterValidationError(path, f"no {MANIFEST}")
        return None, {}
    manifest = read_manifest(path)
    hashed: dict[str, bytes] = {}
    for name, digest in sorted(manifest.files.items()):
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            raise AdapterValidationError(path, f"{name} listed in {MANIFEST} is missing") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise AdapterValidationError(path, f"sha256 mismatch for {name}")
        hashed[name] = data
    return manifest, hashed


def _check_manifest_fits(path: Path, manifest: AdapterManifest, weights: LoraWeights) -> None:
    """The manifest describes these weights: same rank, alpha, targets and base name."""
    if (
        manifest.rank != weights.r
        or not math.isclose(manifest.alpha, weights.alpha, rel_tol=1e-9)
        or sorted(set(manifest.target_modules)) != list(weights.target_modules)
        or manifest.base_model != weights.base_model
    ):
        raise AdapterValidationError(path, f"{MANIFEST} disagrees with {ADAPTER_CONFIG}")


def _check_modules(
    path: Path, weights: LoraWeights, module_shapes: Mapping[str, tuple[int, int]] | None
) -> None:
    """Every target module carries tensors, and they fit the base when its shapes are given.

    With ``module_shapes`` the tensors must cover exactly the base's targeted layers, each
    at its ``(out, in)`` and the adapter's rank.
    """
    modules = set(weights.modules)
    unused = [
        t for t in weights.target_modules if not any(matches_targets(m, (t,)) for m in modules)
    ]
    if unused:
        raise AdapterValidationError(path, f"target modules without tensors: {unused}")
    if module_shapes is None:
        return
    expected = {m for m in module_shapes if matches_targets(m, weights.target_modules)}
    if modules != expected:
        extra, missing = sorted(modules - expected), sorted(expected - modules)
        raise AdapterValidationError(
            path,
            f"tensor modules do not match the base's targeted modules "
            f"(not in base: {extra[:3]}, without tensors: {missing[:3]})",
        )
    for module in sorted(modules):
        out_f, in_f = module_shapes[module]
        a, b = weights.pair(module)
        if tuple(a.shape) != (weights.r, in_f) or tuple(b.shape) != (out_f, weights.r):
            raise AdapterValidationError(
                path,
                f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"a ({out_f}, {in_f}) layer at rank {weights.r}",
            )
