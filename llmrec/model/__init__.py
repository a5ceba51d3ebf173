"""The foundation model: loading (GGUF, any HF causal LM, 4/8-bit), fingerprints, tiny model.

Contract: everything downstream (peft, vLLM, the trainer) sees a *plain Hugging Face
folder*; `gguf` builds one from the packaged GGUF, `tiny` builds a small one for tests,
`load` resolves a config's model name and loads it, `fingerprint` names a folder by content.
"""

from .constants import (
    BASE_MODEL_ALIAS,
    FORMAT_VERSION,
    GGUF_HASH_CACHE_FILE,
    MARKER_FILE,
    MODEL_CONFIG,
)
from .fingerprint import (
    file_identity,
    fingerprint_model_dir,
)
from .gguf import (
    PACKAGED_GGUF_NAME,
    default_cache_dir,
    packaged_gguf_path,
    prepare_base_model,
    prepared_dir_if_ready,
    save_hf_folder,
    write_marker,
)
from .load import (
    DTYPES,
    QUANTIZATIONS,
    Quantization,
    attach_adapter,
    auto_dtype,
    load_base,
    load_model,
    resolve_model_path,
)
from .tiny import (
    build_tiny_model,
)
from .tokenizer import (
    ensure_pad_token,
    load_tokenizer,
    tokenizer_from_gguf,
)

__all__ = [
    "BASE_MODEL_ALIAS",
    "DTYPES",
    "FORMAT_VERSION",
    "GGUF_HASH_CACHE_FILE",
    "MARKER_FILE",
    "MODEL_CONFIG",
    "PACKAGED_GGUF_NAME",
    "QUANTIZATIONS",
    "Quantization",
    "attach_adapter",
    "auto_dtype",
    "build_tiny_model",
    "default_cache_dir",
    "ensure_pad_token",
    "file_identity",
    "fingerprint_model_dir",
    "load_base",
    "load_model",
    "load_tokenizer",
    "packaged_gguf_path",
    "prepare_base_model",
    "prepared_dir_if_ready",
    "resolve_model_path",
    "save_hf_folder",
    "tokenizer_from_gguf",
    "write_marker",
]
