"""Flower's own strategies for the shared adapter, and the wrapper that records each round.

Aggregation is Flower's (``fed.aggregation``): FedAvg (weighted by next-item targets),
FedMedian or FedTrimmedAvg(beta=trim_ratio), wrapped by Flower's central-DP wrappers when
``fed.dp.enabled`` (server-side clipping; client-side clipping with SecAgg+, where the server
cannot see an update to clip it). :class:`Rounds` wraps the result to do what the accelerate
runner's server does around its aggregation: reject malformed / oversized updates with
``llmrec.federated.filter_updates`` (not with DP or SecAgg+: clipping bounds them, or the
server never sees them), sample validation clients, write ``round-XXXX/`` and
``metrics.json``, and count epsilon with ``llmrec.federated.PrivacyAccountant``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)

from llmrec.config import AppConfig
from llmrec.federated import (
    VAL_K,
    PrivacyAccountant,
    State,
    filter_updates,
    mean_or_none,
    write_metrics,
)

from .codec import BASE_KEY, CONFIG_KEY, EXPORT_KEY, ROUND_KEY, from_ndarrays, to_ndarrays

log = logging.getLogger(__name__)

RoundWriter = Callable[[int, State, dict[str, Any]], None]
"""(server round, shared state after it, round record) -> writes ``round-XXXX/``."""
BasePublisher = Callable[[State], str]
"""(final shared state) -> the fingerprint of the base its users are served on."""


def flower_strategy(cfg: AppConfig) -> Strategy:
    """Flower's aggregation rule for ``fed.aggregation``, DP-wrapped when ``fed.dp.enabled``.

    Sampling is the wrapper's business (:class:`Rounds`), so the base strategy is built with
    ``fraction_fit=0`` and exactly ``clients_per_round`` clients.
    """
    fed = cfg.fed
    base_args: dict[str, Any] = {
        "fraction_fit": 0.0,
        "min_fit_clients": fed.clients_per_round,
        "min_available_clients": fed.flower.min_available_clients or fed.clients_per_round,
        "fraction_evaluate": 0.0,
        "min_evaluate_clients": 0,
        "accept_failures": True,  # a dropped client never ends a round
    }
    base: Strategy
    if fed.aggregation == "median":
        base = FedMedian(**base_args)
    elif fed.aggregation == "trimmed_mean":
        base = FedTrimmedAvg(beta=fed.trim_ratio, **base_args)
    else:
        base = FedAvg(**base_args)
    if not fed.dp.enabled:
        return base
    wrapper = (
        DifferentialPrivacyClientSideFixedClipping
        if fed.flower.secagg
        else DifferentialPrivacyServerSideFixedClipping
    )
    return wrapper(
        base,
        noise_multiplier=fed.dp.noise_multiplier,
        clipping_norm=fed.dp.clip_norm,
        num_sampled_clients=fed.clients_per_round,
    )


class Rounds(Strategy):
    """Delegates aggregation to ``inner``; adds the runner's checks, sampling and records."""

    def __init__(
        self,
        inner: Strategy,
        cfg: AppConfig,
        keys: Sequence[str],
        initial: Parameters,
        write_round: RoundWriter,
        output_dir: Path,
        publish_base: BasePublisher,
    ) -> None:
        super().__init__()
        self.inner, self.cfg, self.keys = inner, cfg, list(keys)
        self.initial: Parameters | None = initial
        self.write_round, self.output_dir = write_round, output_dir
        self.publish_base = publish_base
        self.config_json = cfg.model_dump_json()
        self.current: State = from_ndarrays(parameters_to_ndarrays(initial), self.keys)
        self.records: list[dict[str, Any]] = []
        self.accountant: PrivacyAccountant | None = None
        self._t0 = 0.0

    def __repr__(self) -> str:
        return f"Rounds({self.inner!r})"

    def _config(self, server_round: int) -> dict[str, Scalar]:
        return {ROUND_KEY: server_round, CONFIG_KEY: self.config_json}

    # ------------------------------------------------------------------ fit

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        initial, self.initial = self.initial, None
        return initial

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._t0 = time.perf_counter()
        self.current = from_ndarrays(parameters_to_ndarrays(parameters), self.keys)
        pairs = self.inner.configure_fit(server_round, parameters, client_manager)
        fed = self.cfg.fed
        if fed.dp.enabled and fed.dp.noise_multiplier > 0 and self.accountant is None:
            rate = len(pairs) / max(client_manager.num_available(), len(pairs), 1)
            self.accountant = PrivacyAccountant(fed.dp.noise_multiplier, rate, fed.dp.delta)
        for _, ins in pairs:  # the DP wrapper may have added its clipping norm: keep it
            ins.config.update(self._config(server_round))
        return pairs

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        fed = self.cfg.fed
        rejected: dict[str, str] = {}
        # With SecAgg+ every result carries the unmasked SUM (no update is visible); with DP
        # clipping bounds every update and a data-dependent rejection would change n.
        if not (fed.flower.secagg or fed.dp.enabled):
            results, rejected = self._filter(results)
        aggregated, metrics = self.inner.aggregate_fit(server_round, _float64(results), failures)
        if aggregated is not None:  # back to float32: the wire and the adapters' dtype
            self.current = from_ndarrays(parameters_to_ndarrays(aggregated), self.keys)
            aggregated = ndarrays_to_parameters(to_ndarrays(self.current, self.keys))
        noised = fed.dp.enabled and aggregated is not None
        if noised and self.accountant is not None:
            self.accountant.step()
        reported = [r.metrics for _, r in results]
        record: dict[str, Any] = {
            "round": server_round,
            "runner": "flower",
            "seconds": round(time.perf_counter() - self._t0, 3),
            "accepted": len(results),
            "rejected": rejected,
            "failed": [_failure(f) for f in failures],
            "train_loss": mean_or_none(_numbers(reported, "loss")),
            "client_seconds_mean": mean_or_none(_numbers(reported, "seconds")),
            "applied": aggregated is not None,
            "dp_steps": self.accountant.rounds if self.accountant else 0,
            "epsilon": self.accountant.epsilon if self.accountant else None,
            **{f"val_{k}": None for k in (f"HR@{VAL_K}", f"NDCG@{VAL_K}", "loss")},
            "exported_users": None,
        }
        self.records.append(record)
        self.write_round(server_round, self.current, record)
        write_metrics(self.output_dir, self.records)
        log.info(
            "round %d: %d accepted, %d rejected, %d failed, loss %s",
            server_round,
            len(results),
            len(rejected),
            len(failures),
            f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-",
        )
        # A round with nothing applied keeps the adapter as it was.
        return aggregated or ndarrays_to_parameters(to_ndarrays(self.current, self.keys)), metrics

    def _filter(
        self, results: list[tuple[ClientProxy, FitRes]]
    ) -> tuple[list[tuple[ClientProxy, FitRes]], dict[str, str]]:
        """The results whose delta (new - current) passes the runner's checks, and why not."""
        reference = {k: tuple(v.shape) for k, v in self.current.items()}
        by_node: dict[str, tuple[State, float]] = {}
        rejected: dict[str, str] = {}
        for proxy, res in results:
            arrays = parameters_to_ndarrays(res.parameters)
            if len(arrays) != len(self.keys):
                rejected[proxy.cid] = f"{len(arrays)} arrays, expected {len(self.keys)}"
                continue
            new = from_ndarrays(arrays, self.keys)
            # A wrong shape stays as sent, so that filter_updates names it.
            delta = {
                k: new[k] - self.current[k] if new[k].shape == self.current[k].shape else new[k]
                for k in self.keys
            }
            by_node[proxy.cid] = (delta, res.num_examples)
        accepted, bad = filter_updates(by_node, reference, self.cfg.fed.max_update_norm)
        rejected.update(bad)
        return [(p, r) for p, r in results if p.cid in accepted], rejected

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Validation rounds only; the last one asks EVERY client (and has them publish)."""
        fed = self.cfg.fed
        last = server_round == fed.rounds
        if not last and (not fed.val_users or server_round % fed.val_every):
            return []
        available = client_manager.num_available()
        n = available if last else min(fed.val_users, available)
        if n == 0:
            return []
        config = {**self._config(server_round), EXPORT_KEY: last}
        if last:  # the clients publish against the base the server serves them on
            config[BASE_KEY] = self.publish_base(self.current)
        clients = client_manager.sample(num_clients=n, min_num_clients=n)
        return [(c, EvaluateIns(parameters, dict(config))) for c in clients]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Mean validation HR@10 / NDCG@10 / NLL over the clients that answered."""
        if not results:
            return None, {}
        reported = [r.metrics for _, r in results]
        metrics: dict[str, Scalar] = {
            f"HR@{VAL_K}": mean_or_none(_numbers(reported, "hit")) or 0.0,
            f"NDCG@{VAL_K}": mean_or_none(_numbers(reported, "ndcg")) or 0.0,
            "users": len(results),
            "exported": _numbers(reported, "exported").count(1.0),
        }
        loss = mean_or_none(_numbers([{"loss": r.loss} for _, r in results], "loss"))
        record = self.records[-1]
        record.update(
            {
                f"val_HR@{VAL_K}": metrics[f"HR@{VAL_K}"],
                f"val_NDCG@{VAL_K}": metrics[f"NDCG@{VAL_K}"],
                "val_loss": loss,
                "val_users": len(results),
                "val_failed": len(failures),
                "exported_users": metrics["exported"]
                if server_round == self.cfg.fed.rounds
                else None,
            }
        )
        self.write_round(server_round, self.current, record)
        write_metrics(self.output_dir, self.records)
        log.info(
            "round %d: val HR@%d %.3f over %d clients",
            server_round,
            VAL_K,
            metrics[f"HR@{VAL_K}"],
            len(results),
        )
        return loss, metrics

    def evaluate(self, server_round: int, parameters: Parameters):
        """No central evaluation: validation data lives on the clients."""
        return None


