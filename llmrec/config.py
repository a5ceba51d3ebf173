"""The application's one config object: typed, documented, layered.

Precedence, lowest first: field defaults < a YAML file < ``LLMREC_*``
environment variables (nested with ``__``, e.g. ``LLMREC_EVAL__N_USERS=50``)
< ``a.b=c`` overrides from the command line. Every field's docstring is its
help text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

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
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Base weight dtype; auto = bfloat16 where the CPU/GPU computes it natively, else float32."""
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

    n_users: int = Field(300, ge=0)
    """Training users (a seeded sample; 0 = all users). CPU-sized by default."""
    targets_per_user: int = Field(20, ge=1)
    """Next-item targets per user, taken from the end of their training history."""
    targets_per_example: int = Field(20, ge=1)
    """Consecutive targets one training sequence scores (one forward pass for all)."""
    epochs: int = Field(1, ge=1)
    """Passes over the training examples."""
    batch_size: int = Field(2, ge=1)
    """Sequences per optimizer step. They go through the model one at a time, so a smaller
    batch costs no more per epoch and takes more (noisier) optimizer steps."""
    learning_rate: float = Field(2e-3, gt=0)
    """AdamW learning rate for the LoRA weights."""
    seed: int = 0
    """Seed for sampling and initialization."""
    output_dir: Path = Path("outputs/centralized")
    """Where the adapter, loss log and loss curve are written."""


class LLMConfig(BaseModel):
    """The item-token recommender (method ``llm``): one token per catalog item, full ranking
    from one forward pass, trained on every position of every training history."""

    model_config = _DOCS

    render: Literal["items", "titles", "both"] = "items"
    """How the model reads a history: item tokens, "- Title" lines, or each token then its
    title."""
    window: int = Field(100, ge=1)
    """Most recent history items the model reads, in training and ranking."""
    epochs: int = Field(3, ge=1)
    """At most this many passes; the epoch with the best validation NDCG@k is kept.
    CPU-sized by default, like ``n_users``: the tuned figures use more (docs/experiments.md)."""
    patience: int = Field(2, ge=1)
    """Stop after this many epochs without a better validation NDCG@k."""
    batch_size: int = Field(16, ge=1)
    """Training sequences per optimizer step."""
    learning_rate: float = Field(1e-3, gt=0)
    """AdamW learning rate of the LoRA weights."""
    item_learning_rate: float = Field(1e-3, gt=0)
    """AdamW learning rate of the item-token rows (input embedding and output head)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay of the trainable weights."""
    lora: LoraConfig = LoraConfig(dropout=0.0)
    """The LoRA's shape. No dropout by default: peft's dropout copies every layer input,
    which halves training speed on a CPU."""
    n_users: int = Field(100, ge=0)
    """Training users (a seeded sample; 0 = all users). CPU-sized by default."""
    seed: int = 0
    """Seed of the user sample, the LoRA initialisation, dropout and shuffling."""
    output_dir: Path = Path("outputs/llm")
    """Where the trained foundation-model version, its adapter and the curves go."""


class DPConfig(BaseModel):
    model_config = _DOCS

    enabled: bool = False
    """Client-level DP-FedAvg on the shared adapter (clip, uniform mean, Gaussian noise)."""
    clip_norm: float = Field(1.0, gt=0)
    """L2 bound C on each client's shared delta: lower bounds influence, biases large updates."""
    noise_multiplier: float = Field(1.0, ge=0)
    """Noise std in units of C / clients: higher spends less epsilon per round, trains slower."""
    delta: float = Field(1e-5, gt=0, lt=1)
    """The delta of (epsilon, delta); keep it below 1 / number of users."""
    seed: int | None = None
    """Noise seed, for tests ONLY (whoever knows it can remove the noise); None = OS entropy."""


