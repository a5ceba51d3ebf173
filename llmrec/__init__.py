"""llmrec: a personal, federated, generative recommender.

The core library: data, prompts, the base model, recommendation (trie-constrained
decoding, grounding, baselines, metrics), centralized and federated LoRA training, the
adapter store, the personal agent and the evaluation protocol. It imports neither the
serving application nor a federation framework: ``llmrec_serving`` and ``training/``
build on it, never the reverse. docs/design.md is the map.
"""

__version__ = "0.1.0"
