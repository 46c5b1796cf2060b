"""Secure aggregation: protocols that hand the strategy only the SUM of client vectors."""

from __future__ import annotations

from securefed.config import SecureAggregationConfig
from securefed.secagg.base import (
    AggregationAbortedError,
    AggregationProtocol,
    AggregationResult,
    DistributedNoise,
)
from securefed.secagg.masking import MaskingAggregation
from securefed.secagg.plain import PlainAggregation

__all__ = [
    "AggregationAbortedError",
    "AggregationProtocol",
    "AggregationResult",
    "DistributedNoise",
    "PlainAggregation",
    "build_protocol",
]


def build_protocol(cfg: SecureAggregationConfig, num_clients: int) -> AggregationProtocol:
    """Registry: the protocol named by ``cfg.protocol`` for a federation of ``num_clients``."""
    if cfg.protocol == "plain":
        return PlainAggregation()
    if cfg.protocol == "masking":
        return MaskingAggregation.from_config(cfg, num_clients)
    if cfg.protocol == "ckks":
        from securefed.secagg.ckks import CKKSAggregation  # lazy: CKKS imports TenSEAL

        return CKKSAggregation.from_config(cfg, num_clients)
    raise ValueError(
        f"secure_aggregation.protocol: unknown protocol {cfg.protocol!r}; "
        "choose plain, masking or ckks"
    )
