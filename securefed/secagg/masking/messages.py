"""Stage names, errors and the signed wire messages of the masking protocol (SecAgg / SecAgg+).

The stages follow Bonawitz et al. 2017 (Fig. 4/5, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"), with the neighbour graph of Bell et al. 2020 (SecAgg+):

====================  ============================  =============================================
stage                 server -> client              client -> server
====================  ============================  =============================================
ADVERTISE_KEYS        :class:`RoundStart`           :class:`AdvertiseKeys` (c_pk, s_pk, signed)
SHARE_KEYS            :class:`KeyBroadcast`         :class:`ShareKeys` (AEAD shares of b_u, s_sk)
MASKED_INPUT          :class:`ShareBroadcast`       :class:`MaskedInput` (y_u mod 2^bits)
CONSISTENCY_CHECK     :class:`ConsistencyRequest`   :class:`ConsistencySignature` (sig over U3)
UNMASKING             :class:`UnmaskRequest`        :class:`UnmaskShares` (b OR s share per peer)
====================  ============================  =============================================

The consistency check is a real stage (not folded): every survivor signs the survivor set U3 and
only reveals shares after seeing ``t`` valid signatures on the same U3 from its neighbourhood, so
a server cannot tell different clients different stories about who dropped.

Every message is a frozen dataclass with one canonical byte encoding (no pickle): a tag byte, the
fields as big-endian u64 / length-prefixed bytes, then a 64-byte Ed25519 signature over
``DOMAIN || len(run id) || run id || tag || fields``. Clients sign what they send; the server
signs what it sends (its key is in the roster), so a flipped bit anywhere fails a signature, an
AEAD tag or the parser.

Run binding: the run id (:attr:`.plan.MaskingParams.session`, agreed at setup, fresh per run)
is not sent in the messages; it is part of what every signature covers, of every HKDF ``info``
and of every AEAD associated data. A message, a key or a ciphertext of one run is therefore
useless in another: a previous run's round-1 ``AdvertiseKeys`` fails the signature check in a
new run's round 1.

The public round parameters and plan are in :mod:`.plan`, the per-party state in :mod:`.state`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.noise.prg import session_prefix
from securefed.secagg.base import AggregationAbortedError

__all__ = [
    "CLIENT_MESSAGES",
    "PUBLIC_KEY_BYTES",
    "SERVER_MESSAGES",
    "SIGNATURE_BYTES",
    "AdvertiseKeys",
    "ConsistencyRequest",
    "ConsistencySignature",
    "KeyBroadcast",
    "MaskedInput",
    "Message",
    "ProtocolAbort",
    "ProtocolError",
    "RoundStart",
    "ShareBroadcast",
    "ShareKeys",
    "Stage",
    "UnmaskRequest",
    "UnmaskShares",
    "consistency_payload",
    "decode_message",
    "verify_encoded",
]

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


class Stage:
    """Stage names, in protocol order (also the :attr:`dropout_stages` of the protocol)."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASKING = "unmasking"
    DONE = "done"

    ORDER: ClassVar[tuple[str, ...]] = (
        ADVERTISE_KEYS,
        SHARE_KEYS,
        MASKED_INPUT,
        CONSISTENCY_CHECK,
        UNMASKING,
    )

    @classmethod
    def index(cls, stage: str) -> int:
        return cls.ORDER.index(stage)

    @classmethod
    def path(cls, consistency_check: bool) -> tuple[str, ...]:
        """The stages a round runs: all five, or without CONSISTENCY_CHECK when the server is
        assumed honest-but-curious (:attr:`MaskingParams.consistency_check`)."""
        if consistency_check:
            return cls.ORDER
        return tuple(s for s in cls.ORDER if s != cls.CONSISTENCY_CHECK)


class ProtocolError(ValueError):
    """A message failed a check. ``str(e)`` reads ``client <id>: <check> check failed: ...``.

    Attributes:
        client: the client the failure is attributed to (the sender of a bad upload, or the
            receiving client of a bad server message).
        check: short name of the check ("signature", "round id", "sender", "length", ...).
    """

    def __init__(self, client: int | None, check: str, detail: str) -> None:
        who = "server" if client is None else f"client {client}"
        super().__init__(f"{who}: {check} check failed: {detail}")
        self.client = client
        self.check = check


