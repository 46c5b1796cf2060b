"""Plain (insecure) summation: the baseline. The server sees every vector in the clear."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch

from securefed.noise.secure_noise import SecureGaussian
from securefed.secagg.base import (
    AggregationAbortedError,
    AggregationProtocol,
    AggregationResult,
    DistributedNoise,
)

__all__ = ["PlainAggregation"]


def validate_inputs(inputs: Mapping[int, np.ndarray]) -> int:
    """Check that all vectors are 1-D, finite and of one length; return that length."""
    length: int | None = None
    for cid, vec in inputs.items():
        if vec.ndim != 1:
            raise ValueError(f"client {cid}: input must be a 1-D vector, got shape {vec.shape}")
        if length is None:
            length = vec.shape[0]
        elif vec.shape[0] != length:
            raise ValueError(
                f"client {cid}: input length {vec.shape[0]} differs from the others ({length})"
            )
        if not np.all(np.isfinite(vec)):
            raise ValueError(f"client {cid}: input contains NaN or infinite values")
    if length is None:
        raise AggregationAbortedError("no client sent an input this round")
    return length


class PlainAggregation(AggregationProtocol):
    """Sum in the clear; each client sends D float32 values and receives nothing extra."""

    name = "plain"
    dropout_stages = ("upload",)

    def aggregate(
        self,
        round_id: int,
        inputs: Mapping[int, np.ndarray],
        dropouts: Mapping[int, str] | None = None,
        *,
        noise: DistributedNoise | None = None,
    ) -> AggregationResult:
        """Sum in the clear; with ``noise``, the (trusted) server adds ``N(0, noise.std^2)``
        from a fresh SecureGaussian key (central DP-FedAvg, McMahan et al. 2018)."""
        t0 = time.process_time()
        dropped = set(dropouts or {})
        survivors = sorted(c for c in inputs if c not in dropped)
        live = {c: inputs[c] for c in survivors}
        length = validate_inputs(live)
        total = np.zeros(length, dtype=np.float64)
        for c in survivors:
            total += np.asarray(live[c], dtype=np.float32).astype(np.float64)
        info: dict[str, object] = {}
        if noise is not None and noise.std > 0 and survivors:
            total += SecureGaussian().normal((length,), noise.std, dtype=torch.float64).numpy()
            info = {"noise_std_total": noise.std, "encoding_sensitivity": 0.0}
        return AggregationResult(
            total=total,
            survivors=tuple(survivors),
            dropped=tuple(sorted(dropped)),
            bytes_up={c: 4 * length for c in survivors},
            bytes_down={c: 0 for c in survivors},
            server_seconds=time.process_time() - t0,
            info=info,
        )
