"""Client-level differential privacy for the shared LoRA: DP-FedAvg with fixed clipping.

McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language
Models" (ICLR): each round, clip every sampled client's update to L2 norm ``C``, take the
*uniform* mean over the ``n`` clients, and add Gaussian noise of standard deviation
``z * C / n`` (noise multiplier ``z``). The round is a subsampled Gaussian mechanism, and
``PrivacyAccountant`` tracks (epsilon, delta) over rounds with opacus's RDP accountant
(Mironov 2017, "Renyi Differential Privacy").

Adjacency. The server samples a FIXED number of clients and divides by that count, so a
neighbouring federation is one where a client's data is REPLACED (the count stays ``n``),
not removed: one client then moves the mean by up to ``2C / n``, twice the add/remove
sensitivity the noise is calibrated to. The accountant therefore charges each round at the
effective noise multiplier ``z / 2`` (``adjacency="replace-one"``, the default); opacus's
bound for add/remove adjacency (``z``) applies only to a mean over a Poisson sample divided
by its expected size.

Contract for the caller (the server loop):

- With DP on, aggregate with ``private_mean`` (or ``clip_update`` -> uniform mean -> ``add_noise``),
  never with example-count weights: a weight that depends on a client's data raises that
  client's influence above ``C / n`` and its count itself leaks. ``n_clients`` is the number of
  updates in the mean (after validation), not the number sampled.
- ``sample_rate`` = clients per round / total clients. The subsampling bound is opacus's for
  Poisson sampling; a fixed-size uniform sample is the usual approximation (as in the paper).
- Use a generator seeded from ``secure_generator`` in real runs; fixed seeds are for tests.
- The guarantee covers the shared state (the shared LoRA, and the item rows of the item-token
  head); personal LoRAs never leave the client.

Pure tensor functions; opacus is imported lazily so that ``import llmrec`` stays light.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import torch

from llmrec.federated.aggregate import Update, fedavg, update_norm


def _check_positive(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def clip_update(update: Update, clip_norm: float) -> tuple[Update, float]:
    """Scale ``update`` by ``min(1, clip_norm / norm)``; returns (clipped copy, original norm).

    The L2 norm of the result, over all tensors, is at most ``clip_norm`` (up to rounding).
    Raises ValueError on a non-finite update: validate with ``aggregate.check_update`` first.
    """
    _check_positive("clip_norm", clip_norm)
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip an update with norm {norm}; validate it first")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = {k: (t.to(torch.float64) * scale).to(t.dtype) for k, t in update.items()}
    return clipped, norm


def add_noise(
    mean_update: Update,
    noise_multiplier: float,
    clip_norm: float,
    n_clients: int,
    generator: torch.Generator,
) -> Update:
    """Add Gaussian noise with std ``noise_multiplier * clip_norm / n_clients`` to every entry.

    ``mean_update`` must be the uniform (unweighted) mean of ``n_clients`` updates each clipped
    to ``clip_norm``: that is what the std is calibrated to (sensitivity ``clip_norm /
    n_clients``). Noise is drawn from ``generator`` key by key in ``mean_update``'s order, so the
    same seed and keys give the same noise. ``noise_multiplier = 0`` returns an unchanged copy
    (clipping only, no privacy claim).
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    _check_positive("clip_norm", clip_norm)
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    std = noise_multiplier * clip_norm / n_clients
    noisy: Update = {}
    for key, tensor in mean_update.items():
        # draw in float64 on the generator's device so the stream does not depend on the dtype
        noise = torch.randn(
            tensor.shape, generator=generator, dtype=torch.float64, device=generator.device
        )
        noisy[key] = (tensor.to(torch.float64) + std * noise.to(tensor.device)).to(tensor.dtype)
    return noisy


def private_mean(
    updates: Sequence[Update],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[Update, list[float]]:
    """One DP-FedAvg aggregation: clip each update, uniform mean, add calibrated noise.

    Returns the noisy mean and each update's norm before clipping (for logging: how often
    ``clip_norm`` bites tells whether it is set well).
    """
    clipped, norms = [], []
    for update in updates:
        c, norm = clip_update(update, clip_norm)
        clipped.append(c)
        norms.append(norm)
    mean = fedavg(clipped, [1.0] * len(clipped))  # uniform: example counts would leak
    return add_noise(mean, noise_multiplier, clip_norm, len(clipped), generator), norms


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded from the OS's secure randomness, for real DP runs.

    A fixed or guessable seed lets anyone who knows it subtract the noise.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))
    return gen


ADJACENCIES = ("replace-one", "add-remove")


class PrivacyAccountant:
    """Tracks the (epsilon, delta) spent by DP-FedAvg rounds, via opacus's RDP accountant.

    One ``step()`` per aggregation round with the same ``noise_multiplier`` and
    ``sample_rate`` (clients per round / total clients). ``adjacency="replace-one"`` (the
    server's fixed-count mean, see the module docstring) charges each round at noise
    multiplier ``noise_multiplier / 2``; "add-remove" at ``noise_multiplier``.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        adjacency: str = "replace-one",
    ) -> None:
        """ValueError on noise_multiplier <= 0, sample_rate not in (0, 1], delta not in (0, 1),
        an unknown adjacency."""
        _check_positive("noise_multiplier", noise_multiplier)
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if adjacency not in ADJACENCIES:
            raise ValueError(f"adjacency must be one of {list(ADJACENCIES)}, got {adjacency!r}")
        # lazy: opacus pulls in its optimizers and grad-sample machinery at import
        from opacus.accountants import RDPAccountant

        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.adjacency = adjacency
        # Replace-one doubles the sensitivity: the same noise is worth half the multiplier.
        self.charged_multiplier = self.noise_multiplier / (2 if adjacency == "replace-one" else 1)
        self._accountant = RDPAccountant()
        self._rounds = 0

    def step(self) -> None:
        """Record one aggregation round."""
        self._accountant.step(
            noise_multiplier=self.charged_multiplier, sample_rate=self.sample_rate
        )
        self._rounds += 1

    @property
    def rounds(self) -> int:
        """Rounds recorded so far."""
        return self._rounds

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before the first round)."""
        return float(self._accountant.get_epsilon(delta=self.delta))
