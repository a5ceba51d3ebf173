"""The serving application: a FastAPI gateway in front of one LLM with one LoRA per user.

Layers, each a module with one job: ``config`` (the ``serve`` section), ``keys`` (hashed
API keys), ``admission`` (bounded queue), ``adapters`` (user -> served adapter, LRU, hot
swap), ``backend`` (the interface) with ``vllm_backend`` + ``launcher`` (a real vLLM
OpenAI server, managed or attached) and ``inprocess`` (transformers + peft), ``ranking``
(trie beam search over a backend), ``schemas`` (the REST and OpenAI models), ``app``
(routes), ``cli`` (``llmrec serve`` / ``llmrec keys``, registered as an llmrec plugin).

It imports ``llmrec``; ``llmrec`` never imports it.
"""
