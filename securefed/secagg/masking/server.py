"""Server role of SecAgg / SecAgg+: collects messages, relays, and unmasks only the sum.

Bonawitz et al. 2017 (Fig. 4, server side) with the neighbour graph of Bell et al. 2020. The
server does no I/O: the driver calls :meth:`MaskingServer.receive` with the bytes a client sent
(and the client id the transport authenticated), then :meth:`MaskingServer.close_stage` to get the
bytes of the next stage's messages. Each masked input is folded into one running sum on arrival,
so no individual vector is ever held apart from its received bytes, which are kept in
:attr:`MaskingServer.view` for audit (every byte the server receives, in order).

Fail-closed rules (``AggregationAbortedError``, raised before any share is requested when the
problem is already visible):

- fewer than ``t`` clients at any stage;
- a client whose closed neighbourhood has fewer than ``t`` live members is pruned (it could not
  share with threshold t); after pruning, fewer than ``t`` clients aborts;
- the survivors' masking graph is disconnected (partial sums would be revealed);
- fewer than ``t`` neighbours of a survivor or of a dropped client left to answer at unmasking;
- a secret that no ``t`` of its returned shares reconstruct so that it matches its commitment.

Wrong shares: reconstruction is robust (:func:`~.shamir.reconstruct_verified`): with enough
correct shares it succeeds, and :attr:`ServerOutput.bad_share_holders` names the holders whose
returned shares were wrong. The blame falls on the holder, never on the secret's owner. (An
owner that dealt inconsistent shares could make an honest holder look wrong; verifiable secret
sharing would rule that out and is not implemented.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from securefed.noise.prg import MaskAccumulator, agreed_key, mask_sign, self_mask_key
from securefed.secagg.base import AggregationAbortedError
from securefed.secagg.keys import Roster
from securefed.secagg.masking import shamir
from securefed.secagg.masking.client import b_commitment
from securefed.secagg.masking.messages import (
    CLIENT_MESSAGES,
    PUBLIC_KEY_BYTES,
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyBroadcast,
    MaskedInput,
    Message,
    ProtocolError,
    RoundStart,
    ShareBroadcast,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    decode_message,
    verify_encoded,
)
from securefed.secagg.masking.plan import MaskingParams, plan_round
from securefed.secagg.masking.quantize import (
    decode_words,
    dequantize_sum,
    reduce_words,
    word_dtype,
)
from securefed.secagg.masking.state import ServerState

__all__ = ["MaskingServer", "ReceivedMessage", "ServerOutput", "ServerView"]

_CLIENT_MESSAGE_OF: dict[str, type[Message]] = {m.STAGE: m for m in CLIENT_MESSAGES}


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server received it: the stage, the transport's client id, the bytes."""

    stage: str
    client_id: int
    data: bytes


@dataclass
class ServerView:
    """Every byte the server received in a round, in arrival order."""

    round_id: int
    messages: list[ReceivedMessage] = field(default_factory=list)

    def total_bytes(self) -> int:
        return sum(len(m.data) for m in self.messages)

    def from_client(self, client_id: int, stage: str | None = None) -> list[bytes]:
        return [
            m.data
            for m in self.messages
            if m.client_id == client_id and (stage is None or m.stage == stage)
        ]


@dataclass(frozen=True)
class ServerOutput:
    """What the server learns at the end of a round.

    Attributes:
        total: ``[D]`` float64, the sum of the survivors' (clipped, quantised) inputs.
        survivors: U3, the clients whose masked inputs are in the sum.
        recovered: dropped clients whose pairwise masks were removed via their s-key shares.
        pruned: clients dropped by the server because their neighbourhood was below threshold.
        bad_share_holders: clients that returned a wrong share at unmasking (the round still
            completed from the others' shares).
    """

    total: np.ndarray
    survivors: tuple[int, ...]
    recovered: tuple[int, ...]
    pruned: tuple[int, ...]
    bad_share_holders: tuple[int, ...] = ()


