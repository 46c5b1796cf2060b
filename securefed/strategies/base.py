"""Strategies, split by role: the server part (:class:`Strategy`: plan, aggregate a SUM, state),
the client part (:class:`ClientPolicy`: start params, local objective, update; the client passed
explicitly) and the server optimizer (:class:`ServerOptimizer`: lr, momentum, EMA).

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
    "ClientPolicy",
    "ClientPolicyWrapper",
    "ClientUpdate",
    "CohortSum",
    "LocalObjective",
    "RoundPlan",
    "ServerOptimizer",
    "Strategy",
    "StrategyWrapper",
    "only_cohort",
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


class ServerOptimizer:
    """The server's update rule of every strategy: learning rate, momentum and EMA.

    ``x <- x + server_lr * m`` with ``m = mean_delta`` or, with ``strategy.server_momentum``
    ``beta``, ``m <- beta m + mean_delta`` (FedAvgM, Hsu et al. 2019); then the EMA of the
    global model ``e <- d e + (1 - d) x`` when ``strategy.ema_decay`` ``d > 0`` (``e = x`` at its
    first step). The EMA is what a run releases (:meth:`released`).
    """

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg
        self.momentum: torch.Tensor | None = None
        self.ema: torch.Tensor | None = None
        self._ema_started = False  # the last step initialised the EMA

    def step(self, global_params: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        """``[D]`` next global model from the round's mean delta ``[D]``."""
        m = mean_delta
        if self.cfg.server_momentum > 0:
            if self.momentum is None:
                self.momentum = torch.zeros_like(mean_delta)
            self.momentum = self.cfg.server_momentum * self.momentum + mean_delta
            m = self.momentum
        new = global_params + self.cfg.server_lr * m
        self._ema_started = False
        if self.cfg.ema_decay > 0:
            if self.ema is None:
                self.ema = new.clone()
                self._ema_started = True
            else:
                self.ema = self.cfg.ema_decay * self.ema + (1 - self.cfg.ema_decay) * new
        return new

    def replace_last_step(self, stepped: torch.Tensor, replacement: torch.Tensor) -> None:
        """A server-side correction replaced the model the last :meth:`step` returned
        (``stepped``) by ``replacement`` (FedDDPM's calibration): the EMA becomes what it would
        have been had the step produced ``replacement``: ``e += (1 - d)(replacement - stepped)``,
        or ``e = replacement`` when that step initialised it."""
        if self.ema is None or self.cfg.ema_decay <= 0:
            return
        if self._ema_started:
            self.ema = replacement.clone()
        else:
            self.ema = self.ema + (1 - self.cfg.ema_decay) * (replacement - stepped)

    def released(self, global_params: torch.Tensor) -> torch.Tensor:
        """The parameters to evaluate, sample from and release: the EMA when kept."""
        return self.ema if self.ema is not None else global_params

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.momentum is not None:
            out["momentum"] = self.momentum
        if self.ema is not None:
            out["ema"] = self.ema
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.momentum = state.get("momentum")
        self.ema = state.get("ema")


