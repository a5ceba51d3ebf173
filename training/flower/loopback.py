"""A Flower federation on this machine: SuperLink, SuperNodes and ``flwr run``, as processes.

Used by tests/test_flower.py; by hand, run the commands in training/README.md. Every
process gets its own session so that stopping one also stops the children Flower spawns for
it (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``, Ray workers).

    with Federation(home, cwd=repo, simulation_nodes=8) as fed:      # Flower simulation
        fed.run(app_dir, {"config": "training/configs/tiny.yaml", "overrides": "..."})

    with Federation(home, cwd=repo) as fed:                          # deployment, loopback
        fed.start_supernode("a", {"user-id": "3"}); fed.start_supernode("b", {"user-id": "7"})
        fed.run(app_dir, run_config)

A SuperNode may run as its own Unix user (``account``, when this process is root), as a
device would: then it reads and writes only what that user may.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from llmrec.launch import free_port

BIN = Path(sys.executable).parent
CONNECTION = "llmrec"


@dataclass(frozen=True)
class Account:
    """A Unix identity to run a SuperNode as: ``uid``, ``gid``, no supplementary groups, and
    its own ``home`` (HOME, and FLWR_HOME = ``home/flwr``, where the SuperNode installs the
    app), which it must be able to write."""

    uid: int
    gid: int
    home: Path


def toml_value(value: object) -> str:
    """A run-config / node-config value in TOML syntax (what Flower's parsers expect)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def config_arg(config: Mapping[str, object]) -> str:
    """``k1=v1 k2=v2`` for ``--run-config`` / ``--node-config``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop ``process`` and everything it started: SIGTERM, then SIGKILL after ``grace_s``."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=grace_s)


def kill_now(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` and its children at once: a device that dies mid-round."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)


class Federation:
    """A loopback SuperLink (+ SuperNodes) owned by this process; a context manager."""

    def __init__(
        self,
        home: Path,
        cwd: Path,
        simulation_nodes: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.home, self.cwd = Path(home), Path(cwd)
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs = self.home / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower spawns its tools
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            # Ray's own OOM killer fires at 95% of the HOST's memory, whoever uses it: on a
            # shared machine it kills a small client actor for others' jobs. The kernel's stays.
            "RAY_memory_monitor_refresh_ms": "0",
            **(env or {}),
        }
        self.fleet = f"127.0.0.1:{free_port()}"
        self.control = f"127.0.0.1:{free_port()}"
        self.simulation_nodes = simulation_nodes
        self.nodes: dict[str, subprocess.Popen] = {}
        self.superlink: subprocess.Popen | None = None
        self._write_connection()

    def _write_connection(self) -> None:
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            f"[superlink.{CONNECTION}]",
            f'address = "{self.control}"',
            "insecure = true",
        ]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def _spawn(
        self, name: str, args: list[str], account: Account | None = None
    ) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        env, identity = self.env, {}
        if account is not None:
            env = {**env, "HOME": str(account.home), "FLWR_HOME": str(account.home / "flwr")}
            identity = {"user": account.uid, "group": account.gid, "extra_groups": []}
        return subprocess.Popen(
            args,
            cwd=self.cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **identity,
        )

    def start_superlink(self) -> None:
        """The SuperLink (in simulation mode when ``simulation_nodes`` is set); waits for it."""
        args = [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",  # the app runs in this environment
            "--fleet-api-address",
            self.fleet,
            "--control-api-address",
            self.control,
            "--serverappio-api-address",
            f"127.0.0.1:{free_port()}",
        ]
        if self.simulation_nodes is not None:
            args.append("--simulation")
        self.superlink = self._spawn("superlink", args)
        _wait_port(self.control, self.superlink)

    def start_supernode(
        self, name: str, node_config: Mapping[str, object], account: Account | None = None
    ) -> subprocess.Popen:
        """A SuperNode connected to the SuperLink, with its own ``--node-config``; as
        ``account`` when given (else as this process's user)."""
        args = [
            str(BIN / "flower-supernode"),
            "--insecure",
            "--superlink",
            self.fleet,
            "--clientappio-api-address",
            f"127.0.0.1:{free_port()}",
            "--node-config",
            config_arg(node_config),
        ]
        self.nodes[name] = self._spawn(f"supernode-{name}", args, account)
        return self.nodes[name]

    def _run_args(self, app_dir: Path, run_config: Mapping[str, object]) -> list[str]:
        args = [str(BIN / "flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        if run_config:
            args += ["--run-config", config_arg(run_config)]
        if self.simulation_nodes is not None:
            # One Ray actor with one CPU: clients run one after another (2-core CI machines).
            args += [
                "--federation-config",
                f"num-supernodes={self.simulation_nodes} client-resources-num-cpus=1 "
                "init-args-num-cpus=1",
            ]
        return args

    def run(
        self, app_dir: Path, run_config: Mapping[str, object], timeout_s: float = 1800
    ) -> subprocess.CompletedProcess:
        """``flwr run app_dir --stream``: returns when the run has finished."""
        args = self._run_args(app_dir, run_config)
        return subprocess.run(
            args, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )

    def start_run(self, app_dir: Path, run_config: Mapping[str, object]) -> subprocess.Popen:
        """``flwr run ... --stream`` in the background (to act while a round is running)."""
        return self._spawn("flwr-run", self._run_args(app_dir, run_config))

    def close(self) -> None:
        """Stop every SuperNode, then the SuperLink (and all their children)."""
        for process in self.nodes.values():
            stop(process)
        if self.superlink is not None:
            stop(self.superlink)

    def __enter__(self) -> Federation:
        self.start_superlink()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_port(address: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {address} after {timeout_s:g} s")
