"""llmrec's Flower app: ServerApp, ClientApp and what they exchange (see ``pyproject.toml``)."""