class DecouplingConfig(BaseModel):
    model_config = _DOCS

    schedule: Literal["joint", "sequential", "after"] = "sequential"
    """How a client trains the two parts. "sequential": first the shared part with the
    personal one switched off (exactly plain FedAvg's update, so the averaged adapter is the
    shared-only one), then the personal part on top of the new shared one, which stays
    frozen. "after": the rounds train the shared part alone (plain FedAvg, half the compute),
    and after the last round every client of the cohort fits its personal part once on top
    of the final shared part (``personal_steps`` steps over its training history), as does a
    local refresh: the personal part trains only where the shared part is frozen. "joint":
    both in the same steps (the personal part can absorb what the crowd would have learned,
    and the shared part drifts from plain FedAvg)."""
    personal_learning_rate: float | None = Field(None, gt=0)
    """AdamW learning rate of the personal part (None = ``fed.learning_rate``): with
    ``local_optimizer="sgd"`` the two parts need rates of different scales."""
    personal_steps: int = Field(8, ge=1)
    """Steps of the personal fit with ``schedule="after"`` (each ``local_batch_size``
    windows of the client's training history)."""
    holdout_targets: int = Field(4, ge=0)
    """A user's last N training targets are never trained on (by either part): with the
    validation item they are the client's own validation data, which picks the personal
    scale at export."""
    gate: Literal["none", "adapter", "module"] = "module"
    """Per-user learned balance g in (0, 2): update = (2-g)*shared + g*personal; one g per
    user ("adapter") or per user and adapted module ("module"); folded into B at export."""
    gate_learning_rate: float = Field(0.05, gt=0)
    """AdamW learning rate of the gate logits: a few local steps must be able to move them."""
    prox_mu: float = Field(0.0, ge=0)
    """FedProx weight on ||shared - downloaded shared||^2: keeps clients' shared drift small, so
    what is peculiar to a user has to go into the personal adapter."""
    personal_decay: float = Field(300.0, ge=0)
    """AdamW weight decay of the personal B matrices (each step shrinks them by lr * decay;
    B = 0 is no personal update): keeps a user's few examples from being memorized."""
    personal_scales: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        [0.0, 0.5, 1.0], min_length=1
    )
    """Scales of the personal part a client tries at export, per user: it scores the items
    its personal part never trained on (the holdout targets and the validation item) with
    the personal part scaled by each value (0 = exactly the shared adapter, 1 = as trained,
    between = both sides interpolated) and publishes the best. [1.0] publishes as trained.
    More values pick finer, each costs one scoring pass. Applies when both ranks are set
    (personal-only is exported as trained)."""


class FlowerConfig(BaseModel):
    model_config = _DOCS

    min_available_clients: int | None = Field(None, ge=1)
    """SuperNodes connected before a round samples its clients (None = clients_per_round)."""
    secagg: bool = False
    """SecAgg+ (Flower's SecAggPlusWorkflow + secaggplus_mod): clients upload masked vectors and
    the server only ever unmasks their sum. Needs aggregation=fedavg and 3+ clients per round;
    costs four message exchanges a round instead of one."""
    secagg_num_shares: int = Field(3, ge=3)
    """Shares each client's mask key is split into: more tolerate more dropouts, cost more."""
    secagg_reconstruction_threshold: int = Field(2, ge=2)
    """Shares needed to rebuild a dropped client's mask: higher = more colluders needed to
    unmask one client, fewer dropouts tolerated."""
    secagg_clipping_range: float = Field(8.0, gt=0)
    """SecAgg+ clips every uploaded weight to +-this before quantizing it to 2**22 levels:
    a smaller range is finer (LoRA weights stay well below 1)."""

    @model_validator(mode="after")
    def _shares(self) -> FlowerConfig:
        if self.secagg_reconstruction_threshold > self.secagg_num_shares:
            raise ValueError("secagg_reconstruction_threshold exceeds secagg_num_shares")
        return self


