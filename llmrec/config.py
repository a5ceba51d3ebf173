"""The application's one config object: typed, documented, layered.

Precedence, lowest first: field defaults < a YAML file < ``LLMREC_*``
environment variables (nested with ``__``, e.g. ``LLMREC_EVAL__N_USERS=50``)
< ``a.b=c`` overrides from the command line. Every field's docstring is its
help text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

_DOCS = ConfigDict(use_attribute_docstrings=True, extra="forbid")


class DataConfig(BaseModel):
    model_config = _DOCS

    name: Literal["ml-100k", "generic"] = "ml-100k"
    """Data set: the packaged MovieLens-100K, or your own files in the generic format."""
    interactions: Path | None = None
    """Generic format: interactions CSV/JSONL (user_id, item_id, timestamp[, rating])."""
    catalog: Path | None = None
    """Generic format: item catalog CSV/JSONL (item_id, title[, year, genres])."""

    @model_validator(mode="after")
    def _generic_needs_files(self) -> DataConfig:
        if self.name == "generic" and (self.interactions is None or self.catalog is None):
            raise ValueError("data.name=generic needs data.interactions and data.catalog")
        return self


class ModelConfig(BaseModel):
    model_config = _DOCS

    name_or_path: str = "smollm2-135m-instruct"
    """Base LLM: the packaged SmolLM2-135M-Instruct alias, a local HF folder, or a hub id."""
    quantization: Literal["none", "nf4", "int8"] = "none"
    """Frozen base through bitsandbytes: nf4 (QLoRA) or int8 save memory, cost speed on CPU."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the base weights."""
    cache_dir: Path | None = None
    """Where prepared base models live (default: $LLMREC_CACHE or ~/.cache/llmrec)."""


class PromptConfig(BaseModel):
    model_config = _DOCS

    max_history_items: int = Field(10, ge=1)
    """Most recent history items put in a prompt: more context, more tokens to pay for."""
    max_prompt_tokens: int = Field(384, ge=32)
    """Token budget of a rendered prompt; the oldest items are dropped to fit."""


class RecommendConfig(BaseModel):
    model_config = _DOCS

    k: int = Field(10, ge=1, le=100)
    """How many items to return."""
    beam_width: int = Field(20, ge=1, le=200)
    """Beams in trie-constrained decoding: wider finds better lists, costs linearly more."""
    grounding_threshold: float = Field(0.8, ge=0.0, le=1.0)
    """Cosine similarity a free-text title needs to be grounded to a catalog item."""


class LoraConfig(BaseModel):
    model_config = _DOCS

    r: int = Field(8, ge=1, le=256)
    """LoRA rank."""
    alpha: int = Field(16, ge=1)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    """Linear layers that get a LoRA update."""


class FinetuneConfig(BaseModel):
    model_config = _DOCS

    n_users: int = Field(0, ge=0)
    """Training users (a seeded sample; 0 = all users)."""
    examples_per_user: int = Field(4, ge=1)
    """Next-item examples per user, taken from the end of their training history."""
    epochs: int = Field(1, ge=1)
    """Passes over the training examples."""
    batch_size: int = Field(8, ge=1)
    """Examples per optimizer step."""
    learning_rate: float = Field(1e-3, gt=0)
    """AdamW learning rate for the LoRA weights."""
    seed: int = 0
    """Seed for sampling and initialization."""
    output_dir: Path = Path("outputs/centralized")
    """Where the adapter, loss log and loss curve are written."""


class EvalConfig(BaseModel):
    model_config = _DOCS

    n_users: int = Field(200, ge=0)
    """Evaluated users, a seeded sample (0 = all users); stated in every report."""
    seed: int = 0
    """Seed of the user sample."""
    k: int = Field(10, ge=1)
    """Cut-off of HR@k and NDCG@k."""
    methods: list[Literal["popularity", "itemknn", "zero-shot", "centralized"]] = [
        "popularity",
        "itemknn",
        "zero-shot",
        "centralized",
    ]
    """Methods compared side by side on the same users and split."""
    results_dir: Path = Path("results")
    """Where the metric table (JSON) and its bar chart (PNG) are written."""


class AppConfig(BaseSettings):
    """Everything `llmrec` needs; one section per concern."""

    model_config = SettingsConfigDict(
        env_prefix="LLMREC_",
        env_nested_delimiter="__",
        extra="forbid",
        use_attribute_docstrings=True,
    )

    data: DataConfig = DataConfig()
    """Which interactions and catalog."""
    model: ModelConfig = ModelConfig()
    """The base LLM."""
    prompts: PromptConfig = PromptConfig()
    """Prompt rendering."""
    recommend: RecommendConfig = RecommendConfig()
    """Decoding and grounding."""
    lora: LoraConfig = LoraConfig()
    """LoRA shape."""
    finetune: FinetuneConfig = FinetuneConfig()
    """Centralized LoRA training."""
    eval: EvalConfig = EvalConfig()
    """Evaluation protocol."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs carry the CLI overrides, then env, then the YAML file.
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """Feeds the YAML file chosen by :func:`load_config` (set just before construction)."""

    data: dict[str, Any] = {}

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_YamlSource.data)


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the field."""


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = target.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        target = node
    target[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["eval.n_users=50", "lora.r=4"]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value")
        _set_dotted(nested, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return nested


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> AppConfig:
    """Build the config from defaults, an optional YAML file, the environment and overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    _YamlSource.data = data
    try:
        return AppConfig(**parse_overrides(overrides or []))
    except ValidationError as err:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"invalid config: {fields}") from err
    finally:
        _YamlSource.data = {}
