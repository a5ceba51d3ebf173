"""The run folder (``fed.output_dir``): its names, and the reads and writes both runners share.

::

    run.json              the run: config, cohort, validation users (written once)
    round-XXXX/           after round XXXX: shared/ (the shared adapter, a PEFT folder),
                          item_rows.safetensors (item-token head: the shared item rows)
                          and round.json (the round's record)
    base/                 item-token head: the served foundation-model version, the
                          extended base with the final federated item rows (an HF folder)
    metrics.json          {"rounds": [every round's record]}, rewritten after each round
    loss.png, val_hr.png  the curves of the accelerate runner
    export.json           what was published to the adapter store after the last round
    clients/<user>/       each client's personal states (llmrec.federated.client_state)

The accelerate runner (``training/federated.py``) and the Flower app (``training/flower/``)
both write this layout, so their runs read the same way (docs/design.md, "On-disk formats").
A round folder is written whole or not at all: :func:`completed_rounds` lists the rounds a
reader (or ``--resume``) may trust.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmrec.adapters import LoraWeights, read_adapter, write_adapter
from llmrec.atomic import write_dir_atomic, write_json_atomic
from llmrec.federated.dual_lora import ITEM_ROWS_KEY

RUN_JSON = "run.json"
SERVER_OPTIMIZER_FILE = "server_optimizer.safetensors"
"""Per round, the latest only: the server optimizer's moments (FedAdam)."""
ROUND_JSON = "round.json"
SHARED_DIR = "shared"
"""Sub-folder of ``round-XXXX/`` holding the shared adapter."""
METRICS_JSON = "metrics.json"
EXPORT_JSON = "export.json"
LOSS_PNG = "loss.png"
VAL_PNG = "val_hr.png"
ITEM_ROWS_FILE = "item_rows.safetensors"
"""File of ``round-XXXX/`` holding the shared item rows (item-token head)."""
SERVED_BASE_DIR = "base"
"""Sub-folder of the run folder holding the served item-token base after export."""
MERGED_BASE_DIR = "base-merged"
"""The same with the shared adapter merged in (``fed.merge_shared``)."""
CLIENTS_DIR = "clients"
"""Sub-folder of a client's folder holding ``<user>/personal-rXXXX.safetensors``."""
_ROUND_RE = re.compile(r"^round-(\d{4,})$")


def round_dir(output_dir: Path, server_round: int) -> Path:
    """The folder of ``server_round``: ``round-XXXX``."""
    return Path(output_dir) / f"round-{server_round:04d}"


def completed_rounds(output_dir: Path) -> list[int]:
    """Rounds whose folder is complete (temp folders of a crashed write are hidden)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    rounds = []
    for entry in output_dir.iterdir():
        m = _ROUND_RE.fullmatch(entry.name)
        if m and (entry / ROUND_JSON).is_file():
            rounds.append(int(m[1]))
    return sorted(rounds)


def read_records(output_dir: Path, rounds: Sequence[int]) -> list[dict[str, Any]]:
    """The ``round.json`` records of ``rounds``, in that order."""
    return [json.loads((round_dir(output_dir, r) / ROUND_JSON).read_text()) for r in rounds]


def write_round(
    output_dir: Path,
    server_round: int,
    record: dict[str, Any],
    shared: LoraWeights | None,
    item_rows: torch.Tensor | None = None,
    save_optimizer: Callable[[Path], None] | None = None,
    checkpoint_every: int = 0,
) -> None:
    """Write (or replace) ``round-XXXX/``: the shared adapter, if any, the shared item rows,
    if any, the server optimizer's state (``save_optimizer(path)``), if any, and
    ``round.json``. The previous round's optimizer state is then deleted (it is as large as
    two shared states) unless that round is a multiple of ``checkpoint_every`` (> 0): a
    resume starts from the latest round, forgetting a user from such a checkpoint.

    Built in a hidden temp folder and renamed, so a reader sees it whole or not at all.
    """

    def fill(tmp: Path) -> None:
        if shared is not None:
            write_adapter(shared, tmp / SHARED_DIR)
        if item_rows is not None:
            save_file({ITEM_ROWS_KEY: item_rows.float().contiguous()}, tmp / ITEM_ROWS_FILE)
        if save_optimizer is not None:
            save_optimizer(tmp / SERVER_OPTIMIZER_FILE)
        write_json_atomic(tmp / ROUND_JSON, record, allow_nan=False)

    write_dir_atomic(round_dir(output_dir, server_round), fill)
    previous = server_round - 1
    if save_optimizer is not None and previous > 0:
        if not (checkpoint_every and previous % checkpoint_every == 0):
            (round_dir(output_dir, previous) / SERVER_OPTIMIZER_FILE).unlink(missing_ok=True)


def server_optimizer_path(output_dir: Path, server_round: int) -> Path:
    """The server optimizer's state after ``server_round`` (present for the latest round and
    the checkpoints)."""
    return round_dir(output_dir, server_round) / SERVER_OPTIMIZER_FILE


def read_round_state(
    output_dir: Path, server_round: int, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """The shared state after ``server_round``: the shared adapter's tensors (if it was
    written) and the item rows (if they were); with ``keys`` (a dual LoRA's shared keys)
    those only: FedSA-LoRA's checkpoint carries a zero B that is not shared."""
    folder = round_dir(output_dir, server_round)
    state: dict[str, torch.Tensor] = {}
    if (folder / SHARED_DIR).is_dir():
        state.update(read_adapter(folder / SHARED_DIR).state)
    if (folder / ITEM_ROWS_FILE).is_file():
        state[ITEM_ROWS_KEY] = load_file(folder / ITEM_ROWS_FILE)[ITEM_ROWS_KEY]
    if keys is not None:
        wanted = set(keys)
        state = {k: v for k, v in state.items() if k in wanted}
    return state


def exported_base(output_dir: Path) -> str | None:
    """The base a finished run published its adapters for (``export.json``'s ``base``: an
    item-token run's served base), or None before export or for a run without one."""
    export = Path(output_dir) / EXPORT_JSON
    return json.loads(export.read_text()).get("base") if export.is_file() else None


def remove_partial_rounds(output_dir: Path) -> None:
    """Delete the hidden folders of round writes that were cut off: the new folder being
    built (``.tmp-``) and, cut off mid-replace, the old one set aside (``.old-``)."""
    for pattern in (".round-*.tmp-*", ".round-*.old-*"):
        for stale in Path(output_dir).glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def write_metrics(output_dir: Path, records: Sequence[dict[str, Any]]) -> None:
    """``metrics.json``: every round's record so far."""
    write_json_atomic(Path(output_dir) / METRICS_JSON, {"rounds": list(records)}, allow_nan=False)