class ProtocolAbort(ProtocolError, AggregationAbortedError):
    """A :class:`ProtocolError` that ended a round run by an in-process driver.

    It is an :class:`~securefed.secagg.base.AggregationAbortedError` too, so a round loop that
    abandons aborted rounds (the simulation, the deployment's coordinator) abandons this round
    instead of crashing the run; ``client`` and ``check`` still name the party and the check.
    """

    @classmethod
    def wrap(cls, exc: ProtocolError) -> ProtocolAbort:
        out = cls(exc.client, exc.check, "")
        out.args = exc.args
        return out


# --------------------------------------------------------------------------- canonical encoding


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u64(self, value: int) -> None:
        self.parts.append(struct.pack(">Q", value))

    def blob(self, data: bytes) -> None:
        self.parts.append(struct.pack(">Q", len(data)))
        self.parts.append(data)

    def ids(self, values: Sequence[int]) -> None:
        self.parts.append(struct.pack(f">Q{len(values)}Q", len(values), *values))

    def pairs(self, values: Sequence[tuple[int, bytes]]) -> None:
        self.u64(len(values))
        for key, data in values:
            self.u64(key)
            self.blob(data)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes, who: int | None) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.who = who

    def _fail(self, detail: str) -> ProtocolError:
        return ProtocolError(self.who, "format", detail)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self._fail(f"message truncated (need {n} bytes at offset {self.pos})")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def u64(self) -> int:
        (value,) = struct.unpack(">Q", self.take(8))
        return int(value)

    def blob(self) -> bytes:
        return self.take(self.u64())

    def ids(self) -> tuple[int, ...]:
        count = self.u64()
        if count * 8 > len(self.data) - self.pos:
            raise self._fail(f"id list of {count} entries overruns the message")
        return tuple(int(v) for v in struct.unpack(f">{count}Q", self.take(8 * count)))

    def pairs(self) -> tuple[tuple[int, bytes], ...]:
        count = self.u64()
        if count * 16 > len(self.data) - self.pos:
            raise self._fail(f"list of {count} entries overruns the message")
        return tuple((self.u64(), self.blob()) for _ in range(count))

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self._fail(f"{len(self.data) - self.pos} trailing bytes")


# --------------------------------------------------------------------------------- messages

M = TypeVar("M", bound="Message")