class MaskingServer:
    """The server's side of one round.

    Args:
        round_id: the round number (bound into every message).
        participants: the round's client ids.
        vector_length: D, the length every input must have.
        params: public protocol parameters.
        roster: public keys of the clients and of the server.
        signing_key: the server's Ed25519 key (it signs what it sends).
        record_view: keep the received bytes in :attr:`view` (tests, audits); benchmarks of large
            rounds may turn it off to save memory.
    """

    def __init__(
        self,
        round_id: int,
        participants: Iterable[int],
        vector_length: int,
        params: MaskingParams,
        roster: Roster,
        signing_key: Ed25519PrivateKey,
        *,
        record_view: bool = True,
    ) -> None:
        ids = sorted(set(participants))
        unknown = [c for c in ids if roster.client(c) is None]
        if unknown:
            raise ProtocolError(unknown[0], "sender", "not in the roster (unknown client)")
        plan = plan_round(params, round_id, ids, vector_length)
        self.state = ServerState(plan=plan)
        self.view = ServerView(round_id)
        self.record_view = record_view
        self.output: ServerOutput | None = None
        self._roster = roster
        self._key = signing_key
        self._session = params.session
        self.params = params
        self._bad_holders: set[int] = set()
        self._sum = MaskAccumulator(np.zeros(vector_length, dtype=word_dtype(params.bits)))
        self._b_shares: dict[int, dict[int, int]] = {}  # owner -> {point: share}
        self._s_shares: dict[int, dict[int, int]] = {}
        self._needed_dropped: tuple[int, ...] = ()

    # ------------------------------------------------------------------------------ helpers

    @property
    def stage(self) -> str:
        return self.state.stage

    @property
    def threshold(self) -> int:
        return self.state.plan.threshold

    def _abort(self, reason: str) -> AggregationAbortedError:
        self.state.stage = "aborted"
        return AggregationAbortedError(
            f"secure aggregation round {self.state.plan.round_id} aborted: {reason}"
        )

    def _closed(self, u: int, live: Iterable[int]) -> set[int]:
        return set(self.state.plan.graph.closed_neighbourhood(u)) & set(live)

    def _prune(self, live: Iterable[int]) -> list[int]:
        """Drop clients with fewer than t live members in their closed neighbourhood (fixpoint)."""
        alive = set(live)
        changed = True
        while changed:
            changed = False
            for u in sorted(alive):
                if len(self._closed(u, alive)) < self.threshold:
                    alive.discard(u)
                    self.state.pruned.add(u)
                    changed = True
        return sorted(alive)

    def _out(self, messages: dict[int, Message]) -> dict[int, bytes]:
        return {
            cid: replace(m, session=self._session).signed_bytes(self._key)
            for cid, m in sorted(messages.items())
        }

    # ------------------------------------------------------------------------------- driver

    def start(self) -> dict[int, bytes]:
        """Open ADVERTISE_KEYS: a :class:`RoundStart` for every participant."""
        plan = self.state.plan
        return self._out(
            {
                c: RoundStart(plan.round_id, c, plan.participants, plan.vector_length)
                for c in plan.participants
            }
        )

    def receive(self, client_id: int, data: bytes) -> None:
        """Check and absorb one client message of the current stage.

        Args:
            client_id: the sender as authenticated by the transport.
            data: the message bytes.

        Raises:
            ProtocolError: naming ``client_id`` and the failed check.
        """
        state, plan = self.state, self.state.plan
        if self.record_view:
            self.view.messages.append(ReceivedMessage(state.stage, client_id, bytes(data)))
        pub = self._roster.client(client_id)
        if pub is None:
            raise ProtocolError(client_id, "sender", "not in the roster (unknown client)")
        if client_id not in plan.participants:
            raise ProtocolError(client_id, "sender", f"not a participant of round {plan.round_id}")
        msg = decode_message(data, client_id, self._session)
        expected = _CLIENT_MESSAGE_OF.get(state.stage)
        sender = getattr(msg, "sender", None)
        if sender != client_id:
            raise ProtocolError(client_id, "sender", f"message claims to be from client {sender}")
        if msg.round_id != plan.round_id:
            raise ProtocolError(
                client_id, "round id", f"message for round {msg.round_id}, expected {plan.round_id}"
            )
        if expected is None or not isinstance(msg, expected):
            raise ProtocolError(
                client_id, "stage", f"unexpected {type(msg).__name__} in stage {state.stage}"
            )
        if not verify_encoded(data, pub, self._session):
            raise ProtocolError(client_id, "signature", f"{type(msg).__name__} does not verify")
        if isinstance(msg, AdvertiseKeys):
            self._on_advertise(client_id, msg, data)
        elif isinstance(msg, ShareKeys):
            self._on_share(client_id, msg)
        elif isinstance(msg, MaskedInput):
            self._on_masked(client_id, msg)
        elif isinstance(msg, ConsistencySignature):
            self._on_consistency(client_id, msg)
        elif isinstance(msg, UnmaskShares):
            self._on_unmask(client_id, msg)

    def close_stage(self) -> dict[int, bytes]:
        """End the current stage: apply the threshold checks, return the next stage's messages.

        After UNMASKING it returns ``{}`` and sets :attr:`output`.

        Raises:
            AggregationAbortedError: the round cannot complete safely (fail closed).
        """
        stage = self.state.stage
        if stage == Stage.ADVERTISE_KEYS:
            out = self._close_advertise()
        elif stage == Stage.SHARE_KEYS:
            out = self._close_share()
        elif stage == Stage.MASKED_INPUT:
            out = self._close_masked()
        elif stage == Stage.CONSISTENCY_CHECK:
            out = self._close_consistency()
        elif stage == Stage.UNMASKING:
            self._close_unmask()
            out = {}
        else:
            raise RuntimeError(f"close_stage in stage {stage}")
        if self.state.stage != "aborted":
            path = Stage.path(self.params.consistency_check)
            i = path.index(stage)
            self.state.stage = path[i + 1] if i + 1 < len(path) else Stage.DONE
        return out

    # ------------------------------------------------------------------------ stage handlers

    def _duplicate(self, client_id: int, seen: Iterable[int]) -> None:
        if client_id in seen:
            raise ProtocolError(client_id, "duplicate", f"second message in stage {self.stage}")

    def _on_advertise(self, cid: int, msg: AdvertiseKeys, raw: bytes) -> None:
        self._duplicate(cid, self.state.advertised)
        if len(msg.c_public) != PUBLIC_KEY_BYTES or len(msg.s_public) != PUBLIC_KEY_BYTES:
            raise ProtocolError(cid, "format", "public keys must be 32 bytes")
        self.state.advertised[cid] = msg
        self.state.advertised_raw[cid] = bytes(raw)

    def _close_advertise(self) -> dict[int, bytes]:
        state = self.state
        u1 = self._prune(state.advertised)
        if len(u1) < self.threshold:
            raise self._abort(f"{len(u1)} clients advertised keys, threshold is {self.threshold}")
        state.u1 = tuple(u1)
        g = state.plan.graph
        return self._out(
            {
                u: KeyBroadcast(
                    state.plan.round_id,
                    u,
                    tuple((v, state.advertised_raw[v]) for v in sorted(g.neighbours(u) & set(u1))),
                )
                for u in u1
            }
        )

    def _on_share(self, cid: int, msg: ShareKeys) -> None:
        state = self.state
        self._duplicate(cid, state.shared)
        if cid not in state.u1:
            raise ProtocolError(cid, "stage", "sent shares without being in the key broadcast")
        expected = sorted(state.plan.graph.neighbours(cid) & set(state.u1))
        if [v for v, _ in msg.ciphertexts] != expected:
            raise ProtocolError(cid, "share recipients", f"expected ciphertexts for {expected}")
        if len(msg.b_commit) != 32:
            raise ProtocolError(cid, "format", "b commitment must be 32 bytes")
        state.shared[cid] = msg

    def _close_share(self) -> dict[int, bytes]:
        state = self.state
        u2 = self._prune(state.shared)
        if len(u2) < self.threshold:
            raise self._abort(f"{len(u2)} clients shared keys, threshold is {self.threshold}")
        state.u2 = tuple(u2)
        live = set(u2)
        inbox: dict[int, list[tuple[int, bytes]]] = {v: [] for v in u2}
        for u in u2:
            for v, ct in state.shared[u].ciphertexts:
                if v in live:
                    inbox[v].append((u, ct))
        return self._out(
            {v: ShareBroadcast(state.plan.round_id, v, tuple(sorted(inbox[v]))) for v in u2}
        )

    def _on_masked(self, cid: int, msg: MaskedInput) -> None:
        state = self.state
        self._duplicate(cid, state.masked_from)
        if cid not in state.u2:
            raise ProtocolError(cid, "stage", "sent a masked input without being in U2")
        try:
            words = decode_words(msg.masked, state.plan.vector_length, state.plan.quant.bits)
        except ValueError as exc:
            check = str(exc).split(":", 1)[0]
            raise ProtocolError(cid, check, f"masked input: {exc}") from exc
        np.add(self._sum.words, words, out=self._sum.words)  # folded in at once, never kept
        state.masked_from.append(cid)

    def _needed(self, u3: Iterable[int], responders: Iterable[int]) -> str | None:
        """Why unmasking cannot succeed with these responders (None if it can)."""
        g, t = self.state.plan.graph, self.threshold
        u3s, resp = set(u3), set(responders)
        for u in sorted(u3s):
            have = len(g.closed_neighbourhood(u) & resp)
            if have < t:
                return f"only {have} share holders of survivor {u} remain, threshold is {t}"
        for v in self._needed_dropped:
            have = len(g.neighbours(v) & resp)
            if have < t:
                return f"only {have} share holders of dropped client {v} remain, threshold is {t}"
        return None

    def _close_masked(self) -> dict[int, bytes]:
        state, g, t = self.state, self.state.plan.graph, self.threshold
        u3 = sorted(state.masked_from)
        if len(u3) < t:
            raise self._abort(f"{len(u3)} clients sent masked inputs, threshold is {t}")
        if not g.is_connected(u3):
            raise self._abort("the survivors' masking graph is disconnected")
        dropped = sorted(set(state.u2) - set(u3))
        self._needed_dropped = tuple(v for v in dropped if g.neighbours(v) & set(u3))
        reason = self._needed(u3, u3)
        if reason:
            raise self._abort(reason)
        state.u3 = tuple(u3)
        if not self.params.consistency_check:  # semi-honest: ask for the shares at once
            state.u4 = state.u3
            return self._unmask_requests(state.u4, {})
        return self._out({u: ConsistencyRequest(state.plan.round_id, u, state.u3) for u in u3})

    def _on_consistency(self, cid: int, msg: ConsistencySignature) -> None:
        state = self.state
        self._duplicate(cid, state.consistency)
        if cid not in state.u3:
            raise ProtocolError(cid, "stage", "signed the survivor set without being in it")
        if msg.survivors != state.u3:
            raise ProtocolError(cid, "consistency", "signed a different survivor set")
        state.consistency[cid] = msg.signature

    def _close_consistency(self) -> dict[int, bytes]:
        state, t = self.state, self.threshold
        u4 = sorted(state.consistency)
        if len(u4) < t:
            raise self._abort(f"{len(u4)} clients signed the survivor set, threshold is {t}")
        reason = self._needed(state.u3, u4)
        if reason:
            raise self._abort(reason)
        state.u4 = tuple(u4)
        return self._unmask_requests(state.u4, state.consistency)

    def _unmask_requests(
        self, u4: tuple[int, ...], signatures: dict[int, bytes]
    ) -> dict[int, bytes]:
        """Each client in ``u4``: the survivor set, the dropped neighbours whose mask-key shares
        it must reveal, and its neighbourhood's signatures on the survivor set (none in the
        semi-honest protocol)."""
        state, g = self.state, self.state.plan.graph
        live = set(u4)
        needed = set(self._needed_dropped)
        out: dict[int, Message] = {}
        for u in u4:
            signers = sorted(g.closed_neighbourhood(u) & live & set(signatures))
            out[u] = UnmaskRequest(
                state.plan.round_id,
                u,
                state.u3,
                tuple(sorted(g.neighbours(u) & needed)),
                tuple((w, signatures[w]) for w in signers),
            )
        return self._out(out)

    def _on_unmask(self, cid: int, msg: UnmaskShares) -> None:
        state, g = self.state, self.state.plan.graph
        self._duplicate(cid, state.unmask)
        if cid not in state.u4:
            raise ProtocolError(cid, "stage", "sent shares without a consistency signature")
        b_ok = g.closed_neighbourhood(cid) & set(state.u3)
        s_ok = g.neighbours(cid) & set(self._needed_dropped)
        b_ids = [v for v, _ in msg.b_shares]
        s_ids = [v for v, _ in msg.s_shares]
        if len(set(b_ids)) != len(b_ids) or not set(b_ids) <= b_ok:
            raise ProtocolError(cid, "share", "self-mask shares for unexpected clients")
        if len(set(s_ids)) != len(s_ids) or not set(s_ids) <= s_ok:
            raise ProtocolError(cid, "share", "mask-key shares for unexpected clients")
        try:
            b_vals = [(v, shamir.decode_share(d)) for v, d in msg.b_shares]
            s_vals = [(v, shamir.decode_share(d)) for v, d in msg.s_shares]
        except ValueError as exc:
            raise ProtocolError(cid, "share", str(exc)) from exc
        for v, y in b_vals:
            self._b_shares.setdefault(v, {})[cid + 1] = y
        for v, y in s_vals:
            self._s_shares.setdefault(v, {})[cid + 1] = y
        state.unmask[cid] = msg

    def _close_unmask(self) -> None:
        state, plan, t = self.state, self.state.plan, self.threshold
        u3 = state.u3
        short = [u for u in u3 if len(self._b_shares.get(u, {})) < t]
        short += [v for v in self._needed_dropped if len(self._s_shares.get(v, {})) < t]
        if short:
            raise self._abort(
                f"the survivor set shrank below t={t} at unmasking: too few shares for "
                f"client {short[0]}"
            )
        # remove the pairwise masks that dropped clients' neighbours added
        for v in self._needed_dropped:
            s_public = state.advertised[v].s_public

            def key_matches(value: int, s_public: bytes = s_public) -> bool:
                try:
                    raw = shamir.secret_to_bytes(value)
                except ValueError:
                    return False
                return _x25519_public(X25519PrivateKey.from_private_bytes(raw)) == s_public

            raw = self._reconstruct(v, "mask key", self._s_shares[v], key_matches)
            s_secret = X25519PrivateKey.from_private_bytes(raw)
            for w in sorted(plan.graph.neighbours(v) & set(u3)):
                key = agreed_key(
                    s_secret, state.advertised[w].s_public, b"mask", plan.round_id, w, v,
                    session=self._session,
                )
                self._sum.add(key, -mask_sign(w, v))
        # remove every survivor's self-mask
        for u in u3:
            commit = state.shared[u].b_commit

            def seed_matches(value: int, u: int = u, commit: bytes = commit) -> bool:
                try:
                    seed = shamir.secret_to_bytes(value)
                except ValueError:
                    return False
                return b_commitment(plan.round_id, u, seed, self._session) == commit

            b_seed = self._reconstruct(u, "self-mask seed", self._b_shares[u], seed_matches)
            self._sum.add(self_mask_key(b_seed, plan.round_id, u, session=self._session), -1)
        words = reduce_words(self._sum.words, plan.quant.bits)
        total = dequantize_sum(words, plan.quant, len(u3))
        self.output = ServerOutput(
            total=total,
            survivors=tuple(u3),
            recovered=self._needed_dropped,
            pruned=tuple(sorted(state.pruned)),
            bad_share_holders=tuple(sorted(self._bad_holders)),
        )

    def _reconstruct(
        self, owner: int, what: str, shares: dict[int, int], check: Callable[[int], bool]
    ) -> bytes:
        """``owner``'s secret from its holders' shares, robust to wrong shares; wrong shares are
        blamed on their holders (:attr:`ServerOutput.bad_share_holders`).

        Raises:
            AggregationAbortedError: no ``t`` shares reconstruct a secret that passes ``check``.
        """
        try:
            value, bad = shamir.reconstruct_verified(shares, self.threshold, check)
        except ValueError as exc:
            holders = sorted(x - 1 for x in shares)
            raise self._abort(
                f"client {owner}'s {what} cannot be reconstructed from the shares returned by "
                f"clients {holders}: {exc}"
            ) from exc
        self._bad_holders.update(x - 1 for x in bad)
        return shamir.secret_to_bytes(value)


def _x25519_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
