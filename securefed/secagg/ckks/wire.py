"""The CKKS wire format: ``header || ciphertext || signature`` messages.

``header`` (66 bytes, big-endian, :class:`MessageHeader`): magic ``b"SFCK"``, version, kind
(upload / aggregate), round id, sender id, chunk index, chunk count, vector length ``D`` and the
context fingerprint. ``signature``: Ed25519 over ``DOMAIN [|| run id] || header ||
SHA-256(ciphertext)``. Packing, unpacking, signature and header checks, and the chunking of a
``[D]`` vector into ciphertext-sized slices. Ciphertexts are opaque bytes here (no TenSEAL use).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.secagg.ckks.errors import CKKSMessageError

__all__ = [
    "DOMAIN",
    "HEADER_BYTES",
    "KIND_AGGREGATE",
    "KIND_UPLOAD",
    "MAGIC",
    "SERVER_SENDER",
    "SIGNATURE_BYTES",
    "VERSION",
    "MessageHeader",
    "pack_message",
    "unpack_message",
]

#: domain-separation prefix of every signed payload
DOMAIN = b"securefed/secagg/ckks/v1\x00"
MAGIC = b"SFCK"
VERSION = 1
KIND_UPLOAD = 1
KIND_AGGREGATE = 2
#: sender id written in the header of the server's aggregate messages
SERVER_SENDER = 0xFFFFFFFF
_HEADER = struct.Struct(">4sBBQIIIQ32s")
HEADER_BYTES = _HEADER.size  # 66
SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class MessageHeader:
    """Header bound (by signature) to every ciphertext message."""

    kind: int
    round_id: int
    sender: int
    chunk_index: int
    chunk_count: int
    length: int
    fingerprint: bytes

    def pack(self) -> bytes:
        """The 66-byte wire form."""
        return _HEADER.pack(
            MAGIC,
            VERSION,
            self.kind,
            self.round_id,
            self.sender,
            self.chunk_index,
            self.chunk_count,
            self.length,
            self.fingerprint,
        )


def _signed_payload(header: bytes, ciphertext: bytes, session: bytes = b"") -> bytes:
    # a deployment binds its run id (``session``) into every signature: a message of one run
    # does not verify in another; the in-process protocol signs without one
    run = b"run" + struct.pack(">H", len(session)) + session if session else b""
    return DOMAIN + run + header + hashlib.sha256(ciphertext).digest()


def pack_message(
    header: MessageHeader, ciphertext: bytes, key: Ed25519PrivateKey, session: bytes = b""
) -> bytes:
    """``header || ciphertext || Ed25519(DOMAIN [|| run id] || header || SHA-256(ciphertext))``."""
    head = header.pack()
    return head + ciphertext + key.sign(_signed_payload(head, ciphertext, session))


def unpack_message(
    message: bytes, sender: int | str, session: bytes = b""
) -> tuple[MessageHeader, bytes, bytes, bytes]:
    """Split a message into (header, ciphertext, signature, signed payload). No signature check.

    Raises:
        CKKSMessageError: ``format`` check (too short, bad magic/version), naming ``sender``.
    """
    if not isinstance(message, bytes | bytearray | memoryview):
        raise CKKSMessageError(sender, "format", f"message is {type(message).__name__}, not bytes")
    message = bytes(message)
    if len(message) <= HEADER_BYTES + SIGNATURE_BYTES:
        raise CKKSMessageError(sender, "format", f"message too short ({len(message)} bytes)")
    head = message[:HEADER_BYTES]
    magic, version, kind, rnd, snd, idx, count, length, fp = _HEADER.unpack(head)
    if magic != MAGIC or version != VERSION:
        raise CKKSMessageError(
            sender,
            "format",
            f"bad magic/version {magic!r}/{version} (not a securefed CKKS message)",
        )
    ct = message[HEADER_BYTES:-SIGNATURE_BYTES]
    sig = message[-SIGNATURE_BYTES:]
    header = MessageHeader(kind, rnd, snd, idx, count, length, fp)
    return header, ct, sig, _signed_payload(head, ct, session)


def _verify(
    key: Ed25519PublicKey, sig: bytes, payload: bytes, sender: int | str, chunk: int
) -> None:
    try:
        key.verify(sig, payload)
    except InvalidSignature:
        raise CKKSMessageError(
            sender,
            "signature",
            f"chunk {chunk}: Ed25519 signature does not verify (header or ciphertext altered, or "
            "signed by another key)",
        ) from None


def _check_header(
    header: MessageHeader,
    sender: int | str,
    *,
    kind: int,
    round_id: int,
    fingerprint: bytes,
    length: int,
    chunk_count: int,
) -> None:
    if header.kind != kind:
        raise CKKSMessageError(sender, "kind", f"message kind {header.kind}, expected {kind}")
    if header.round_id != round_id:
        raise CKKSMessageError(
            sender, "round", f"message is for round {header.round_id}, this is round {round_id}"
        )
    if header.fingerprint != fingerprint:
        raise CKKSMessageError(
            sender,
            "context",
            f"encrypted under context {header.fingerprint.hex()[:16]}, expected "
            f"{fingerprint.hex()[:16]} (different CKKS key or parameters)",
        )
    if header.length != length:
        raise CKKSMessageError(
            sender, "length", f"vector length {header.length}, expected {length}"
        )
    if header.chunk_count != chunk_count:
        raise CKKSMessageError(
            sender,
            "chunk_count",
            f"header says {header.chunk_count} chunks, length {length} needs {chunk_count}",
        )
    if not 0 <= header.chunk_index < chunk_count:
        raise CKKSMessageError(
            sender, "chunk_index", f"chunk index {header.chunk_index} not in [0, {chunk_count})"
        )


def _chunk_bounds(length: int, slots: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + slots, length)) for lo in range(0, length, slots)]
