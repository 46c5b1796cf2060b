"""The aggregation-protocol interface: client contribution vectors in, their SUM out.

A protocol is transport-agnostic. :meth:`AggregationProtocol.aggregate` drives the client and
server roles of one round in-process, passing only protocol messages between them, and returns
only the sum over surviving clients (plus accounting). Strategies never see an individual vector.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

__all__ = ["AggregationAbortedError", "AggregationProtocol", "AggregationResult"]


class AggregationAbortedError(RuntimeError):
    """The round could not be aggregated (e.g. fewer survivors than the threshold).

    Raised fail-closed: nothing about any individual input has been revealed.
    """


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
    ) -> AggregationResult:
        """Run one round.

        Args:
            round_id: the round number, bound into every message.
            inputs: client id -> ``[D]`` float vector (same D for all). Clients that drop at the
                first stage may be absent.
            dropouts: client id -> the stage (one of :attr:`dropout_stages`) at which it drops.

        Raises:
            AggregationAbortedError: the round cannot complete safely.
            ValueError: malformed input (names the client and the check).
        """
