"""Pairwise-masking secure aggregation: SecAgg (Bonawitz et al. 2017), SecAgg+ (Bell et al. 2020).

Folder by role: :mod:`.client` and :mod:`.server` are transport-agnostic state machines (bytes
in, bytes out), :mod:`.protocol` drives them in-process; :mod:`.messages` holds the stage names,
errors and signed wire messages, :mod:`.plan` the public parameters and round plan,
:mod:`.state` the per-party state; :mod:`.shamir`, :mod:`.quantize`, :mod:`.graph` and
:mod:`~securefed.noise.prg` are the pure building blocks.
"""

from __future__ import annotations

from securefed.secagg.base import resolve_threshold
from securefed.secagg.masking.client import MaskingClient
from securefed.secagg.masking.graph import NeighbourGraph, build_graph
from securefed.secagg.masking.messages import (
    Message,
    ProtocolAbort,
    ProtocolError,
    Stage,
    decode_message,
)
from securefed.secagg.masking.plan import MaskingParams, MaskingPlan, plan_round
from securefed.secagg.masking.protocol import Intercept, MaskingAggregation
from securefed.secagg.masking.quantize import (
    QuantizationParams,
    dequantize_sum,
    quantization_error_bound,
    quantization_params,
    quantize,
)
from securefed.secagg.masking.server import MaskingServer, ReceivedMessage, ServerOutput, ServerView
from securefed.secagg.masking.state import ClientState, ServerState

__all__ = [
    "ClientState",
    "Intercept",
    "MaskingAggregation",
    "MaskingClient",
    "MaskingParams",
    "MaskingPlan",
    "MaskingServer",
    "Message",
    "NeighbourGraph",
    "ProtocolAbort",
    "ProtocolError",
    "QuantizationParams",
    "ReceivedMessage",
    "ServerOutput",
    "ServerState",
    "ServerView",
    "Stage",
    "build_graph",
    "decode_message",
    "dequantize_sum",
    "plan_round",
    "quantization_error_bound",
    "quantization_params",
    "quantize",
    "resolve_threshold",
]
