"""LoRA adapters: PEFT folders in memory (`lora`), stacking, the validated per-user store.

`constants` names every file on disk; `lora` reads, writes and stacks PEFT folders;
`validate` is the check before anything is stored or served; `manifest` is a stored
version's record; `store` keeps versions per user; `archive` zips one for export and
import; `swap` serves many adapters through one LoRA whose weights are copied in.
"""

from .archive import (
    MAX_IMPORT_BYTES,
    ZIP_MEMBERS,
    extract_adapter_zip,
    write_adapter_zip,
)
from .constants import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CURRENT,
    DEFAULT_ROOT,
    KEY_PREFIX,
    LOCK_FILE,
    MANIFEST,
    PICKLE_WEIGHTS,
    SHARED_ID,
    TMP_PREFIX,
    TOMBSTONE_PREFIX,
)
from .lora import (
    AdapterValidationError,
    LoraWeights,
    adapter_config_dict,
    lora_delta,
    matches_targets,
    read_adapter,
    read_adapter_config,
    stack,
    state_equal,
    write_adapter,
)
from .manifest import (
    USER_ID_RE,
    AdapterManifest,
    read_manifest,
    validate_user_id,
)
from .store import (
    DEFAULT_MAX_RANK,
    AdapterRef,
    AdapterStore,
)
from .swap import (
    PEFT_ADAPTER_NAME,
    SwappableLora,
    pad_rank,
)
from .validate import (
    module_shapes_for,
    validate_adapter,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterManifest",
    "AdapterRef",
    "AdapterStore",
    "AdapterValidationError",
    "CURRENT",
    "DEFAULT_MAX_RANK",
    "DEFAULT_ROOT",
    "KEY_PREFIX",
    "LOCK_FILE",
    "LoraWeights",
    "MANIFEST",
    "MAX_IMPORT_BYTES",
    "PEFT_ADAPTER_NAME",
    "PICKLE_WEIGHTS",
    "SHARED_ID",
    "SwappableLora",
    "TMP_PREFIX",
    "TOMBSTONE_PREFIX",
    "USER_ID_RE",
    "ZIP_MEMBERS",
    "adapter_config_dict",
    "extract_adapter_zip",
    "lora_delta",
    "matches_targets",
    "module_shapes_for",
    "pad_rank",
    "read_adapter",
    "read_adapter_config",
    "read_manifest",
    "stack",
    "state_equal",
    "validate_adapter",
    "validate_user_id",
    "write_adapter",
    "write_adapter_zip",
]
