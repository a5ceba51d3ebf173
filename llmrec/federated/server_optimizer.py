"""The server's optimizer: FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization").

Plain FedAvg adds the clients' mean delta to the shared state. When each client takes one
local step from a fresh AdamW, that delta is about ``lr * sign(gradient)`` in every
coordinate whatever its size, and averaging signs is a crude optimizer. FedAdam lets the
clients take plain SGD steps (``fed.local_optimizer="sgd"``) and treats their aggregate as a
pseudo-gradient for an Adam step on the server, whose moments persist across rounds:
``-mean_delta / (learning_rate * local_steps)`` is the clients' mean gradient per step, so
with one local step a round is one Adam step on a batch of ``clients_per_round`` windows,
as in centralized training.

``torch.optim.Adam`` does the step (with bias correction); its moments are saved with every
round (``round-XXXX/server_optimizer.safetensors``, the latest round's only) so that
``--resume`` continues exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmrec.config import FedConfig
from llmrec.federated.dual_lora import State


class ServerAdam:
    """Adam over the shared state, stepped with the clients' aggregated delta."""

    def __init__(self, cfg: FedConfig, shared_state: Mapping[str, torch.Tensor]) -> None:
        self.keys = sorted(shared_state)
        self.scale = cfg.learning_rate * cfg.local_steps
        self.params = {
            k: torch.nn.Parameter(shared_state[k].detach().double().clone()) for k in self.keys
        }
        self.optimizer = torch.optim.Adam(
            [self.params[k] for k in self.keys],
            lr=cfg.server_learning_rate,
            betas=tuple(cfg.server_betas),
            eps=cfg.server_eps,
        )

    def step(
        self, shared_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor]
    ) -> State:
        """The new shared state: one Adam step from ``shared_state`` along the pseudo-gradient
        ``-mean_delta / (learning_rate * local_steps)``."""
        with torch.no_grad():
            for k in self.keys:
                self.params[k].copy_(shared_state[k].double())
                self.params[k].grad = -mean_delta[k].double() / self.scale
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: self.params[k].detach().to(shared_state[k].dtype).clone() for k in self.keys}

    def save(self, path: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for k in self.keys:
            state = self.optimizer.state.get(self.params[k])
            if state:
                tensors[f"exp_avg.{k}"] = state["exp_avg"].contiguous()
                tensors[f"exp_avg_sq.{k}"] = state["exp_avg_sq"].contiguous()
                step = float(state["step"])  # one step count: every key steps together
        if tensors:
            tensors["step"] = torch.tensor([step], dtype=torch.float64)
        save_file(tensors, path)

    def load(self, path: Path) -> None:
        """Continue from moments :meth:`save` wrote (a resumed run)."""
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{path}: the server optimizer's state is missing, and a resume needs it "
                "(fresh moments would change every later round)"
            )
        tensors = load_file(path)
        if "step" not in tensors:
            return
        for k in self.keys:
            self.optimizer.state[self.params[k]] = {
                "step": torch.tensor(float(tensors["step"][0])),
                "exp_avg": tensors[f"exp_avg.{k}"].double(),
                "exp_avg_sq": tensors[f"exp_avg_sq.{k}"].double(),
            }


def server_optimizer(cfg: FedConfig, shared_state: Mapping[str, torch.Tensor]) -> ServerAdam | None:
    """The configured server optimizer (None: plain FedAvg adds the mean delta)."""
    if cfg.server_optimizer == "adam" and shared_state:
        return ServerAdam(cfg, shared_state)
    return None