class ClientPolicy:
    """The client role of a strategy: what a client does with a round's broadcast.

    The client is passed explicitly to every hook (there is no cursor). The default is FedAvg's
    client: start from the global model, the plain local objective, and upload the weighted
    model delta ``w_i (local - global)`` with ``w_i = n_i / weight_scale``.

    Args:
        weight_scale: normalises client weights so that every summed value (the summed weight
            included) stays within [-1, 1], the range secure aggregation quantises.
    """

    def __init__(self, weight_scale: float = 1.0) -> None:
        if weight_scale <= 0:
            raise ValueError(f"weight_scale must be > 0, got {weight_scale}")
        self.weight_scale = float(weight_scale)

    def start_params(
        self, cid: int, broadcast: Mapping[str, torch.Tensor],
        client_state: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """``[D]`` parameters client ``cid`` starts local training from (default: the global
        model; FedDiffuse composes the shared groups with the client's own local groups)."""
        return broadcast["params"]

    def local_objective(
        self, cid: int, broadcast: Mapping[str, torch.Tensor],
        client_state: Mapping[str, torch.Tensor],
    ) -> LocalObjective:
        """How client ``cid``'s local optimisation is modified (FedProx, SCAFFOLD)."""
        return LocalObjective()

    def client_update(
        self,
        cid: int,
        broadcast: Mapping[str, torch.Tensor],
        local_params: torch.Tensor,
        num_examples: int,
        local_steps: int,
        lr: float,
        client_state: Mapping[str, torch.Tensor],
        mean_grad: torch.Tensor | None = None,
    ) -> ClientUpdate:
        """Client ``cid``'s contribution after local training to ``local_params`` ``[D]``.

        ``mean_grad`` (``[D]``) is ``LocalResult.mean_grad``, present when
        :meth:`local_objective` asked for it (SCAFFOLD); other policies ignore it."""
        weight = num_examples / self.weight_scale
        delta = (local_params - broadcast["params"]) * weight
        return ClientUpdate(vectors={"delta": delta}, weight=weight)

    def download_numel(
        self, cid: int, broadcast: Mapping[str, torch.Tensor],
        client_state: Mapping[str, torch.Tensor],
    ) -> int:
        """Scalars the server sends client ``cid`` in the broadcast (for the byte count)."""
        return sum(int(v.numel()) for v in broadcast.values())


class ClientPolicyWrapper(ClientPolicy):
    """A client policy around a ``base`` policy: every hook delegates to ``base`` unless the
    subclass overrides it (``tests/test_strategies.py`` enumerates the hooks)."""

    def __init__(self, base: ClientPolicy) -> None:
        super().__init__(base.weight_scale)
        self.base = base

    def start_params(
        self, cid: int, broadcast: Mapping[str, torch.Tensor],
        client_state: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        return self.base.start_params(cid, broadcast, client_state)

    def local_objective(
        self, cid: int, broadcast: Mapping[str, torch.Tensor],
        client_state: Mapping[str, torch.Tensor],
    ) -> LocalObjective:
        return self.base.local_objective(cid, broadcast, client_state)

    def client_update(
        self,
        cid: int,
        broadcast: Mapping[str, torch.Tensor],
        local_params: torch.Tensor,
        num_examples: int,
        local_steps: int,
        lr: float,
        client_state: Mapping[str, torch.Tensor],
        mean_grad: torch.Tensor | None = None,
    ) -> ClientUpdate:
        return self.base.client_update(
            cid, broadcast, local_params, num_examples, local_steps, lr, client_state, mean_grad
        )

    def download_numel(
        self, cid: int, broadcast: Mapping[str, torch.Tensor],
        client_state: Mapping[str, torch.Tensor],
    ) -> int:
        return self.base.download_numel(cid, broadcast, client_state)


def only_cohort(rnd: int, results: Mapping[str, CohortSum], *, weighted: bool = True) -> CohortSum:
    """The single upload cohort ``"all"`` of a strategy whose clients all send the same vectors.

    ``weighted``: the strategy divides by the summed weight, which must then be positive
    (DP-FedAvg divides by the number of contributors instead: its summed weight is noised)."""
    if set(results) != {"all"}:
        raise ValueError(
            f"round {rnd}: expected the single upload cohort 'all', got {sorted(results)}"
        )
    r = results["all"]
    if r.num_contributors <= 0 or (weighted and r.total_weight <= 0):
        raise ValueError(
            f"round {rnd}: nothing to aggregate ({r.num_contributors} contributors, total "
            f"weight {r.total_weight})"
        )
    return r


def _namespaced(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def _strip(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


class Strategy(ABC):
    """The server role of a federated optimisation rule: plan a round, aggregate the SUMS.

    Its client role is :attr:`client` (a :class:`ClientPolicy`): the engine and the server see
    only this class, a client (in-process or a deployed site) only the policy. The server
    update rule (lr, momentum, EMA) is :attr:`server_opt`. Subclasses implement
    :meth:`aggregate`; the other hooks have FedAvg defaults.

    State dicts are namespaced per layer: ``server.*`` (the optimizer), ``<name>.*`` (the
    strategy's own state, :meth:`own_state`); a wrapper nests its base under ``base.*``.
    """

    name: ClassVar[str]

    def __init__(self, cfg: StrategyConfig, num_clients: int, weight_scale: float = 1.0) -> None:
        if weight_scale <= 0:
            raise ValueError(f"weight_scale must be > 0, got {weight_scale}")
        self.cfg = cfg
        self.num_clients = num_clients
        self.weight_scale = float(weight_scale)
        self.server_opt = ServerOptimizer(cfg)
        self.client: ClientPolicy = self.make_client_policy()

    def make_client_policy(self) -> ClientPolicy:
        """The client role (default: FedAvg's weighted delta)."""
        return ClientPolicy(self.weight_scale)

    # ----------------------------------------------------------------- planning
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
        """name -> ``[D]`` tensors every selected client receives (``"params"`` always)."""
        return {"params": global_params}

    # ----------------------------------------------------------------- aggregation
    def upload_cohorts(
        self, rnd: int, updates: Mapping[int, ClientUpdate]
    ) -> dict[str, dict[int, ClientUpdate]]:
        """Group the round's updates into cohorts that send the same vector keys; one protocol
        session sums each cohort. Default: one cohort ``"all"``."""
        return {"all": dict(updates)}

    @abstractmethod
    def aggregate(
        self, rnd: int, global_params: torch.Tensor, results: Mapping[str, CohortSum]
    ) -> torch.Tensor:
        """Next global ``[D]`` parameters from the SUMS of the cohorts that completed (never an
        individual update)."""

    def round_metrics(self) -> dict[str, object]:
        """Server-side facts of the last aggregation for ``metrics.jsonl`` (default: none)."""
        return {}

    # ----------------------------------------------------------------- what is evaluated
    def eval_params(self, global_params: torch.Tensor) -> torch.Tensor:
        """Parameters to evaluate, sample from and release (the EMA when enabled)."""
        return self.server_opt.released(global_params)

    def personal_params(
        self, global_params: torch.Tensor, client_state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """A client's own composed model when there is no single global model (FedDiffuse UDEC
        and ULATDEC), else None."""
        return None

    # ----------------------------------------------------------------- persistence
    def own_state(self) -> dict[str, torch.Tensor]:
        """The strategy's own state beyond the server optimizer (SCAFFOLD: ``control``)."""
        return {}

    def load_own_state(self, state: Mapping[str, torch.Tensor]) -> None:  # noqa: B027
        """Restore :meth:`own_state` (default: nothing to restore)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **_namespaced("server", self.server_opt.state_dict()),
            **_namespaced(self.name, self.own_state()),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.server_opt.load_state_dict(_strip("server", state))
        self.load_own_state(_strip(self.name, state))


class StrategyWrapper(Strategy):
    """A strategy that adds behaviour around a ``base`` strategy (Flower's DP-wrapper pattern).

    Every hook delegates to ``base`` unless the subclass overrides it, the server optimizer and
    the client policy included (a test enumerates the hooks, so a new hook cannot be silently
    lost under a wrapper). Its state is ``<layer>.*`` (its own) plus ``base.*``.
    """

    #: the wrapper's namespace in state dicts
    layer: ClassVar[str] = "wrapper"

    def __init__(self, base: Strategy) -> None:
        self.base = base
        super().__init__(base.cfg, base.num_clients, base.weight_scale)
        self.server_opt = base.server_opt  # one optimizer: the base's

    def make_client_policy(self) -> ClientPolicy:
        return self.base.client

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

    def upload_cohorts(
        self, rnd: int, updates: Mapping[int, ClientUpdate]
    ) -> dict[str, dict[int, ClientUpdate]]:
        return self.base.upload_cohorts(rnd, updates)

    def aggregate(
        self, rnd: int, global_params: torch.Tensor, results: Mapping[str, CohortSum]
    ) -> torch.Tensor:
        return self.base.aggregate(rnd, global_params, results)

    def round_metrics(self) -> dict[str, object]:
        return self.base.round_metrics()

    def eval_params(self, global_params: torch.Tensor) -> torch.Tensor:
        return self.base.eval_params(global_params)

    def personal_params(
        self, global_params: torch.Tensor, client_state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        return self.base.personal_params(global_params, client_state)

    def own_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_own_state(self, state: Mapping[str, torch.Tensor]) -> None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **_namespaced(self.layer, self.own_state()),
            **_namespaced("base", self.base.state_dict()),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.load_own_state(_strip(self.layer, state))
        self.base.load_state_dict(_strip("base", state))


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
