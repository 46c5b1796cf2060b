"""In-process driver of one SecAgg / SecAgg+ round: :class:`MaskingAggregation`.

Bonawitz et al. 2017 (pairwise + self masks, Shamir-shared secrets, dropout recovery) with the
random k-regular neighbour graph of Bell et al. 2020 (SecAgg+). The driver only carries bytes
between :class:`~securefed.secagg.masking.client.MaskingClient` and
:class:`~securefed.secagg.masking.server.MaskingServer`, exactly as a network would, and accounts
for them: bytes per client each way (the encoded message sizes), client CPU seconds
(``time.process_time`` around each client step), server CPU seconds. The server's record of
every byte it received is kept in :attr:`MaskingAggregation.last_server_view`.

A client listed in ``dropouts`` at stage S is offline from S on: it neither receives nor sends
anything in S or later. Dropping at ``advertise_keys`` means it never sent anything at all, so it
need not train. A client that drops at ``consistency_check`` or ``unmasking`` has already sent its
masked input: its input IS in the sum, so it appears in ``survivors`` (inputs in the total) and
also in ``dropped`` (it dropped out at some stage); ``info["late_dropouts"]`` lists them.

The returned total is the sum of the survivors' inputs clipped to ``[-clip_range, clip_range]``,
within :func:`~securefed.secagg.masking.quantize.quantization_error_bound` per coordinate.

Threat model (what the masks protect, and under which assumptions):

- Honest-but-curious server: it sees masked vectors that are uniform in ``Z_{2^bits}`` and
  learns only the sum over U3 (>= t >= 2 clients, on a connected masking graph; rounds where
  this cannot hold abort before any share is requested).
- Actively malicious server: every client message is Ed25519-signed against the roster (a PKI
  assumed honest), shares travel under AES-GCM bound to (round, sender, recipient), and the
  consistency check makes every revealing client see ``t`` signatures on one survivor set. Two
  disjoint groups of ``t`` clients could still be shown different survivor sets if ``2t <= n``,
  so against such a server the threshold must exceed 1/2, and 2/3 when up to n/3 clients may
  collude with it (Bonawitz et al. 2017); the config default 0.67 gives ``t > 2n/3``. Every
  message, key and ciphertext is bound to the run id (:attr:`MaskingParams.session`; fresh per
  :meth:`MaskingAggregation.from_config`), so nothing of one run is accepted in another.
- SecAgg+ (k-regular): thresholds are relative to the k + 1 clients of a neighbourhood and the
  guarantees of Bell et al. 2020 hold with high probability over the random graph. The graph's
  randomness is public and derived from the round id and the participant ids, so a server that
  chooses who participates can influence it; a trusted beacon would remove that.
- In-process, a :class:`ProtocolError` ends the round: it is re-raised as
  :class:`~.messages.ProtocolAbort`, which is also an ``AggregationAbortedError``, so the round
  loop abandons the round rather than the run. The server changes no state before a message
  passes its checks, so a deployment may instead treat the offending client as dropped. A wrong
  Shamir share at unmasking does not end the round when enough correct shares remain
  (``info["bad_share_holders"]`` names who sent it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping

import numpy as np

from securefed.config import SecureAggregationConfig
from securefed.secagg.base import (
    AggregationAbortedError,
    AggregationProtocol,
    AggregationResult,
    DistributedNoise,
    resolve_threshold,
)
from securefed.secagg.keys import Identities, ephemeral_identities, load_identities
from securefed.secagg.masking.client import MaskingClient
from securefed.secagg.masking.graph import effective_degree
from securefed.secagg.masking.messages import ProtocolAbort, ProtocolError, Stage
from securefed.secagg.masking.plan import MaskingParams, plan_round
from securefed.secagg.masking.quantize import quantization_error_bound, quantization_params
from securefed.secagg.masking.server import MaskingServer, ServerView
from securefed.secagg.plain import validate_inputs

__all__ = ["Intercept", "MaskingAggregation"]

#: ``(direction "up"/"down", stage, client id, message bytes) -> bytes actually delivered``
Intercept = Callable[[str, str, int, bytes], bytes]


class MaskingAggregation(AggregationProtocol):
    """Pairwise-masking secure aggregation (SecAgg, or SecAgg+ with a k-regular graph).

    Args:
        params: public parameters (threshold spec, k, bits, clip range).
        identities: signing keys of clients and server, and the roster.
        record_server_view: keep every byte the server receives in :attr:`last_server_view`.
        intercept: optional hook standing in for the network (fault injection in tests).
    """

    name = "masking"
    dropout_stages = Stage.ORDER

    def __init__(
        self,
        params: MaskingParams,
        identities: Identities,
        *,
        record_server_view: bool = True,
        intercept: Intercept | None = None,
    ) -> None:
        self.params = params
        self.identities = identities
        self.record_server_view = record_server_view
        self.intercept = intercept
        self.last_server_view: ServerView | None = None
        self.last_server: MaskingServer | None = None

    @classmethod
    def from_config(
        cls, cfg: SecureAggregationConfig, num_clients: int, *, record_server_view: bool = False
    ) -> MaskingAggregation:
        """Build from ``secure_aggregation``: resolve and validate threshold, k, bits, keys.

        The threshold is resolved per round against the closed-neighbourhood size (the round's
        clients for ``neighbours: all``, k + 1 for a k-regular graph); here it is checked against
        a round with all ``num_clients`` clients.

        Raises:
            ValueError: naming the ``secure_aggregation`` field at fault.
        """
        if num_clients < 2:
            raise ValueError(
                f"secure_aggregation.protocol: masking needs at least 2 clients, got {num_clients}"
            )
        k = None if cfg.neighbours == "all" else int(cfg.neighbours)
        degree = effective_degree(k, num_clients)
        resolve_threshold(float(cfg.threshold), degree + 1)
        quantization_params(cfg.bits, cfg.clip_range, num_clients)
        # a fresh run id: no message, key or ciphertext of another run verifies in this one
        params = MaskingParams(
            float(cfg.threshold), k, cfg.bits, float(cfg.clip_range), session=os.urandom(16),
            consistency_check=cfg.server_threat == "malicious",
        )
        if cfg.keys_dir is None:
            identities = ephemeral_identities(num_clients)
        else:
            identities = load_identities(cfg.keys_dir, num_clients)
        return cls(params, identities, record_server_view=record_server_view)

    def _deliver(self, direction: str, stage: str, cid: int, data: bytes) -> bytes:
        return data if self.intercept is None else self.intercept(direction, stage, cid, data)

    def aggregate(
        self,
        round_id: int,
        inputs: Mapping[int, np.ndarray],
        dropouts: Mapping[int, str] | None = None,
        *,
        noise: DistributedNoise | None = None,
    ) -> AggregationResult:
        """Run one round in-process; see the module docstring for dropout semantics.

        With ``noise`` (client-level DP), every participant adds a discrete Gaussian share in the
        integer domain before masking (see :class:`~.plan.MaskingParams`); ``info`` reports the
        std the survivors' shares add up to and the sensitivity added by stochastic rounding
        (``sqrt(D)`` grid steps, Kairouz et al. 2021 §4), both in input units.

        Raises:
            AggregationAbortedError: too few clients at some stage (fail closed).
            ValueError / ProtocolError: malformed input or message, naming the client and check.
        """
        drops = dict(dropouts or {})
        for cid, stage in drops.items():
            if stage not in self.dropout_stages:
                raise ValueError(
                    f"client {cid}: unknown dropout stage {stage!r}; one of {self.dropout_stages}"
                )
        if not self.params.consistency_check:  # no such stage: it drops before unmasking
            drops = {
                c: Stage.UNMASKING if st == Stage.CONSISTENCY_CHECK else st
                for c, st in drops.items()
            }
        participants = sorted(set(inputs) | set(drops))
        roster = self.identities.roster
        for cid in participants:
            if roster.client(cid) is None or cid not in self.identities.client_keys:
                raise ProtocolError(cid, "sender", "not in the roster (unknown client)")
        sends_input = Stage.index(Stage.MASKED_INPUT)
        for cid in participants:
            at = drops.get(cid)
            if (at is None or Stage.index(at) > sends_input) and cid not in inputs:
                raise ValueError(f"client {cid}: no input vector, yet it sends a masked input")
        length = validate_inputs(inputs)
        params = self.params
        if noise is not None and noise.std > 0:
            params = dataclasses.replace(params, noise_std=float(noise.std))
        try:  # e.g. a count threshold above this round's (sampled) neighbourhood size
            plan_round(params, round_id, participants, length)
        except ValueError as exc:
            raise AggregationAbortedError(f"round {round_id} cannot run: {exc}") from exc

        bytes_up = {c: 0 for c in participants}
        bytes_down = {c: 0 for c in participants}
        client_seconds = {c: 0.0 for c in participants}
        t0 = time.process_time()
        server = MaskingServer(
            round_id,
            participants,
            length,
            params,
            roster,
            self.identities.server_key,
            record_view=self.record_server_view,
        )
        server_seconds = time.process_time() - t0
        self.last_server = server
        self.last_server_view = server.view
        clients = {
            c: MaskingClient(
                c, round_id, params, self.identities.client_keys[c], roster, inputs.get(c)
            )
            for c in participants
        }
        offline: set[int] = set()
        t0 = time.process_time()
        down = server.start()
        server_seconds += time.process_time() - t0
        try:
            for stage in Stage.path(params.consistency_check):
                for cid, data in down.items():
                    if drops.get(cid) == stage or cid in offline:
                        offline.add(cid)
                        continue
                    data = self._deliver("down", stage, cid, data)
                    bytes_down[cid] += len(data)
                    t0 = time.process_time()
                    reply = clients[cid].handle(data)
                    client_seconds[cid] += time.process_time() - t0
                    reply = self._deliver("up", stage, cid, reply)
                    bytes_up[cid] += len(reply)
                    t0 = time.process_time()
                    server.receive(cid, reply)
                    server_seconds += time.process_time() - t0
                t0 = time.process_time()
                down = server.close_stage()
                server_seconds += time.process_time() - t0
        except ProtocolAbort:
            raise
        except ProtocolError as exc:  # the round ends; the run goes on (AggregationAbortedError)
            raise ProtocolAbort.wrap(exc) from exc
        out = server.output
        if out is None:  # pragma: no cover - close_stage sets it or raises
            raise AggregationAbortedError("secure aggregation ended without a result")
        late = sorted(c for c in out.survivors if c in drops)
        dropped = sorted(set(participants) - set(out.survivors) | set(drops))
        plan = server.state.plan
        info: dict[str, object] = {
            "dropouts_recovered": len(out.recovered),
            "recovered_clients": list(out.recovered),
            "threshold": plan.threshold,
            "neighbours": "all" if plan.graph.complete else plan.graph.degree,
            "pruned": list(out.pruned),
            "late_dropouts": late,
            "bits": self.params.bits,
            "quantization_error_bound": quantization_error_bound(plan.quant, len(out.survivors)),
            "bad_share_holders": list(out.bad_share_holders),
        }
        if params.noise_std > 0:
            info["noise_std_total"] = params.noise_std * math.sqrt(
                len(out.survivors) / len(participants)
            )
            info["encoding_sensitivity"] = 2.0 * math.sqrt(length) * plan.quant.step
            info["grid_step"] = plan.quant.step
        return AggregationResult(
            total=out.total,
            survivors=out.survivors,
            dropped=tuple(dropped),
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            client_seconds=client_seconds,
            server_seconds=server_seconds,
            info=info,
        )
