"""The serving application: a FastAPI gateway in front of one LLM with one LoRA per user.

Layers, each a module with one job: ``config`` (the ``serve`` section), ``keys`` (hashed
API keys), ``admission`` (bounded queue of permits), ``adapters`` (user -> served adapter,
LRU, hot swap), ``engines`` (the engine interface, a real vLLM OpenAI server managed or
attached, and transformers + peft in-process), ``ranking`` (trie beam search over an
engine), ``schemas`` (the REST and OpenAI models), ``prometheus`` (the gateway's metrics),
``services`` (all of these, built from the config), ``api`` (the routes), ``middleware``
(error bodies, body-size guard), ``app`` (``create_app``), ``cli`` and ``user_cli``
(``llmrec serve`` / ``keys`` / ``user``, registered as llmrec plugins), ``demo``
(``llmrec serve-demo``). docs/design.md draws the flow of data through them.

It imports ``llmrec``; ``llmrec`` never imports it. This file re-exports nothing: the
CLI plugins import the package on every ``llmrec`` command, which must stay fast and work
where FastAPI or vLLM are missing.
"""
