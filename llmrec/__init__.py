"""llmrec: a personal, federated, generative recommender.

The core library: data, prompts, model loading, decoding, grounding,
evaluation. It imports no serving or federation engine; `serving/` and
`training/` build on it.
"""

__version__ = "0.1.0"