class FedConfig(BaseModel):
    model_config = _DOCS

    n_users: int = Field(16, ge=0)
    """Cohort: a seeded sample of users with a validation item (0 = all such users)."""
    head: Literal["items", "titles"] = "items"
    """What the clients train. "items": over the item-token base, one forward pass ranks
    the catalog; the item rows are a shared parameter, federated with the shared adapter,
    and every position of a client's training history is a target (``window`` items per
    sequence). "titles": the adapters write the next title (trie decoding) from the last
    ``targets_per_user`` positions."""
    window: int = Field(100, ge=1)
    """Item-token head: history items per training sequence and read when ranking."""
    rounds: int = Field(3, ge=1)
    """Federated rounds (one aggregation of the shared adapter each)."""
    clients_per_round: int = Field(8, ge=1)
    """Clients sampled per round: more averages more evenly, costs linearly more compute."""
    local_steps: int = Field(4, ge=1)
    """Optimizer steps each client takes per round; more steps drift further from the others."""
    client_batch: int = Field(1, ge=1)
    """Clients whose local steps run together in one batched forward (item-token head only;
    each keeps its own weights): the same updates as one at a time, several times faster on
    a CPU. 1 = one client at a time (the Flower client always is)."""
    local_batch_size: int = Field(1, ge=1)
    """Sequences per local optimizer step (each scores targets_per_example items)."""
    targets_per_user: int = Field(32, ge=1)
    """Titles head: next-item targets per client, from the end of its training history."""
    targets_per_example: int = Field(8, ge=1)
    """Titles head: consecutive targets one training sequence scores (one forward pass)."""
    learning_rate: float = Field(1e-3, gt=0)
    """AdamW learning rate of both LoRA adapters on the client."""
    local_optimizer: Literal["adamw", "sgd"] = "adamw"
    """The client's optimizer of the shared part: AdamW, fresh each round, or plain SGD at
    ``learning_rate`` (what ``server_optimizer="adam"`` expects: the delta is then the
    gradient times the step). The personal part always trains with AdamW."""
    server_optimizer: Literal["none", "adam"] = "none"
    """"none": the aggregate delta is added (FedAvg). "adam": FedAdam (Reddi et al. 2021),
    an Adam step on the pseudo-gradient -aggregate / (learning_rate * local_steps), with
    moments kept across rounds (and checkpointed)."""

    @property
    def personal_learning_rate(self) -> float:
        """The personal part's AdamW rate: ``decoupling.personal_learning_rate`` or, unset,
        ``learning_rate``."""
        return self.decoupling.personal_learning_rate or self.learning_rate

    server_learning_rate: float = Field(1e-3, gt=0)
    """Learning rate of the server optimizer."""
    server_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas of the server optimizer."""
    server_eps: float = Field(1e-8, gt=0)
    """Adam epsilon of the server optimizer."""
    shared_rank: int = Field(8, ge=0, le=256)
    """Rank of the shared adapter (0 = personal-only ablation: local training, no federation)."""
    personal_rank: int = Field(4, ge=0, le=256)
    """Rank of the personal adapter (0 = shared-only ablation: plain FedAvg)."""
    shared_alpha: float = Field(16.0, gt=0)
    """lora_alpha of the shared adapter (scale = alpha / rank)."""
    personal_alpha: float = Field(8.0, gt=0)
    """lora_alpha of the personal adapter (scale = alpha / rank)."""
    share: Literal["adapter", "lora_a"] = "adapter"
    """What of a client's LoRA the server averages. "adapter": the whole shared adapter, while
    the personal adapter stays with the client (ours). "lora_a": FedSA-LoRA (Guo et al., arXiv
    2410.01463), one LoRA of rank ``shared_rank`` whose A matrices (and the item rows) are
    federated while every client keeps its own B, trained with A in each round at the
    personal learning rate; needs ``personal_rank=0`` and ``decoupling.schedule="joint"``."""

    @property
    def keeps_personal(self) -> bool:
        """Whether clients keep a state of their own: a personal adapter, or FedSA-LoRA's B."""
        return bool(self.personal_rank) or self.share == "lora_a"

    target_modules: list[str] | None = None
    """Linear layers both adapters adapt; None = the lora section's target_modules."""
    aggregation: Literal["fedavg", "median", "trimmed_mean"] = "fedavg"
    """Rule for the shared deltas: fedavg weights by next-item target count; the robust
    rules do not."""
    trim_ratio: float = Field(0.1, ge=0.0, lt=0.5)
    """Fraction cut from each end per coordinate by trimmed_mean: floor(trim_ratio *
    clients_per_round) updates, which must be at least one."""
    max_update_norm: float | None = Field(100.0, gt=0)
    """Reject (never average) a shared delta whose L2 norm exceeds this; None = no bound.
    AdamW moves a weight about lr per step, so an honest delta stays under
    lr * local_steps * sqrt(shared weights) (~2 for ml100k.yaml). Ignored with DP on."""
    dp: DPConfig = DPConfig()
    """Differential privacy of the shared adapter."""
    decoupling: DecouplingConfig = DecouplingConfig()
    """How shared and personal knowledge are kept apart."""
    flower: FlowerConfig = FlowerConfig()
    """Flower runs only (training/flower/): node sampling and secure aggregation."""
    client_timeout_s: float = Field(600.0, gt=0)
    """Straggler budget: a client still training after this many seconds is dropped."""
    val_users: int = Field(16, ge=0)
    """Fixed seeded sample of cohort users whose validation HR@10 is measured (0 = none)."""
    val_every: int = Field(3, ge=1)
    """Rounds between validations (the last round is always validated): beam search is slow."""
    checkpoint_every: int = Field(25, ge=0)
    """Keep the server optimizer's state of every Nth round (0: the latest only): the rounds
    forgetting a user (``training/federated.py --forget``) can retrain from. Each holds two
    shared states (Adam's moments); without a server optimizer every round is one."""
    seed: int = 0
    """Seed of the cohort, client selection, initialization and local training."""
    output_dir: Path = Path("outputs/federated")
    """Round checkpoints, client-side personal states, metrics and curves."""
    store_dir: Path = Path("adapters")
    """Adapter store the final shared and per-user adapters are published to."""
    merge_shared: bool = False
    """Export the shared adapter merged into the served foundation-model version
    (``head="items"``): a user whose personal part is off is then served that version alone,
    with no LoRA at all, and every other user an adapter of their difference from the shared
    one. LoRA costs vLLM's CPU engine several times a plain forward (``bench/serving.py``);
    the rankings are the stacked export's."""

    @model_validator(mode="after")
    def _consistent(self) -> FedConfig:
        if self.shared_rank + self.personal_rank == 0:
            raise ValueError("shared_rank and personal_rank cannot both be 0")
        if self.n_users and self.clients_per_round > self.n_users:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds n_users ({self.n_users})"
            )
        if self.n_users and self.val_users > self.n_users:
            raise ValueError(f"val_users ({self.val_users}) exceeds n_users ({self.n_users})")
        if self.share == "lora_a" and (
            self.personal_rank or not self.shared_rank or self.decoupling.schedule != "joint"
        ):
            raise ValueError(
                "share='lora_a' (FedSA-LoRA) is one LoRA whose B stays local: it needs "
                "shared_rank > 0, personal_rank=0 and decoupling.schedule='joint'"
            )
        if self.merge_shared and not (
            self.head == "items" and self.share == "adapter" and self.shared_rank
        ):
            raise ValueError(
                "merge_shared merges the shared adapter into the served item-token base: it "
                "needs head='items', share='adapter' and shared_rank > 0"
            )
        if self.client_batch > 1 and self.head != "items":
            raise ValueError("client_batch > 1 needs head='items' (batched clients)")
        if self.personal_learning_rate * self.decoupling.personal_decay >= 1:
            raise ValueError("the personal learning rate * decoupling.personal_decay must be < 1")
        if self.dp.enabled and self.shared_rank == 0:
            raise ValueError("dp.enabled needs a shared adapter (shared_rank > 0)")
        if self.aggregation == "trimmed_mean" and int(self.trim_ratio * self.clients_per_round) < 1:
            # floor(ratio * n) updates are cut from each end: 0 would be a plain mean.
            raise ValueError(
                f"trim_ratio {self.trim_ratio} trims nothing from {self.clients_per_round} "
                f"clients per round: set trim_ratio >= 1 / clients_per_round"
            )
        if self.dp.enabled and self.aggregation != "fedavg":
            # private_mean is a uniform mean; a median/trimmed mean has another sensitivity.
            raise ValueError("dp.enabled replaces the aggregation rule: set aggregation=fedavg")
        if self.flower.secagg and self.aggregation != "fedavg":
            # SecAgg+ reveals only the (weighted) sum: a median needs every update in clear.
            raise ValueError("flower.secagg needs aggregation=fedavg")
        if self.flower.secagg and self.clients_per_round < self.flower.secagg_num_shares:
            raise ValueError("flower.secagg needs clients_per_round >= flower.secagg_num_shares")
        return self


