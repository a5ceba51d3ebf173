"""The published OpenAPI schema: the routes' models with this deployment's limits written in.

FastAPI builds the schema from static models, but the limits (``serve.limits``: how many
items, how long a message) are the operator's config. They are written into the generated
schema once, here, so that a client, a generated SDK or a fuzzer reads exactly what the
gateway accepts; the routes check the same limits (422, naming the field).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from llmrec_serving.config import LimitsConfig
from llmrec_serving.schemas import PUBLISHED

LIMITS: dict[tuple[str, str, str], str] = {
    ("RecommendationRequest", "k", "maximum"): "max_k",
    ("RecommendationRequest", "history", "maxItems"): "max_history_items",
    ("RecommendationRequest", "exclude", "maxItems"): "max_history_items",
    ("RecommendationRequest", "context", "maxLength"): "max_context_chars",
    ("ItemEdit", "add", "maxItems"): "max_history_items",
    ("ItemEdit", "remove", "maxItems"): "max_history_items",
    ("ChatRequest", "message", "maxLength"): "max_message_chars",
    ("ChatCompletionRequest", "messages", "maxItems"): "max_messages",
    ("ChatCompletionRequest", "max_tokens", "maximum"): "max_tokens",
    ("ChatCompletionRequest", "max_completion_tokens", "maximum"): "max_tokens",
    ("ChatMessage", "content", "maxLength"): "max_message_chars",
    ("TextPart", "text", "maxLength"): "max_message_chars",
}
"""(component schema, property, JSON Schema keyword) -> the ``LimitsConfig`` field it takes."""

_TYPES = {"maximum": ("integer", "number"), "maxItems": ("array",), "maxLength": ("string",)}
"""The JSON types each keyword constrains (an optional field is an ``anyOf`` with null)."""


def install(app: FastAPI, limits: LimitsConfig) -> None:
    """Make ``app`` publish its schema with ``limits`` written in (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            components = schema["components"]["schemas"]
            write_limits(components, limits)
            components.update(_published_components())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


def write_limits(components: dict[str, Any], limits: LimitsConfig) -> None:
    """Set each :data:`LIMITS` keyword on its property; a missing one is a programming error
    (a renamed model or field), raised rather than published without its limit."""
    for (name, prop, keyword), field in LIMITS.items():
        try:
            target = components[name]["properties"][prop]
        except KeyError:
            raise KeyError(f"the schema has no {name}.{prop} to write {field} into") from None
        _constrain(target, keyword, getattr(limits, field))


def _published_components() -> dict[str, Any]:
    """The models routes refer to by name (``schemas.PUBLISHED``), and the models they use."""
    out: dict[str, Any] = {}
    for model in PUBLISHED:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _constrain(schema: dict[str, Any], keyword: str, value: int) -> None:
    branches: list[dict[str, Any]] = schema.get("anyOf", [schema])
    hits = [b for b in branches if b.get("type") in _TYPES[keyword]]
    if not hits:
        raise KeyError(f"no branch of {schema} takes {keyword}")
    for branch in hits:
        branch[keyword] = value
