"""Public parameters and the round plan of the masking protocol (SecAgg / SecAgg+).

:class:`MaskingParams` is what every party is configured with (threshold, neighbours, ring bits,
clip range, client-level noise, run id); :func:`plan_round` derives from it and the round's public
data the :class:`MaskingPlan` every party computes identically: the neighbour graph (Bell et al.
2020), the Shamir threshold (:func:`~securefed.secagg.base.resolve_threshold`) and the
quantisation grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from securefed.secagg.base import resolve_threshold
from securefed.secagg.masking.graph import NeighbourGraph, build_graph
from securefed.secagg.masking.quantize import QuantizationParams, quantization_params

__all__ = [
    "NOISE_HEADROOM",
    "MaskingParams",
    "MaskingPlan",
    "plan_round",
]


@dataclass(frozen=True)
class MaskingParams:
    """Public protocol parameters every party is configured with (not sent on the wire).

    Attributes:
        threshold: a count (>= 2) or a fraction in (0, 1] of the neighbourhood size.
        neighbours: k of the k-regular graph, or None for the complete graph.
        bits: ring Z_{2^bits} of the masked sum.
        clip_range: inputs are clipped to [-clip_range, clip_range].
        noise_std: client-level DP: std of the noise the round's sum carries when every
            participant contributes (0: none). Each client adds a discrete Gaussian share
            ``N_Z(0, (noise_std / step)^2 / n)`` in grid units after quantisation (Kairouz et al.
            2021); the grid is widened by :data:`NOISE_HEADROOM` ``* noise_std`` so that the
            noisy sum cannot wrap mod ``2^bits`` (except with probability below ``10^-32`` per
            coordinate).
        session: the run id (agreed at setup, fresh per run): bound into every signature, HKDF
            info and AEAD associated data, so nothing of one run verifies in another. (The
            neighbour graph stays a function of the round and the participants: public, and
            reproducible across runs of one seed.)
        consistency_check: run the CONSISTENCY_CHECK stage (default; needed against a malicious
            server, Bonawitz et al. 2017 §6). ``False`` is their semi-honest protocol: the
            server sends the unmasking request right after the masked inputs, with no
            signatures on the survivor set; a server that tells two groups of clients different
            survivor sets could then collect both kinds of share of one client and unmask its
            input, so only a server trusted to follow the protocol may be given it.
    """

    threshold: float
    neighbours: int | None
    bits: int
    clip_range: float
    noise_std: float = 0.0
    session: bytes = b""
    consistency_check: bool = True


#: the quantisation grid is widened by this many noise standard deviations on each side
NOISE_HEADROOM = 12.0


@dataclass(frozen=True)
class MaskingPlan:
    """Everything public about one round that every party derives identically."""

    round_id: int
    participants: tuple[int, ...]
    vector_length: int
    graph: NeighbourGraph
    threshold: int
    quant: QuantizationParams


def plan_round(
    params: MaskingParams, round_id: int, participants: Sequence[int], vector_length: int
) -> MaskingPlan:
    """Derive the round's graph, threshold and quantisation grid from public data.

    Raises:
        ValueError: a threshold or bit width that cannot work for this round.
    """
    ids = tuple(sorted(set(participants)))
    if len(ids) != len(participants):
        raise ValueError("participants must be distinct")
    graph = build_graph(round_id, ids, params.neighbours)
    t = resolve_threshold(params.threshold, graph.neighbourhood_size)
    clip = params.clip_range + NOISE_HEADROOM * params.noise_std
    quant = quantization_params(params.bits, clip, len(ids))
    return MaskingPlan(round_id, ids, int(vector_length), graph, t, quant)
