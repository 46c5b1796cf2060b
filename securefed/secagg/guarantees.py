"""What a secure-aggregation configuration guarantees, in the terms differential privacy needs.

The privacy layer calibrates distributed noise against two facts of the protocol and reads them
here, through this interface, never from the protocol's internals (issue 16: the privacy <->
secagg cycle; an import-linter contract in ``.importlinter`` enforces it):

- :func:`min_survivors`: the fewest clients whose inputs (and noise shares) can make up a sum the
  server learns, i.e. the protocol's reconstruction threshold over a client's neighbourhood;
- :func:`encoding_sensitivity`: how much one client can move the decoded sum through the
  protocol's integer encoding (the masking grid's stochastic rounding), added to the clipping
  sensitivity (Kairouz, Liu and Steinke 2021, "The Distributed Discrete Gaussian Mechanism").
"""

from __future__ import annotations

import math

from securefed.config import SecureAggregationConfig
from securefed.secagg.base import resolve_threshold
from securefed.secagg.masking.graph import effective_degree
from securefed.secagg.masking.plan import NOISE_HEADROOM
from securefed.secagg.masking.quantize import quantization_params

__all__ = ["encoding_sensitivity", "min_survivors"]


def min_survivors(secagg: SecureAggregationConfig, participants: int) -> int:
    """The fewest survivors whose sum the server can learn in a round of ``participants``.

    ``plain``: every participant (the trusted server adds the whole noise itself). Masking and
    CKKS: the threshold ``t`` of the participants (masking with ``neighbours: k``: of a
    neighbourhood of ``effective_degree(k) + 1`` clients)."""
    if secagg.protocol == "plain":
        return participants
    k = None if secagg.neighbours == "all" else int(secagg.neighbours)
    size = participants if k is None else effective_degree(k, participants) + 1
    return min(participants, resolve_threshold(float(secagg.threshold), size))


def encoding_sensitivity(
    secagg: SecureAggregationConfig, noise_std: float, participants: int, length: int
) -> float:
    """L2 sensitivity the integer encoding adds to one client's packed ``[length]`` input.

    Masking quantises onto a grid of step ``q`` over ``clip_range + NOISE_HEADROOM * noise_std``
    (the noise widens the range): stochastic rounding moves each coordinate by less than one
    step, so at most ``2 sqrt(length) q``. Other protocols add none."""
    if secagg.protocol != "masking":
        return 0.0
    span = secagg.clip_range + NOISE_HEADROOM * noise_std
    q = quantization_params(secagg.bits, span, participants)
    return 2.0 * math.sqrt(length) * q.step
