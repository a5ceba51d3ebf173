"""Every name an adapter folder or the adapter store puts on disk, defined once.

A stored version is a plain PEFT LoRA folder (``ADAPTER_CONFIG`` + ``ADAPTER_WEIGHTS``) plus
the store's ``MANIFEST``; the store's layout is described in `llmrec.adapters.store`.
"""

from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
"""PEFT's adapter config file."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""PEFT's adapter weights file, the only weights format read."""
PICKLE_WEIGHTS = "adapter_model.bin"
"""PEFT's legacy pickled weights: never loaded (unpickling runs arbitrary code)."""
KEY_PREFIX = "base_model.model."
"""Prefix of every tensor key in a saved PEFT causal-LM adapter (vLLM relies on it too)."""

MANIFEST = "manifest.json"
"""The store's record of one version: owner, base fingerprint, file hashes."""
CURRENT = "CURRENT"
"""In a user folder: a text file naming the current version folder (``v0002``)."""
LOCK_FILE = ".lock"
"""In a user folder: the flock target that serializes that user's writers."""
SHARED_ID = "_shared"
"""Reserved id of the shared adapter; user ids cannot start with ``_`` so never collide."""
TMP_PREFIX = ".tmp-"
"""Hidden temp folders of writers in progress (or crashed); readers never list them."""
TOMBSTONE_PREFIX = ".deleted-"
"""A deleted user's folder, renamed in one step before it is removed."""
DEFAULT_ROOT = Path("adapters")
"""The store's root folder when none is given."""
