"""The engines the gateway serves through: the interface and its two implementations.

``backend`` is what the gateway asks of an engine; ``vllm`` drives a vLLM OpenAI server
that ``launcher`` starts and watches (or one already running); ``inprocess`` runs
transformers + peft in the gateway process, where vLLM cannot be installed.
"""

from .backend import (
    Backend,
    BackendError,
    Delta,
    GenerationParams,
    Messages,
    ResetListeners,
    Scorer,
    ServedAdapter,
    Usage,
)
from .inprocess import (
    InProcessBackend,
)
from .launcher import (
    EngineSpec,
    EngineStartError,
    ManagedServer,
)
from .vllm import (
    MAX_LOGPROB_TOKEN_IDS,
    VLLMBackend,
)

__all__ = [
    "Backend",
    "BackendError",
    "Delta",
    "EngineSpec",
    "EngineStartError",
    "GenerationParams",
    "InProcessBackend",
    "MAX_LOGPROB_TOKEN_IDS",
    "ManagedServer",
    "Messages",
    "ResetListeners",
    "Scorer",
    "ServedAdapter",
    "Usage",
    "VLLMBackend",
]