@dataclass(frozen=True)
class Message:
    """Base of all messages: ``round_id``, the party field, a body, and a signature."""

    TAG: ClassVar[int] = 0
    STAGE: ClassVar[str] = ""

    round_id: int
    signature: bytes = field(default=b"", kw_only=True)
    #: the run id the message belongs to: signed, never encoded (every party knows it)
    session: bytes = field(default=b"", kw_only=True, repr=False)

    def _body(self, w: _Writer) -> None:
        raise NotImplementedError

    @classmethod
    def _parse(cls: type[M], r: _Reader, round_id: int) -> M:
        raise NotImplementedError

    def _encoded(self) -> bytes:
        w = _Writer()
        w.u64(self.round_id)
        self._body(w)
        return bytes([self.TAG]) + w.getvalue()

    def signed_payload(self) -> bytes:
        """The bytes the signature covers: ``DOMAIN || len || run id || tag || round id ||
        body``."""
        return session_prefix(self.session) + self._encoded()

    def to_bytes(self) -> bytes:
        """Canonical encoding: ``tag || round id || body || signature`` (no run id)."""
        sig = self.signature
        if len(sig) != SIGNATURE_BYTES:
            raise ValueError(f"{type(self).__name__} is not signed")
        return self._encoded() + sig

    def signed_bytes(self, key: Ed25519PrivateKey) -> bytes:
        """Sign with ``key`` and encode in one pass: ``to_bytes()`` of :meth:`sign`'s result."""
        encoded = self._encoded()
        return encoded + key.sign(session_prefix(self.session) + encoded)

    def sign(self: M, key: Ed25519PrivateKey) -> M:
        """A copy of this message carrying ``key``'s signature over :meth:`signed_payload`."""
        return replace(self, signature=key.sign(self.signed_payload()))

    def verify(self, key: Ed25519PublicKey) -> bool:
        try:
            key.verify(self.signature, self.signed_payload())
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class RoundStart(Message):
    """Server -> client: the round's participants and vector length (opens ADVERTISE_KEYS)."""

    TAG: ClassVar[int] = 1
    STAGE: ClassVar[str] = Stage.ADVERTISE_KEYS
    recipient: int
    participants: tuple[int, ...]
    vector_length: int

    def _body(self, w: _Writer) -> None:
        w.u64(self.recipient)
        w.ids(self.participants)
        w.u64(self.vector_length)

    @classmethod
    def _parse(cls, r: _Reader, round_id: int) -> RoundStart:
        return cls(round_id, r.u64(), r.ids(), r.u64(), signature=r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class AdvertiseKeys(Message):
    """Client -> server: two X25519 public keys, c (share encryption) and s (masks)."""

    TAG: ClassVar[int] = 2
    STAGE: ClassVar[str] = Stage.ADVERTISE_KEYS
    sender: int
    c_public: bytes
    s_public: bytes

    def _body(self, w: _Writer) -> None:
        w.u64(self.sender)
        w.blob(self.c_public)
        w.blob(self.s_public)

    @classmethod
    def _parse(cls, r: _Reader, round_id: int) -> AdvertiseKeys:
        return cls(round_id, r.u64(), r.blob(), r.blob(), signature=r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class KeyBroadcast(Message):
    """Server -> client: the signed :class:`AdvertiseKeys` (encoded) of the live neighbours."""

    TAG: ClassVar[int] = 3
    STAGE: ClassVar[str] = Stage.SHARE_KEYS
    recipient: int
    keys: tuple[tuple[int, bytes], ...]

    def _body(self, w: _Writer) -> None:
        w.u64(self.recipient)
        w.pairs(self.keys)

    @classmethod
    def _parse(cls, r: _Reader, round_id: int) -> KeyBroadcast:
        return cls(round_id, r.u64(), r.pairs(), signature=r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class ShareKeys(Message):
    """Client -> server: per neighbour, an AEAD ciphertext of the shares of b_u and s_u^SK.

    ``b_commit`` = SHA-256 commitment to b_u, so the server can check its reconstruction.
    """

    TAG: ClassVar[int] = 4
    STAGE: ClassVar[str] = Stage.SHARE_KEYS
    sender: int
    b_commit: bytes
    ciphertexts: tuple[tuple[int, bytes], ...]

    def _body(self, w: _Writer) -> None:
        w.u64(self.sender)
        w.blob(self.b_commit)
        w.pairs(self.ciphertexts)

    @classmethod
    def _parse(cls, r: _Reader, round_id: int) -> ShareKeys:
        return cls(round_id, r.u64(), r.blob(), r.pairs(), signature=r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class ShareBroadcast(Message):
    """Server -> client: the ciphertexts addressed to the recipient, keyed by their sender."""

    TAG: ClassVar[int] = 5
    STAGE: ClassVar[str] = Stage.MASKED_INPUT
    recipient: int
    ciphertexts: tuple[tuple[int, bytes], ...]

    def _body(self, w: _Writer) -> None:
        w.u64(self.recipient)
        w.pairs(self.ciphertexts)

    @classmethod
    def _parse(cls, r: _Reader, round_id: int) -> ShareBroadcast:
        return cls(round_id, r.u64(), r.pairs(), signature=r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class MaskedInput(Message):
    """Client -> server: ``y_u = q(x_u) + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^bits``, encoded."""

    TAG: ClassVar[int] = 6
    STAGE: ClassVar[str] = Stage.MASKED_INPUT
    sender: int
    masked: bytes

    def _body(self, w: _Writer) -> None:
        w.u64(self.sender)
        w.blob(self.masked)

    @classmethod
    def _parse(cls, r: _Reader, round_id: int) -> MaskedInput:
        return cls(round_id, r.u64(), r.blob(), signature=r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class ConsistencyRequest(Message):
    """Server -> client: the survivor set U3 (clients whose masked input arrived)."""

    TAG: ClassVar[int] = 7
    STAGE: ClassVar[str] = Stage.CONSISTENCY_CHECK
    recipient: int
    survivors: tuple[int, ...]

    def _body(self, w: _Writer) -> None:
        w.u64(self.recipient)
        w.ids(self.survivors)

    @classmethod
    def _parse(cls, r: _Reader, round_id: int) -> ConsistencyRequest:
        return cls(round_id, r.u64(), r.ids(), signature=r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class ConsistencySignature(Message):
    """Client -> server: the sender's signature over (round id, sender, U3)."""

    TAG: ClassVar[int] = 8
    STAGE: ClassVar[str] = Stage.CONSISTENCY_CHECK
    sender: int
    survivors: tuple[int, ...]

    def _body(self, w: _Writer) -> None:
        w.u64(self.sender)
        w.ids(self.survivors)

    @classmethod
    def _parse(cls, r: _Reader, round_id: int) -> ConsistencySignature:
        return cls(round_id, r.u64(), r.ids(), signature=r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Server -> client: U3, the dropped neighbours, and the neighbours' signatures on U3."""

    TAG: ClassVar[int] = 9
    STAGE: ClassVar[str] = Stage.UNMASKING
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...]

    def _body(self, w: _Writer) -> None:
        w.u64(self.recipient)
        w.ids(self.survivors)
        w.ids(self.dropped)
        w.pairs(self.signatures)

    @classmethod
    def _parse(cls, r: _Reader, round_id: int) -> UnmaskRequest:
        recipient, survivors, dropped, sigs = r.u64(), r.ids(), r.ids(), r.pairs()
        return cls(round_id, recipient, survivors, dropped, sigs, signature=r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class UnmaskShares(Message):
    """Client -> server: b_v shares of surviving neighbours, s_v^SK shares of dropped ones."""

    TAG: ClassVar[int] = 10
    STAGE: ClassVar[str] = Stage.UNMASKING
    sender: int
    b_shares: tuple[tuple[int, bytes], ...]
    s_shares: tuple[tuple[int, bytes], ...]

    def _body(self, w: _Writer) -> None:
        w.u64(self.sender)
        w.pairs(self.b_shares)
        w.pairs(self.s_shares)

    @classmethod
    def _parse(cls, r: _Reader, round_id: int) -> UnmaskShares:
        return cls(round_id, r.u64(), r.pairs(), r.pairs(), signature=r.take(SIGNATURE_BYTES))


SERVER_MESSAGES: tuple[type[Message], ...] = (
    RoundStart,
    KeyBroadcast,
    ShareBroadcast,
    ConsistencyRequest,
    UnmaskRequest,
)
CLIENT_MESSAGES: tuple[type[Message], ...] = (
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    ConsistencySignature,
    UnmaskShares,
)
_BY_TAG: dict[int, type[Message]] = {m.TAG: m for m in SERVER_MESSAGES + CLIENT_MESSAGES}


def decode_message(data: bytes, who: int | None, session: bytes = b"") -> Message:
    """Parse one canonical message; ``who`` is the client any format error is attributed to.

    ``session`` is the run id the receiver expects; it becomes the message's :attr:`session`
    (so :meth:`Message.verify` checks the signature against this run).

    Raises:
        ProtocolError: unknown tag, truncation, trailing bytes ("format").
    """
    if not data:
        raise ProtocolError(who, "format", "empty message")
    cls = _BY_TAG.get(data[0])
    if cls is None:
        raise ProtocolError(who, "format", f"unknown message tag {data[0]}")
    r = _Reader(data[1:], who)
    round_id = r.u64()
    msg = cls._parse(r, round_id)
    r.end()
    return replace(msg, session=bytes(session)) if session else msg


def verify_encoded(data: bytes, key: Ed25519PublicKey, session: bytes = b"") -> bool:
    """Check the signature of an encoded message of run ``session`` without re-encoding it.

    The encoding is canonical (:func:`decode_message` rejects anything else), so the signed
    payload is ``DOMAIN || len || session || data[:-64]``.
    """
    if len(data) < SIGNATURE_BYTES:
        return False
    try:
        key.verify(data[-SIGNATURE_BYTES:], session_prefix(session) + data[:-SIGNATURE_BYTES])
    except InvalidSignature:
        return False
    return True


def consistency_payload(
    round_id: int, signer: int, survivors: Sequence[int], session: bytes = b""
) -> bytes:
    """What a :class:`ConsistencySignature` signs (so peers can check a forwarded signature)."""
    return ConsistencySignature(
        round_id, signer, tuple(survivors), session=bytes(session)
    ).signed_payload()
