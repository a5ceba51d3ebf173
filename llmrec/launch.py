"""How llmrec's programs are launched: the federated training application (``accelerate
launch``), for the CLI and the evaluation, and the loopback port a started server listens
on. llmrec never imports ``training/``, it only starts it as a program."""

from __future__ import annotations

import contextlib
import socket
import sys
from pathlib import Path

TRAINING_SCRIPT = Path(__file__).resolve().parent.parent / "training" / "federated.py"
"""The federated training entry; found in the repository (llmrec is installed editable)."""


def train_command(
    config: Path | None,
    overrides: list[str],
    num_processes: int = 1,
    resume: bool = False,
    accelerate_config: Path | None = None,
    cuda: bool = False,
    forget: list[str] | None = None,
) -> list[str]:
    """The ``accelerate launch`` command line that ``llmrec train`` runs.

    An accelerate config file, when given, decides the launcher. Otherwise N > 1 processes
    use ``--multi_gpu`` (torchrun; on a host without CUDA the script falls back to CPU
    processes over gloo, whereas accelerate's ``--cpu`` would start a single process).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        cmd += ["--config_file", str(accelerate_config)]
    else:
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            cmd += ["--multi_gpu", "--num_processes", str(num_processes)]
        else:
            cmd += ["--num_processes", "1"] + ([] if cuda else ["--cpu"])
    cmd.append(str(TRAINING_SCRIPT))
    if config is not None:
        cmd += ["--config", str(config)]
    if resume:
        cmd.append("--resume")
    for user_id in forget or []:
        cmd += ["--forget", user_id]
    return cmd + list(overrides)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (a server started next can bind it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = "127.0.0.1", tries: int = 100) -> int:
    """The first of ``n`` consecutive TCP ports free right now on ``host`` (servers that
    take ``port``, ``port + 1``, ...: the managed engines of ``serve.replicas``)."""
    for _ in range(tries):
        first = free_port(host)
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + n):
                    held.enter_context(socket.socket()).bind((host, port))
            except (OSError, OverflowError):  # taken, or past the last port
                continue
        return first
    raise RuntimeError(f"no {n} consecutive free ports on {host} in {tries} tries")
