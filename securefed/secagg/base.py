"""The aggregation-protocol interface: client contribution vectors in, their SUM out.

A protocol is transport-agnostic. :meth:`AggregationProtocol.aggregate` drives the client and
server roles of one round in-process, passing only protocol messages between them, and returns
only the sum over surviving clients (plus accounting). Strategies never see an individual vector.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

__all__ = [
    "AggregationAbortedError",
    "AggregationProtocol",
    "AggregationResult",
    "DistributedNoise",
    "resolve_threshold",
]


class AggregationAbortedError(RuntimeError):
    """The round could not be aggregated (e.g. fewer survivors than the threshold).

    Raised fail-closed: nothing about any individual input has been revealed.
    """



def resolve_threshold(threshold: float, size: int) -> int:
    """The minimum number of survivors ``t`` of a group of ``size`` clients (the one meaning of
    ``secure_aggregation.threshold`` for every protocol).

    A fraction ``f`` in (0, 1] gives ``ceil(f * size)`` clamped to ``[2, size]``; a count
    (``> 1``) is used as is. Masking takes ``size`` = a client's closed neighbourhood (the whole
    round in SecAgg, the k + 1 share holders in SecAgg+); CKKS the round's selected clients.

    Raises:
        ValueError: a non-integer count, or a count above ``size`` (names the config field).
    """
    if threshold <= 0:
        raise ValueError(f"secure_aggregation.threshold: must be > 0, got {threshold}")
    if threshold <= 1:
        t = math.ceil(threshold * size - 1e-9)
        return max(2, min(t, size))
    if threshold != int(threshold):
        raise ValueError(f"secure_aggregation.threshold: a count must be an integer: {threshold}")
    t = int(threshold)
    if t > size:
        raise ValueError(
            f"secure_aggregation.threshold: t={t} exceeds the {size} clients it is taken over "
            "(a round's clients, or a SecAgg+ neighbourhood of share holders); lower it or use "
            "a fraction"
        )
    return t


@dataclass(frozen=True)
class AggregationResult:
    """Outcome of one aggregation round.

    Attributes:
        total: ``[D]`` float64, the sum of the survivors' input vectors.
        survivors: ids of the clients whose inputs are in ``total`` (sorted).
        dropped: ids of the clients that dropped out at any stage (sorted).
        bytes_up: bytes each client sent towards the server (all stages).
        bytes_down: bytes each client received from the server (all stages).
        client_seconds: CPU seconds each client spent in the protocol.
        server_seconds: CPU seconds the server spent in the protocol.
        info: protocol-specific facts for the run report (e.g. dropouts recovered).
    """

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    bytes_up: Mapping[int, int]
    bytes_down: Mapping[int, int]
    client_seconds: Mapping[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    info: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class DistributedNoise:
    """Gaussian noise the SUM must carry (client-level DP, McMahan et al. 2018).

    ``std`` is the standard deviation of the noise on every coordinate of the sum when all
    ``expected`` clients of the round contribute. Where the server is trusted (``plain``) it adds
    the noise itself; under secure aggregation each client adds a share of variance
    ``std^2 / expected`` to its own vector before it leaves the client (in the protocol's integer
    domain for ``masking``: distributed discrete Gaussian, Kairouz et al. 2021), so the server
    never sees an un-noised sum. The protocol reports in ``info`` the std the survivors' shares
    actually add up to (``noise_std_total``) and any extra sensitivity its encoding introduces
    (``encoding_sensitivity``, input units), for the accountant.
    """

    std: float
    expected: int

    def __post_init__(self) -> None:
        if not (self.std >= 0 and np.isfinite(self.std)):
            raise ValueError(f"DistributedNoise.std: must be finite and >= 0, got {self.std}")
        if self.expected < 1:
            raise ValueError(f"DistributedNoise.expected: must be >= 1, got {self.expected}")

    def share_std(self) -> float:
        """Std of one client's share: ``std / sqrt(expected)``."""
        return float(self.std / np.sqrt(self.expected))


class AggregationProtocol(ABC):
    """Sums client vectors. Subclasses: ``plain``, ``masking`` (SecAgg/SecAgg+), ``ckks``."""

    name: ClassVar[str]
    #: stages at which a client can drop out, in protocol order; the first one means the client
    #: never sends anything that depends on its input (it need not train at all).
    dropout_stages: ClassVar[tuple[str, ...]]

    @abstractmethod
    def aggregate(
        self,
        round_id: int,
        inputs: Mapping[int, np.ndarray],
        dropouts: Mapping[int, str] | None = None,
        *,
        noise: DistributedNoise | None = None,
    ) -> AggregationResult:
        """Run one round.

        Args:
            round_id: the round number, bound into every message.
            inputs: client id -> ``[D]`` float vector (same D for all). Clients that drop at the
                first stage may be absent.
            dropouts: client id -> the stage (one of :attr:`dropout_stages`) at which it drops.
            noise: Gaussian noise the sum must carry (client-level DP), or None.

        Raises:
            AggregationAbortedError: the round cannot complete safely.
            ValueError: malformed input (names the client and the check).
        """