class EvalConfig(BaseModel):
    model_config = _DOCS

    n_users: int = Field(200, ge=0)
    """Evaluated users, a seeded sample (0 = all users); stated in every report."""
    seed: int = 0
    """Seed of the user sample."""
    k: int = Field(10, ge=1)
    """Cut-off of HR@k and NDCG@k."""
    methods: list[
        Literal[
            "popularity",
            "itemknn",
            "sasrec",
            "zero-shot",
            "centralized",
            "llm",
            "shared-only",
            "personal-only",
            "ours",
        ]
    ] = ["popularity", "itemknn", "sasrec", "llm", "ours"]
    """Methods compared side by side on the same users and split. The federated ones
    (shared-only = plain FedAvg, personal-only = local training, ours = shared + personal)
    train with the `fed` section and are evaluated on its cohort, which then becomes
    every method's user sample."""
    federated_dir: Path = Path("outputs/eval-federated")
    """Where the federated methods' runs and adapter stores go (a finished run is reused)."""
    results_dir: Path = Path("results")
    """Where the metric table (JSON) and its bar chart (PNG) are written."""


class ProfileConfig(BaseModel):
    model_config = _DOCS

    url: str = "sqlite:///outputs/profiles.db"
    """SQLAlchemy URL of the per-user profile database (history edits, feedback,
    exclusions, conversations, refresh queue); SQLite by default, any SQLAlchemy URL works."""
    max_conversations: int = Field(50, ge=1)
    """Conversations kept per user; the oldest are dropped past it."""


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
    llm: LLMConfig = LLMConfig()
    """The item-token recommender and its centralized training."""
    eval: EvalConfig = EvalConfig()
    """Evaluation protocol."""
    fed: FedConfig = FedConfig()
    """Federated shared + personal LoRA training."""
    profile: ProfileConfig = ProfileConfig()
    """The personal agent's per-user profile database."""

    @model_validator(mode="after")
    def _fed_targets_default_to_lora(self) -> AppConfig:
        # One place decides the federated adapters' modules: an explicit fed list, else lora's.
        if self.fed.target_modules is None:
            self.fed.target_modules = list(self.lora.target_modules)
        return self

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


ConfigT = TypeVar("ConfigT", bound=AppConfig)


def load_config(
    path: Path | None = None, overrides: list[str] | None = None, cls: type[ConfigT] = AppConfig
) -> ConfigT:
    """Build the config from defaults, an optional YAML file, the environment and overrides.

    ``cls`` is AppConfig or a subclass with sections of its own (the serving application's
    ``ServingConfig``), loaded from the same sources in the same order."""
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
        return cls(**parse_overrides(overrides or []))
    except ValidationError as err:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"invalid config: {fields}") from err
    finally:
        _YamlSource.data = {}