def _float64(results: list[tuple[ClientProxy, FitRes]]) -> list[tuple[ClientProxy, FitRes]]:
    """The results with float64 weights, so that the inner strategy averages in float64.

    The accelerate runner averages in float64 and adds in float64 (``server_update``): both
    then round the same exact mean once to float32, whatever order the clients answered in.
    Averaged in float32, the two would differ by an ulp here and there, and AdamW's first
    step of the next round (about lr * sign(gradient)) turns such an ulp on a near-zero
    gradient into a step of size lr.
    """
    out = []
    for proxy, res in results:
        arrays = [np.asarray(a, dtype=np.float64) for a in parameters_to_ndarrays(res.parameters)]
        out.append((proxy, replace(res, parameters=ndarrays_to_parameters(arrays))))
    return out


def _numbers(reports: Sequence[dict[str, Any]], key: str) -> list[float]:
    """The clients' reported ``key`` values that are finite numbers: a metric is client
    input, and one that is missing, not a number or not finite must not stop the round."""
    values = [report.get(key) for report in reports]
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return [float(v) for v in numbers if math.isfinite(v)]


def _failure(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """One line on a failed client (Flower's reasons can embed whole tracebacks)."""
    if isinstance(failure, BaseException):
        text = f"{type(failure).__name__}: {failure}"
    else:
        text = f"node {failure[0].cid}: {failure[1].status.message}"
    return text if len(text) <= 300 else text[:297] + "..."
