"""Loading a causal LM for this project: name resolution, dtype, 4-bit/8-bit, adapters.

A config names a model by the packaged alias, a ``.gguf`` file, a local HF folder or a hub
id; :func:`resolve_model_path` turns each into what ``from_pretrained`` and vLLM accept. This
module never downloads: a hub id is passed through and only loads if it is already in the
local HF cache (or the hub is allowed).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmrec.model.constants import BASE_MODEL_ALIAS
from llmrec.model.gguf import prepare_base_model
from llmrec.model.tokenizer import load_tokenizer

if TYPE_CHECKING:  # heavy imports stay lazy so `import llmrec` is fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmrec.config import AppConfig

logger = logging.getLogger(__name__)

Quantization = Literal["none", "nf4", "int8"]
QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "int8")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


def resolve_model_path(name_or_path: str, cache_dir: Path | None = None) -> str:
    """Map a config's model name to something ``from_pretrained`` and vLLM accept.

    - ``"smollm2-135m-instruct"`` -> the prepared cache folder (built on first use);
    - a ``.gguf`` file -> its prepared cache folder;
    - an existing local folder -> its absolute path;
    - anything else -> returned unchanged as a hub id (loads offline only if already cached).
    """
    if name_or_path == BASE_MODEL_ALIAS:
        return str(prepare_base_model(cache_dir=cache_dir))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(prepare_base_model(cache_dir=cache_dir, gguf_path=path))
    if path.is_dir():
        return os.path.abspath(path)
    # Something that can only be a path (hub ids are "org/name") but does not exist: say so
    # here rather than let the hub client report a confusing "repo not found".
    if name_or_path.startswith(("/", "./", "../", "~")) or path.suffix == ".gguf":
        raise FileNotFoundError(f"model path does not exist: {name_or_path}")
    return name_or_path


def auto_dtype(device: str = "cpu") -> str:
    """bfloat16 where the hardware computes it natively, float32 elsewhere.

    On CPUs without AVX512-BF16/AMX, bfloat16 matmuls are emulated and slower than
    float32; where they exist, bfloat16 is several times faster for training and decoding.
    """
    import torch

    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


def _torch_dtype(dtype: str, device: str = "cpu") -> Any:
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return getattr(torch, auto_dtype(device) if dtype == "auto" else dtype)


def _quantization_config(quantization: str, compute_dtype: Any) -> Any:
    """The ``BitsAndBytesConfig`` for a quantization name (None for ``"none"``)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        # QLoRA's recipe: NF4 storage, matmuls in the compute dtype.
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    # LLM.int8(): on CPU bitsandbytes casts fp32 inputs to fp16 for the int8 matmul (it warns).
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(
    name_or_path: str,
    quantization: Quantization = "none",
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, optionally 4-bit NF4 or 8-bit via bitsandbytes.

    ``name_or_path`` goes through :func:`resolve_model_path` (so the alias works). ``dtype``
    is the weight dtype for unquantized loads and the compute dtype for NF4. bitsandbytes
    0.50 has a CPU backend, so ``nf4``/``int8`` also work with ``device="cpu"``. The
    tokenizer comes from :func:`load_tokenizer` (left padding, pad token set).
    """
    import torch
    from transformers import AutoModelForCausalLM

    # Validate every argument before touching the disk, and name the offending field.
    if quantization not in QUANTIZATIONS:  # checked first: the most likely config typo
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    torch_dtype = _torch_dtype(dtype, device)
    quant_config = _quantization_config(quantization, torch_dtype)
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device must be a torch device string such as 'cpu' or 'cuda:0', got {device!r}"
        ) from e

    path = resolve_model_path(name_or_path, cache_dir=cache_dir)
    logger.info(
        "loading %s (quantization=%s, dtype=%s, device=%s)", path, quantization, dtype, device
    )
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype,
        quantization_config=quant_config,
        # bitsandbytes needs a device_map; {"": device} puts the whole model on one device.
        device_map={"": device},
    )
    tokenizer = load_tokenizer(path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


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
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    # Merging is exact for full-precision bases and removes the LoRA overhead at inference;
    # a quantized base cannot absorb the update, so it keeps the adapter as a side branch.
    quantized = getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None)
    return peft_model.merge_and_unload() if merge and not quantized else peft_model
