"""The served foundation model with 4-bit weights (W4A16): what vLLM's CPU kernels run.

The quantized version of a model folder has every linear layer's weight as 4-bit integers
with one scale per group of 32 input columns (symmetric round-to-nearest, no calibration data
needed) and computes in the engine's dtype; everything else (embeddings, the tied output head
with the item rows, norms) stays as it was. The format is compressed-tensors'
``pack-quantized`` with its ``W4A16`` preset, which vLLM loads with ``quant_method:
compressed-tensors`` and runs with its CPU kernel for 4-bit weights. A LoRA trained on the
source folder is served on top unchanged: the version's marker names the source's
fingerprint (:func:`adapter_fingerprint`).

Why a writer of our own: llm-compressor, the ecosystem's tool for this, pins transformers and
compressed-tensors versions that the vLLM CPU build cannot share. The scales, rounding and
packing are compressed-tensors' own. (Its int8 ``W8A8`` preset is what vLLM's CPU int8
kernels run, but without AMX they release the weight that vLLM's LoRA layers read, so an
engine with LoRA on it does not start.)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from llmrec.model.constants import MARKER_FILE, MODEL_CONFIG
from llmrec.model.fingerprint import fingerprint_model_dir

QUANTIZED_KIND = "quantized-version"
PRESET = "W4A16"
FORMAT = "pack-quantized"
GROUP_SIZE = 32
_WEIGHTS = "model.safetensors"


def quantized_version_dir(src: str | Path) -> Path:
    """Where the quantized version of ``src`` is cached (beside it)."""
    src = Path(src)
    return src.parent / f"{src.name}+{PRESET.lower()}"


def _marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER_FILE).read_text("utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


def adapter_fingerprint(model_dir: str | Path) -> str:
    """The fingerprint of the base an adapter served on ``model_dir`` must have been trained
    on: the source's for a quantized version, else the folder's own."""
    marker = _marker(Path(model_dir))
    if marker.get("kind") == QUANTIZED_KIND:
        return str(marker["source_fingerprint"])
    return fingerprint_model_dir(model_dir)


def _scheme():
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(PRESET, ["Linear"])
    # The preset's groups of 128 do not divide SmolLM2's width (576); 32 is the packaged
    # GGUF's own block size.
    scheme.weights = scheme.weights.model_copy(update={"group_size": GROUP_SIZE})
    return scheme


def quantize_linear(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear weight (out, in) under the preset (``weight_packed``,
    ``weight_scale``, ``weight_shape``), without their module prefix."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = _scheme()
    args = scheme.weights
    w = weight.float()
    groups = w.view(w.shape[0], -1, args.group_size)  # (out, in / group, group)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    state = {"weight": w, "weight_scale": scale.float(), "weight_zero_point": zero_point}
    return BaseCompressor.load_from_registry(FORMAT).compress(state, scheme)


def dequantize_linear(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float weight that :func:`quantize_linear`'s tensors stand for."""
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.load_from_registry(FORMAT).decompress(dict(stored), _scheme())["weight"]


def use_quantized_weights(model: torch.nn.Module) -> int:
    """Set every base linear weight of ``model`` in place to the value its 4-bit version
    stands for (LoRA's own layers and the output head untouched): the library then computes
    what the served 4-bit model does, to measure its quality. Returns how many it set."""
    count = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or "lora_" in name:
                continue
            if name.endswith("lm_head"):
                continue
            stored = quantize_linear(module.weight)
            module.weight.copy_(dequantize_linear(stored).to(module.weight.dtype))
            count += 1
    return count


def _linear_weights(src: Path) -> set[str]:
    """The state-dict keys of ``src``'s linear layers (the output head excluded)."""
    from llmrec.adapters.validate import module_shapes_for

    return {f"{m}.weight" for m in module_shapes_for(src) if m != "lm_head"}


def write_quantized_version(src: str | Path, dst: str | Path) -> Path:
    """Write the quantized version of the model folder ``src`` into the new folder ``dst``."""
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file, save_file

    from llmrec.model.gguf import write_marker

    src, dst = Path(src), Path(dst)
    weight_files = sorted(src.glob("*.safetensors"))
    if [f.name for f in weight_files] != [_WEIGHTS]:
        raise ValueError(f"{src}: expected one {_WEIGHTS}, found {[f.name for f in weight_files]}")
    dst.mkdir(parents=True)
    linear = _linear_weights(src)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(src / _WEIGHTS).items():
        if key in linear:
            prefix = key.removesuffix("weight")
            out |= {prefix + name: t.contiguous() for name, t in quantize_linear(tensor).items()}
        else:
            out[key] = tensor.contiguous()
    save_file(out, dst / _WEIGHTS, metadata={"format": "pt"})
    config = json.loads((src / MODEL_CONFIG).read_text("utf-8"))
    quant = QuantizationConfig(
        config_groups={"group_0": _scheme()},
        format=FORMAT,
        ignore=["lm_head"],
        quantization_status="compressed",
    )
    config["quantization_config"] = quant.model_dump(exclude_none=True)
    (dst / MODEL_CONFIG).write_text(json.dumps(config, indent=2), "utf-8")
    for other in src.iterdir():
        copied = other.suffix != ".safetensors" and other.name not in (MODEL_CONFIG, MARKER_FILE)
        if other.is_file() and copied:
            shutil.copy2(other, dst / other.name)
    source = _marker(src)
    marker = {k: v for k, v in source.items() if k != "model_fingerprint"} | {
        "kind": QUANTIZED_KIND,
        "preset": PRESET,
        "source_kind": source.get("kind"),
        "source_fingerprint": adapter_fingerprint(src),
    }
    write_marker(dst, marker)  # last: it certifies the folder
    return dst


def prepare_quantized_version(src: str | Path) -> Path:
    """The quantized version of ``src``, built once beside it and reused while ``src`` is
    the same (a changed source is rebuilt)."""
    src = Path(src)
    final = quantized_version_dir(src)
    if final.is_dir() and _marker(final).get("source_fingerprint") == adapter_fingerprint(src):
        return final
    with tempfile.TemporaryDirectory(dir=src.parent, prefix=f".{src.name}-quantized-") as tmp:
        built = write_quantized_version(src, Path(tmp) / "version")
        if final.exists():
            shutil.rmtree(final)
        built.rename(final)
    return final
