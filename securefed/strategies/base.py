"""The Strategy ABC: plan a round, say what each client contributes, aggregate a SUM.

Strategies never see an individual client's update: the aggregation protocol hands them only
the per-key sums of the clients' contribution vectors and the summed weight. Everything a client
contributes is therefore expressed as a vector to be summed (Flower-style strategies, but with
the sum as the only server input, so secure aggregation slots in unchanged).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from securefed.config import StrategyConfig

__all__ = [
    "ClientUpdate",
    "CohortSum",
    "LocalObjective",
    "RoundPlan",
    "Strategy",
    "StrategyWrapper",
    "pack_update",
    "sample_clients",
    "unpack_sum",
]


@dataclass(frozen=True)
class RoundPlan:
    """What the server decides at the start of a round.

    Attributes:
        round: 1-based round number.
        clients: ids of the clients asked to train (sorted).
        broadcast: name -> ``[D]`` float32 tensor sent to every selected client
            (``"params"`` always; SCAFFOLD adds ``"control"``).
    """

    round: int
    clients: tuple[int, ...]
    broadcast: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LocalObjective:
    """How a strategy modifies a client's local optimisation.

    Attributes:
        prox_mu: FedProx weight: the gradient gets ``prox_mu * (w - w_global)``.
        grad_correction: ``[D]`` vector added to every local gradient (SCAFFOLD ``c - c_i``).
        track_mean_grad: the trainer also returns the mean of the raw (uncorrected; under DP
            the privatized) minibatch gradients over the local steps, ``LocalResult.mean_grad``.
    """

    prox_mu: float = 0.0
    grad_correction: torch.Tensor | None = None
    track_mean_grad: bool = False


@dataclass(frozen=True)
class ClientUpdate:
    """A client's contribution: vectors that are SUMMED across clients, plus its weight.

    Attributes:
        vectors: name -> ``[D_k]`` float32 tensor, already multiplied by ``weight`` where the
            strategy wants a weighted mean.
        weight: the client's aggregation weight (summed too).
        new_state: the client's private strategy state after this round (kept on the client,
            committed only if its contribution reaches the server).
    """

    vectors: Mapping[str, torch.Tensor]
    weight: float
    new_state: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class CohortSum:
    """What the aggregation protocol returned for one upload cohort.

    A round normally has one cohort (``"all"``: every trainer sends the same vectors). A strategy
    whose clients send different parts (FedDiffuse USPLIT) runs one protocol session per cohort,
    so every client sends only what it shares and each session still reveals only a SUM.

    Attributes:
        sums: name -> float64 ``[D_k]`` sum over the cohort's survivors.
        total_weight: summed weight of the survivors.
        num_contributors: number of survivors.
    """

    sums: Mapping[str, torch.Tensor]
    total_weight: float
    num_contributors: int


def sample_clients(
    available: Sequence[int], fraction: float, minimum: int, rng: np.random.Generator
) -> tuple[int, ...]:
    """Uniformly sample ``max(minimum, round(fraction * n))`` clients without replacement."""
    n = len(available)
    k = min(n, max(minimum, round(fraction * n)))
    chosen = rng.choice(np.asarray(available), size=k, replace=False)
    return tuple(sorted(int(c) for c in chosen))


class Strategy(ABC):
    """Server-side federated optimisation rule.

    Subclasses implement :meth:`aggregate`; the other hooks have FedAvg defaults.
    ``weight_scale`` normalises client weights (``n_i / weight_scale``; the run uses the total
    member count) so every summed value, the summed weight included, stays within [-1, 1]: the
    range that secure aggregation quantises.
    """

    name: ClassVar[str]

    def __init__(self, cfg: StrategyConfig, num_clients: int, weight_scale: float = 1.0) -> None:
        if weight_scale <= 0:
            raise ValueError(f"weight_scale must be > 0, got {weight_scale}")
        self.cfg = cfg
        self.num_clients = num_clients
        self.weight_scale = float(weight_scale)
        self._momentum: torch.Tensor | None = None
        self.ema: torch.Tensor | None = None

    # ----------------------------------------------------------------- planning (server)
    def configure_round(
        self,
        rnd: int,
        global_params: torch.Tensor,
        available: Sequence[int],
        fraction: float,
        minimum: int,
        rng: np.random.Generator,
    ) -> RoundPlan:
        """Select clients and build the broadcast."""
        clients = sample_clients(available, fraction, minimum, rng)
        return RoundPlan(round=rnd, clients=clients, broadcast=self.broadcast(global_params))

    def broadcast(self, global_params: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"params": global_params}

    # ----------------------------------------------------------------- client side
    def set_current_client(self, cid: int) -> None:
        """Called before a client's hooks run (strategies whose clients send different parts
        need the id; default: nothing)."""
        return None

    def start_params(
        self, broadcast: Mapping[str, torch.Tensor], client_state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """``[D]`` parameters a client starts local training from (default: the global model;
        FedDiffuse composes the shared groups with the client's own local groups)."""
        return broadcast["params"]

    def download_numel(
        self, broadcast: Mapping[str, torch.Tensor], client_state: Mapping[str, torch.Tensor]
    ) -> int:
        """Scalars the server sends this client in the broadcast (for the byte count)."""
        return sum(int(v.numel()) for v in broadcast.values())

    def local_objective(
        self, broadcast: Mapping[str, torch.Tensor], client_state: Mapping[str, torch.Tensor]
    ) -> LocalObjective:
        return LocalObjective()

    def client_update(
        self,
        broadcast: Mapping[str, torch.Tensor],
        local_params: torch.Tensor,
        num_examples: int,
        local_steps: int,
        lr: float,
        client_state: Mapping[str, torch.Tensor],
        mean_grad: torch.Tensor | None = None,
    ) -> ClientUpdate:
        """Default: weighted model delta ``w_i * (local - global)`` with ``w_i = n_i / scale``.

        ``mean_grad`` (``[D]``) is ``LocalResult.mean_grad``, present when the strategy's
        ``local_objective`` asked for it (SCAFFOLD); other strategies ignore it."""
        weight = num_examples / self.weight_scale
        delta = (local_params - broadcast["params"]) * weight
        return ClientUpdate(vectors={"delta": delta}, weight=weight)

    # ----------------------------------------------------------------- aggregation (server)
    @abstractmethod
    def aggregate(
        self,
        rnd: int,
        global_params: torch.Tensor,
        sums: Mapping[str, torch.Tensor],
        total_weight: float,
        num_contributors: int,
    ) -> torch.Tensor:
        """Next global ``[D]`` parameters from the SUMS of the contributors' vectors."""

    def upload_cohorts(
        self, rnd: int, updates: Mapping[int, ClientUpdate]
    ) -> dict[str, dict[int, ClientUpdate]]:
        """Group the round's updates into cohorts that send the same vector keys; one protocol
        session sums each cohort. Default: one cohort ``"all"``."""
        return {"all": dict(updates)}

    def aggregate_cohorts(
        self, rnd: int, global_params: torch.Tensor, results: Mapping[str, CohortSum]
    ) -> torch.Tensor:
        """Next global model from the cohorts that completed (default: :meth:`aggregate` of the
        single cohort ``"all"``)."""
        r = results["all"]
        return self.aggregate(rnd, global_params, r.sums, r.total_weight, r.num_contributors)

    def round_metrics(self) -> dict[str, object]:
        """Server-side facts of the last aggregation for ``metrics.jsonl`` (default: none)."""
        return {}

    def personal_params(
        self, global_params: torch.Tensor, client_state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """A client's own composed model when there is no single global model (FedDiffuse UDEC
        and ULATDEC), else None."""
        return None

    def apply_server_update(
        self, global_params: torch.Tensor, mean_delta: torch.Tensor
    ) -> torch.Tensor:
        """``x <- x + server_lr * m`` with optional server momentum (FedAvgM, Hsu et al. 2019),
        then update the EMA of the global model if configured."""
        step = mean_delta
        if self.cfg.server_momentum > 0:
            if self._momentum is None:
                self._momentum = torch.zeros_like(mean_delta)
            self._momentum = self.cfg.server_momentum * self._momentum + mean_delta
            step = self._momentum
        new = global_params + self.cfg.server_lr * step
        if self.cfg.ema_decay > 0:
            if self.ema is None:
                self.ema = new.clone()
            else:
                self.ema = self.cfg.ema_decay * self.ema + (1 - self.cfg.ema_decay) * new
        return new

    def eval_params(self, global_params: torch.Tensor) -> torch.Tensor:
        """Parameters to evaluate and sample from (the EMA when enabled)."""
        return self.ema if self.ema is not None else global_params

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self._momentum is not None:
            out["momentum"] = self._momentum
        if self.ema is not None:
            out["ema"] = self.ema
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._momentum = state.get("momentum")
        self.ema = state.get("ema")


class StrategyWrapper(Strategy):
    """A strategy that adds behaviour around a ``base`` strategy (Flower's DP-wrapper pattern).

    Every client-side and planning hook delegates to ``base``; subclasses override only what
    they change (FedDDPM: server calibration; FedDiffuse: partial exchange; client-level DP:
    clipping and noise). ``aggregate`` stays abstract: a wrapper must say what it does with the
    sums, even if that is ``self.base.aggregate(...)``.
    """

    def __init__(self, base: Strategy) -> None:
        super().__init__(base.cfg, base.num_clients, base.weight_scale)
        self.base = base

    def configure_round(
        self,
        rnd: int,
        global_params: torch.Tensor,
        available: Sequence[int],
        fraction: float,
        minimum: int,
        rng: np.random.Generator,
    ) -> RoundPlan:
        return self.base.configure_round(rnd, global_params, available, fraction, minimum, rng)

    def broadcast(self, global_params: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.base.broadcast(global_params)

    def local_objective(
        self, broadcast: Mapping[str, torch.Tensor], client_state: Mapping[str, torch.Tensor]
    ) -> LocalObjective:
        return self.base.local_objective(broadcast, client_state)

    def client_update(
        self,
        broadcast: Mapping[str, torch.Tensor],
        local_params: torch.Tensor,
        num_examples: int,
        local_steps: int,
        lr: float,
        client_state: Mapping[str, torch.Tensor],
        mean_grad: torch.Tensor | None = None,
    ) -> ClientUpdate:
        return self.base.client_update(
            broadcast, local_params, num_examples, local_steps, lr, client_state, mean_grad
        )

    def eval_params(self, global_params: torch.Tensor) -> torch.Tensor:
        return self.base.eval_params(global_params)


def pack_update(
    vectors: Mapping[str, torch.Tensor], keys: Sequence[str], weight: float
) -> np.ndarray:
    """Concatenate named vectors (in ``keys`` order) and the weight into one float64 vector
    ``[sum_k D_k + 1]``: the single input a client hands to the aggregation protocol."""
    parts = [vectors[k].detach().to("cpu", torch.float64).reshape(-1).numpy() for k in keys]
    return np.concatenate([*parts, np.array([weight], dtype=np.float64)])


def unpack_sum(
    total: np.ndarray, keys: Sequence[str], updates: Mapping[int, ClientUpdate]
) -> tuple[dict[str, torch.Tensor], float]:
    """Split a summed packed vector back into named float64 sums and the total weight."""
    some = next(iter(updates.values()))
    sums: dict[str, torch.Tensor] = {}
    offset = 0
    for k in keys:
        n = some.vectors[k].numel()
        sums[k] = torch.from_numpy(np.ascontiguousarray(total[offset : offset + n]))
        offset += n
    if total.shape[0] != offset + 1:
        raise ValueError(f"summed vector has length {total.shape[0]}, expected {offset + 1}")
    return sums, float(total[offset])
