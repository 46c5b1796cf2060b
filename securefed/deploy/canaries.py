"""Audit canaries on the deployment: the signed canary assignment (coordinator -> site) and the
signed canary scores (site -> coordinator) of one round.

Record-level DP only (``dp.level: record``, ``canaries.enabled``): the coordinator owns the
run's :class:`~securefed.privacy.canaries.GradientCanaries` (the secret key and files under
``RUN_DIR/canaries/``, 0600, as the simulation). With each round's training message it sends a
site ONLY that site's canaries (trainable-parameter index, flat offset, sign, inclusion coin)
and the round's per-step sampling key :meth:`GradientCanaries.sampling_key` ``(round, site)``,
which is exactly what the simulation's :meth:`GradientCanaries.for_client` hands the same
client, so a site samples its canaries at every DP-SGD step as the simulated client does. The
site returns its ``[m_site]`` scores (:class:`~securefed.privacy.canaries.ClientCanaries`)
next to its protocol reply; the coordinator places them at their global indices and commits
the round's ``[m]`` scores where the simulation does.

Both messages are signed (Ed25519) by the party's roster key (the coordinator's ``server.key``,
the site's ``client_<id>.key``) over ``DOMAIN || len(run id) || run id || body``: a domain of
their own (never a masking message), bound to the run, the round and the site, so a message of
another run, round or site fails the check (:class:`CanaryWireError`).

Why a message of its own, in the training message, rather than in the setup or the round start:
the setup carries no signature a site checks, and the :class:`RoundStart` belongs to the
masking protocol (which knows nothing of audits) and, with the next round's keys advertised
ahead, travels a round before the training message; the canaries are per round (the sampling
key) and needed exactly when the site trains.

Encodings (big-endian, no pickle), each followed by the 64-byte signature:

- assignment: ``tag 0x01 | round u64 | site u64 | m u64 | sampling key (32 B) |
  param_index m x u64 | offset m x u64 | sign m x u8 (0 = -1, 1 = +1) | included m x u8``;
- scores: ``tag 0x02 | round u64 | site u64 | m u64 | scores m x float64``.

What the site checks before it trains with them is its policy
(:meth:`securefed.deploy.node.Site` ``allow-audit-canaries``, ``max-audit-canaries``, weight
coordinates only, no duplicates; the canary gradient is its own pinned clip norm times the
Dirac direction, never a value from the message).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.deploy.wire import WireError

__all__ = [
    "CanaryAssignment",
    "CanaryWireError",
    "decode_assignment",
    "decode_scores",
    "encode_assignment",
    "encode_scores",
]

DOMAIN = b"securefed/deploy/audit-canaries/v1"
_TAG_ASSIGNMENT, _TAG_SCORES = 1, 2
_SIGNATURE = 64
_KEY = 32
_HEADER = struct.Struct(">BQQQ")  # tag, round, site, m
#: a hard ceiling on one message's canaries (the site's own cap is max-audit-canaries)
MAX_WIRE_CANARIES = 1 << 20


class CanaryWireError(WireError):
    """A canary message that does not parse or verify; names the field and the party."""


@dataclass(frozen=True)
class CanaryAssignment:
    """One site's canaries of one round, as the site received them.

    Attributes:
        round: the round. site: the recipient's client id.
        sample_key: 32 bytes, the round's per-step sampling key of this site.
        param_index / offset: ``[m_site]`` int64. signs: ``[m_site]`` float64 +-1.
        included: ``[m_site]`` bool.
    """

    round: int
    site: int
    sample_key: bytes
    param_index: np.ndarray
    offset: np.ndarray
    signs: np.ndarray
    included: np.ndarray

    def __len__(self) -> int:
        return int(self.signs.size)


def _prefix(session: bytes) -> bytes:
    return DOMAIN + struct.pack(">Q", len(session)) + bytes(session)


def _sign(key: Ed25519PrivateKey, session: bytes, body: bytes) -> bytes:
    return body + key.sign(_prefix(session) + body)


def _verified(data: object, key: Ed25519PublicKey, session: bytes, who: str) -> bytes:
    if not isinstance(data, bytes) or len(data) < _HEADER.size + _SIGNATURE:
        raise CanaryWireError(f"{who}: canaries: not a signed canary message")
    body, sig = data[:-_SIGNATURE], data[-_SIGNATURE:]
    try:
        key.verify(sig, _prefix(session) + body)
    except InvalidSignature:
        raise CanaryWireError(
            f"{who}: canaries: the signature does not verify under this run's roster key"
        ) from None
    return body


def _header(body: bytes, tag: int, rnd: int, site: int, who: str) -> int:
    got_tag, got_rnd, got_site, m = _HEADER.unpack_from(body)
    if got_tag != tag:
        raise CanaryWireError(f"{who}: canaries: message tag {got_tag}, expected {tag}")
    if (got_rnd, got_site) != (rnd, site):
        raise CanaryWireError(
            f"{who}: canaries: for round {got_rnd}, site {got_site}; expected round {rnd}, "
            f"site {site}"
        )
    if m > MAX_WIRE_CANARIES:
        raise CanaryWireError(f"{who}: canaries: m = {m} is above {MAX_WIRE_CANARIES}")
    return int(m)


def encode_assignment(
    key: Ed25519PrivateKey,
    session: bytes,
    rnd: int,
    site: int,
    sample_key: bytes,
    param_index: np.ndarray,
    offset: np.ndarray,
    signs: np.ndarray,
    included: np.ndarray,
) -> bytes:
    """The coordinator's signed assignment of ``site``'s canaries for round ``rnd``."""
    m = int(np.asarray(signs).size)
    if len(sample_key) != _KEY:
        raise ValueError(f"canaries: the sampling key must be {_KEY} bytes")
    body = (
        _HEADER.pack(_TAG_ASSIGNMENT, rnd, site, m)
        + bytes(sample_key)
        + np.asarray(param_index, dtype=">u8").tobytes()
        + np.asarray(offset, dtype=">u8").tobytes()
        + (np.asarray(signs) > 0).astype(np.uint8).tobytes()
        + np.asarray(included, dtype=bool).astype(np.uint8).tobytes()
    )
    return _sign(key, session, body)


def decode_assignment(
    data: object, server: Ed25519PublicKey, session: bytes, rnd: int, site: int
) -> CanaryAssignment:
    """Verify (the coordinator's roster key, this run, round and site) and parse an assignment.

    Raises:
        CanaryWireError: a bad signature, another run / round / site, or a malformed body.
    """
    who = "coordinator"
    body = _verified(data, server, session, who)
    m = _header(body, _TAG_ASSIGNMENT, rnd, site, who)
    want = _HEADER.size + _KEY + 18 * m
    if len(body) != want:
        raise CanaryWireError(f"{who}: canaries: {len(body)} bytes for {m} canaries, "
                              f"expected {want}")
    pos = _HEADER.size
    sample_key = body[pos : pos + _KEY]
    pos += _KEY
    param_index = np.frombuffer(body, ">u8", m, pos).astype(np.int64)
    offset = np.frombuffer(body, ">u8", m, pos + 8 * m).astype(np.int64)
    sign_bits = np.frombuffer(body, np.uint8, m, pos + 16 * m)
    inc_bits = np.frombuffer(body, np.uint8, m, pos + 17 * m)
    if np.any(sign_bits > 1) or np.any(inc_bits > 1):
        raise CanaryWireError(f"{who}: canaries: sign and inclusion bytes must be 0 or 1")
    if np.any(param_index < 0) or np.any(offset < 0):  # >= 2^63 wrapped
        raise CanaryWireError(f"{who}: canaries: a coordinate is out of range")
    return CanaryAssignment(
        rnd, site, bytes(sample_key), param_index, offset,
        np.where(sign_bits == 1, 1.0, -1.0), inc_bits.astype(bool),
    )


def encode_scores(
    key: Ed25519PrivateKey, session: bytes, rnd: int, site: int, scores: np.ndarray
) -> bytes:
    """A site's signed ``[m_site]`` canary scores of round ``rnd``."""
    s = np.asarray(scores, dtype=np.float64)
    return _sign(key, session, _HEADER.pack(_TAG_SCORES, rnd, site, s.size)
                 + s.astype(">f8").tobytes())


def decode_scores(
    data: object, client: Ed25519PublicKey, session: bytes, rnd: int, site: int, m: int
) -> np.ndarray:
    """Verify (the site's roster key, this run, round and site) and parse ``m`` finite scores.

    Raises:
        CanaryWireError: a bad signature, another run / round / site, a count other than the
            ``m`` canaries assigned, or a non-finite score.
    """
    who = f"site {site}"
    body = _verified(data, client, session, who)
    got = _header(body, _TAG_SCORES, rnd, site, who)
    if got != m or len(body) != _HEADER.size + 8 * m:
        raise CanaryWireError(f"{who}: canaries: {got} scores, {m} canaries were assigned")
    out = np.frombuffer(body, ">f8", m, _HEADER.size).astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise CanaryWireError(f"{who}: canaries: a score is not finite")
    return out
