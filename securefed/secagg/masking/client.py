"""Client role of SecAgg / SecAgg+: a state machine from server message bytes to reply bytes.

Bonawitz et al. 2017 (Fig. 4 and the actively secure variant of §6), with the neighbour graph of
Bell et al. 2020. The client does no I/O: :meth:`MaskingClient.handle` takes the bytes of one
server message and returns the bytes of its reply, so an in-process driver, a Flower ClientApp or a
test harness can carry them. Every check that fails raises :class:`ProtocolError` naming the
client at fault and the check.

Rules an honest client keeps whatever the server says:

- it answers each stage at most once, in order, for one round id;
- it reveals, for each peer, either the share of the self-mask seed ``b_v`` (peer survived) or the
  share of the mask key ``s_v^SK`` (peer dropped), never both, and only after ``t`` neighbours
  signed the same survivor set (consistency check);
- it refuses to unmask a survivor set whose masking graph is disconnected or smaller than ``t``
  (the server would learn partial sums over a component).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import replace

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securefed.noise.discrete_gaussian import discrete_gaussian
from securefed.noise.prg import (
    MaskAccumulator,
    agreed_key,
    mask_sign,
    self_mask_key,
    session_prefix,
)
from securefed.secagg.keys import Roster
from securefed.secagg.masking import shamir
from securefed.secagg.masking.messages import (
    PUBLIC_KEY_BYTES,
    SERVER_MESSAGES,
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
    consistency_payload,
    decode_message,
    verify_encoded,
)
from securefed.secagg.masking.plan import MaskingParams, MaskingPlan, plan_round
from securefed.secagg.masking.quantize import encode_words, quantize, reduce_words
from securefed.secagg.masking.state import ClientState

__all__ = [
    "SHARE_PLAINTEXT_BYTES",
    "MaskingClient",
    "b_commitment",
    "decrypt_shares",
    "encrypt_shares",
]

SHARE_PLAINTEXT_BYTES = 16 + 2 * shamir.SHARE_BYTES

#: the server message each stage waits for, keyed by the stage the client is in
_EXPECTED: dict[str | None, type[Message]] = {
    None: RoundStart,
    Stage.ADVERTISE_KEYS: KeyBroadcast,
    Stage.SHARE_KEYS: ShareBroadcast,
    Stage.MASKED_INPUT: ConsistencyRequest,
    Stage.CONSISTENCY_CHECK: UnmaskRequest,
}


def _share_aad(round_id: int, sender: int, recipient: int, session: bytes) -> bytes:
    return session_prefix(session) + b"/share" + struct.pack(">QQQ", round_id, sender, recipient)


def _share_nonce(sender: int) -> bytes:
    # the key is per (round, pair); the direction (sender) makes the nonce unique under it
    return struct.pack(">Q", sender) + bytes(4)


def encrypt_shares(
    key: bytes,
    round_id: int,
    sender: int,
    recipient: int,
    b_share: bytes,
    s_share: bytes,
    *,
    session: bytes = b"",
) -> bytes:
    """AES-256-GCM of ``sender || recipient || b_share || s_share``; AD binds run, round, ids."""
    plaintext = struct.pack(">QQ", sender, recipient) + b_share + s_share
    aad = _share_aad(round_id, sender, recipient, session)
    return AESGCM(key).encrypt(_share_nonce(sender), plaintext, aad)


def decrypt_shares(
    key: bytes,
    round_id: int,
    sender: int,
    recipient: int,
    ciphertext: bytes,
    *,
    session: bytes = b"",
) -> tuple[bytes, bytes]:
    """Inverse of :func:`encrypt_shares`; raises ``InvalidTag`` or ``ValueError``."""
    plaintext = AESGCM(key).decrypt(
        _share_nonce(sender), ciphertext, _share_aad(round_id, sender, recipient, session)
    )
    if len(plaintext) != SHARE_PLAINTEXT_BYTES:
        raise ValueError(f"share plaintext has {len(plaintext)} bytes")
    if struct.unpack(">QQ", plaintext[:16]) != (sender, recipient):
        raise ValueError("share plaintext names other parties")
    b = plaintext[16 : 16 + shamir.SHARE_BYTES]
    s = plaintext[16 + shamir.SHARE_BYTES :]
    shamir.decode_share(b)
    shamir.decode_share(s)
    return b, s


def b_commitment(round_id: int, client_id: int, b_seed: bytes, session: bytes = b"") -> bytes:
    """SHA-256 commitment to the self-mask seed (b is 256 uniform bits: hiding)."""
    return hashlib.sha256(
        session_prefix(session) + b"/b-commit" + struct.pack(">QQ", round_id, client_id) + b_seed
    ).digest()


def _x25519_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _x25519_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


class MaskingClient:
    """One client's side of one round.

    Args:
        client_id: this client's id (its Shamir point is ``client_id + 1``).
        round_id: the round it agreed to join; messages for any other round are rejected.
        params: public protocol parameters (same for every party).
        signing_key: this client's Ed25519 identity key.
        roster: public keys of all clients and of the server.
        vector: ``[D]`` float input; may be given later with :meth:`set_input`, and is not needed
            at all by a client that drops out before MASKED_INPUT.
    """

    def __init__(
        self,
        client_id: int,
        round_id: int,
        params: MaskingParams,
        signing_key: Ed25519PrivateKey,
        roster: Roster,
        vector: np.ndarray | None = None,
    ) -> None:
        self.state = ClientState(client_id=client_id, round_id=round_id)
        self.params = params
        self._key = signing_key
        self._roster = roster
        self._input: np.ndarray | None = None
        if vector is not None:
            self.set_input(vector)

    @property
    def client_id(self) -> int:
        return self.state.client_id

    def set_input(self, vector: np.ndarray) -> None:
        """Provide the ``[D]`` float input (before the MASKED_INPUT stage)."""
        vec = np.asarray(vector)
        if vec.ndim != 1:
            raise self._error("length", f"input must be a 1-D vector, got shape {vec.shape}")
        if not np.all(np.isfinite(vec)):
            raise self._error("finite", "input contains NaN or infinite values")
        self._input = vec

    # ------------------------------------------------------------------------------ plumbing

    @property
    def _session(self) -> bytes:
        return self.params.session

    def _error(self, check: str, detail: str) -> ProtocolError:
        return ProtocolError(self.state.client_id, check, detail)

    @property
    def _plan(self) -> MaskingPlan:
        if self.state.plan is None:
            raise self._error("stage", "no round has started")
        return self.state.plan

    def handle(self, data: bytes) -> bytes:
        """Process one server message and return the signed reply.

        Raises:
            ProtocolError: a check failed (format, signature, recipient, round id, stage, ...).
        """
        me = self.state.client_id
        msg = decode_message(data, me, self._session)
        if not isinstance(msg, SERVER_MESSAGES):
            raise self._error("format", f"{type(msg).__name__} is not a server message")
        if not verify_encoded(data, self._roster.server, self._session):
            raise self._error("signature", f"{type(msg).__name__} from the server does not verify")
        if getattr(msg, "recipient", None) != me:
            raise self._error("recipient", f"{type(msg).__name__} is addressed to another client")
        if msg.round_id != self.state.round_id:
            raise self._error(
                "round id", f"message for round {msg.round_id}, expected {self.state.round_id}"
            )
        expected = _EXPECTED.get(self.state.stage)
        if self.state.stage == Stage.MASKED_INPUT and not self.params.consistency_check:
            expected = UnmaskRequest  # semi-honest protocol: no consistency stage
        if expected is None or not isinstance(msg, expected):
            raise self._error(
                "stage",
                f"unexpected {type(msg).__name__} in stage {self.state.stage or 'start'}",
            )
        reply: Message
        if isinstance(msg, RoundStart):
            reply = self._advertise_keys(msg)
        elif isinstance(msg, KeyBroadcast):
            reply = self._share_keys(msg)
        elif isinstance(msg, ShareBroadcast):
            reply = self._masked_input(msg)
        elif isinstance(msg, ConsistencyRequest):
            reply = self._consistency(msg)
        else:
            if not isinstance(msg, UnmaskRequest):  # pragma: no cover - exhausted by _EXPECTED
                raise self._error("stage", f"unexpected {type(msg).__name__}")
            if self.state.stage == Stage.MASKED_INPUT:  # semi-honest: check U3 here, unsigned
                self._accept_survivors(msg.survivors)
            reply = self._unmask(msg)
        self.state.stage = msg.STAGE
        return replace(reply, session=self._session).signed_bytes(self._key)

    # -------------------------------------------------------------------------------- stages

    def _advertise_keys(self, msg: RoundStart) -> AdvertiseKeys:
        """Stage 0: generate (c, s) X25519 key pairs and advertise the public halves."""
        me = self.state.client_id
        parts = msg.participants
        if list(parts) != sorted(set(parts)) or me not in parts:
            raise self._error("participants", "participant list unsorted, repeated or lacks me")
        unknown = [c for c in parts if self._roster.client(c) is None]
        if unknown:
            raise ProtocolError(unknown[0], "sender", "participant is not in the roster")
        if msg.vector_length < 1:
            raise self._error("length", f"vector length {msg.vector_length}")
        if self._input is not None and self._input.shape[0] != msg.vector_length:
            raise self._error(
                "length",
                f"input has {self._input.shape[0]} values, round expects {msg.vector_length}",
            )
        try:
            self.state.plan = plan_round(self.params, msg.round_id, parts, msg.vector_length)
        except ValueError as exc:
            raise self._error("parameters", str(exc)) from exc
        self.state.c_secret = X25519PrivateKey.generate()
        self.state.s_secret = X25519PrivateKey.generate()
        return AdvertiseKeys(
            msg.round_id,
            me,
            _x25519_public(self.state.c_secret),
            _x25519_public(self.state.s_secret),
        )

    def _share_keys(self, msg: KeyBroadcast) -> ShareKeys:
        """Stage 1: check the neighbours' signed keys; Shamir-share b_u and s_u^SK among them."""
        me, plan = self.state.client_id, self._plan
        neighbours = plan.graph.neighbours(me)
        peers: dict[int, tuple[bytes, bytes]] = {}
        seen_keys: set[bytes] = set()
        if self.state.c_secret is None or self.state.s_secret is None:
            raise self._error("stage", "keys were not generated")
        own = (_x25519_public(self.state.c_secret), _x25519_public(self.state.s_secret))
        seen_keys.update(own)
        for v, raw in msg.keys:
            if v not in neighbours or v in peers:
                raise ProtocolError(
                    v, "sender", f"keys forwarded to client {me} by a non-neighbour"
                )
            adv = decode_message(raw, v, self._session)
            if not isinstance(adv, AdvertiseKeys) or adv.sender != v:
                raise ProtocolError(
                    v, "sender", "forwarded keys are not this client's AdvertiseKeys"
                )
            if adv.round_id != msg.round_id:
                raise ProtocolError(v, "round id", f"keys for round {adv.round_id}")
            pub = self._roster.client(v)
            if pub is None or not verify_encoded(raw, pub, self._session):
                raise ProtocolError(
                    v, "signature", f"advertised keys do not verify (at client {me})"
                )
            if len(adv.c_public) != PUBLIC_KEY_BYTES or len(adv.s_public) != PUBLIC_KEY_BYTES:
                raise ProtocolError(v, "format", "public keys must be 32 bytes")
            if (
                adv.c_public in seen_keys
                or adv.s_public in seen_keys
                or adv.c_public == adv.s_public
            ):
                raise ProtocolError(v, "keys", "public key repeated across clients")
            seen_keys.update((adv.c_public, adv.s_public))
            peers[v] = (adv.c_public, adv.s_public)
        if len(peers) + 1 < plan.threshold:
            raise self._error(
                "threshold",
                f"{len(peers) + 1} live clients in my neighbourhood, threshold is {plan.threshold}",
            )
        holders = sorted([*peers, me])
        b_seed = os.urandom(shamir.SECRET_BYTES)
        points = [h + 1 for h in holders]
        b_shares = shamir.split(shamir.bytes_to_secret(b_seed), plan.threshold, points)
        s_shares = shamir.split(
            shamir.bytes_to_secret(_x25519_private(self.state.s_secret)), plan.threshold, points
        )
        ciphertexts = []
        for v in sorted(peers):
            try:
                key = agreed_key(
                    self.state.c_secret, peers[v][0], b"share-enc", msg.round_id, me, v,
                    session=self._session,
                )
            except ValueError as exc:
                raise ProtocolError(v, "keys", f"unusable c public key ({exc})") from exc
            self.state.share_keys[v] = key
            ct = encrypt_shares(
                key,
                msg.round_id,
                me,
                v,
                shamir.encode_share(b_shares[v + 1]),
                shamir.encode_share(s_shares[v + 1]),
                session=self._session,
            )
            ciphertexts.append((v, ct))
        self.state.peer_keys = peers
        self.state.b_seed = b_seed
        self.state.held_shares[me] = (
            shamir.encode_share(b_shares[me + 1]),
            shamir.encode_share(s_shares[me + 1]),
        )
        return ShareKeys(
            msg.round_id,
            me,
            b_commitment(msg.round_id, me, b_seed, self._session),
            tuple(ciphertexts),
        )

    def _masked_input(self, msg: ShareBroadcast) -> MaskedInput:
        """Stage 2: keep the neighbours' shares; send ``y_u = q(x_u) + masks mod 2^bits``."""
        me, plan, state = self.state.client_id, self._plan, self.state
        if state.c_secret is None or state.s_secret is None or state.b_seed is None:
            raise self._error("stage", "secrets missing")
        senders: list[int] = []
        for v, ct in msg.ciphertexts:
            if v not in state.peer_keys or v in senders:
                raise ProtocolError(v, "sender", f"shares forwarded to client {me} from a non-peer")
            key = state.share_keys[v]
            try:
                state.held_shares[v] = decrypt_shares(
                    key, plan.round_id, v, me, ct, session=self._session
                )
            except (InvalidTag, ValueError) as exc:
                raise ProtocolError(
                    v, "share authentication", f"ciphertext for client {me} fails AEAD ({exc!r})"
                ) from exc
            senders.append(v)
        if len(senders) + 1 < plan.threshold:
            raise self._error(
                "threshold",
                f"{len(senders) + 1} neighbours shared keys, threshold is {plan.threshold}",
            )
        if self._input is None:
            raise self._error("input", "no input vector was provided before MASKED_INPUT")
        if self._input.shape[0] != plan.vector_length:
            raise self._error(
                "length", f"input has {self._input.shape[0]} values, expected {plan.vector_length}"
            )
        try:
            # clip to clip_range FIRST: with client-level DP the grid is widened by the noise's
            # headroom, which an input beyond clip_range would use up (and then wrap silently)
            c = self.params.clip_range
            words = quantize(np.clip(self._input, -c, c), plan.quant, os.urandom(32))
        except ValueError as exc:
            raise self._error("finite", str(exc)) from exc
        self._input = None  # the plaintext is not kept past this point
        if self.params.noise_std > 0:  # client-level DP share, in the integer domain
            share = self.params.noise_std / plan.quant.step / len(plan.participants) ** 0.5
            noise = discrete_gaussian(share, words.shape[0])
            words = (words.astype(np.int64) + noise).astype(words.dtype)  # wraps mod 2^64/2^32
        acc = MaskAccumulator(words)
        acc.add(self_mask_key(state.b_seed, plan.round_id, me, session=self._session))
        for v in sorted(senders):
            try:
                key = agreed_key(
                    state.s_secret, state.peer_keys[v][1], b"mask", plan.round_id, me, v,
                    session=self._session,
                )
            except ValueError as exc:
                raise ProtocolError(v, "keys", f"unusable s public key ({exc})") from exc
            acc.add(key, mask_sign(me, v))
        state.masked_with = tuple(sorted(senders))
        masked = encode_words(reduce_words(acc.words, plan.quant.bits), plan.quant.bits)
        return MaskedInput(plan.round_id, me, masked)

    def _consistency(self, msg: ConsistencyRequest) -> ConsistencySignature:
        """Stage 3: check U3 and sign it."""
        self._accept_survivors(msg.survivors)
        return ConsistencySignature(msg.round_id, self.state.client_id, msg.survivors)

    def _accept_survivors(self, u3: tuple[int, ...]) -> None:
        """Check the survivor set U3 the server names (sorted, me in it, participants only,
        no neighbour that sent me no shares, at least ``t``, connected) and keep it."""
        me, plan = self.state.client_id, self._plan
        if list(u3) != sorted(set(u3)) or me not in u3:
            raise self._error("consistency", "survivor list unsorted, repeated or lacks me")
        if not set(u3) <= set(plan.participants):
            raise self._error("consistency", "survivor list names non-participants")
        odd = (set(u3) & plan.graph.neighbours(me)) - set(self.state.masked_with)
        if odd:
            raise self._error(
                "consistency", f"neighbours {sorted(odd)} listed as survivors sent me no shares"
            )
        self._check_survivors(u3)
        self.state.survivors = tuple(u3)

    def _check_survivors(self, u3: tuple[int, ...]) -> None:
        plan = self._plan
        if len(u3) < plan.threshold:
            raise self._error(
                "threshold", f"{len(u3)} survivors, threshold is {plan.threshold}; refusing"
            )
        if not plan.graph.is_connected(u3):
            raise self._error(
                "consistency",
                "survivors' masking graph is disconnected: unmasking would reveal partial sums",
            )

    def _unmask(self, msg: UnmaskRequest) -> UnmaskShares:
        """Stage 4: after t valid signatures on U3, reveal one kind of share per peer."""
        me, plan, state = self.state.client_id, self._plan, self.state
        if state.survivors is None or msg.survivors != state.survivors:
            raise self._error(
                "consistency", "unmask request names a survivor set other than the one I signed"
            )
        u3 = set(msg.survivors)
        valid: set[int] = set()
        for signer, sig in msg.signatures:
            pub = self._roster.client(signer)
            if signer not in u3 or signer in valid or pub is None:
                raise ProtocolError(signer, "consistency", f"unexpected signer (at client {me})")
            try:
                pub.verify(
                    sig,
                    consistency_payload(plan.round_id, signer, msg.survivors, self._session),
                )
            except InvalidSignature as exc:
                raise ProtocolError(
                    signer, "signature", f"consistency signature does not verify (at client {me})"
                ) from exc
            valid.add(signer)
        # the semi-honest protocol (params.consistency_check False, a site opt-in) has no
        # signatures; the survivor set was checked by _accept_survivors, and the rule of one
        # kind of share per peer below holds either way
        if self.params.consistency_check and len(valid) < plan.threshold:
            raise self._error(
                "threshold",
                f"only {len(valid)} signatures on the survivor set, threshold {plan.threshold}",
            )
        dropped = list(msg.dropped)
        both = sorted(set(dropped) & u3)
        if both:
            raise self._error(
                "share request",
                f"server asked for both the self-mask share and the mask-key share of client "
                f"{both[0]}; refusing to reveal either",
            )
        if dropped != sorted(set(dropped)):
            raise self._error("share request", "dropped list unsorted or repeated")
        not_held = [v for v in dropped if v == me or v not in state.held_shares]
        if not_held:
            raise self._error(
                "share request", f"client {not_held[0]} is not a neighbour whose shares I hold"
            )
        # msg.survivors is the U3 this client checked (size, connectivity) when signing it
        b_for = [v for v in sorted(u3) if v in state.held_shares]
        clash = [v for v in b_for if v in state.revealed_s] + [
            v for v in dropped if v in state.revealed_b
        ]
        if clash:
            raise self._error(
                "share request",
                f"client {clash[0]}: the other kind of share was already revealed; refusing",
            )
        state.revealed_b.update(b_for)
        state.revealed_s.update(dropped)
        reply = UnmaskShares(
            plan.round_id,
            me,
            tuple((v, state.held_shares[v][0]) for v in b_for),
            tuple((v, state.held_shares[v][1]) for v in dropped),
        )
        # the round is over for this client: forget every secret
        state.c_secret = state.s_secret = None
        state.b_seed = None
        state.held_shares.clear()
        state.share_keys.clear()
        return reply
