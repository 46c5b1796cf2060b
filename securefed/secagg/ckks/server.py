"""The CKKS server role (:class:`CKKSServer`): built from public context bytes only (it refuses a
secret key); verifies every client's signed chunks, checks each ciphertext is fresh, adds them,
and signs the aggregate for the key holder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.secagg.base import AggregationAbortedError
from securefed.secagg.ckks.errors import CKKSContextError, CKKSMessageError
from securefed.secagg.ckks.keys import PUBLIC_CONTEXT_FILE, context_fingerprint, context_params
from securefed.secagg.ckks.wire import (
    KIND_AGGREGATE,
    KIND_UPLOAD,
    SERVER_SENDER,
    MessageHeader,
    _check_header,
    _chunk_bounds,
    _verify,
    pack_message,
    unpack_message,
)

__all__ = [
    "CKKSServer",
]


class CKKSServer:
    """The aggregator: a public-only context, client verification keys, its own signing key."""

    def __init__(
        self,
        public_context: bytes,
        verify_keys: Mapping[int, Ed25519PublicKey],
        signing_key: Ed25519PrivateKey,
        *,
        session: bytes = b"",
    ) -> None:
        """Load the server context from public bytes (``session``: a deployment's run id,
        bound into every signature it checks or makes).

        Raises:
            CKKSContextError: the bytes are not a context, or they contain a secret key.
        """
        try:
            ctx = ts.context_from(bytes(public_context))
        except (ValueError, RuntimeError) as exc:
            raise CKKSContextError(f"server: public context bytes do not parse ({exc})") from exc
        if ctx.is_private():
            raise CKKSContextError(
                "server: the context holds a secret key; the server must get the public-only "
                f"context ({PUBLIC_CONTEXT_FILE})"
            )
        self._context = ctx
        self.params = context_params(ctx)
        self.fingerprint = context_fingerprint(ctx)
        self._verify_keys = dict(verify_keys)
        self._key = signing_key
        self._session = bytes(session)
        self._round: int | None = None
        self._length = 0
        self._acc: list[ts.CKKSVector] = []
        self._contributors: list[int] = []

    @property
    def context(self) -> ts.Context:
        """The server's TenSEAL context (public-only: ``is_private()`` is False)."""
        return self._context

    @property
    def verify_key(self) -> Ed25519PublicKey:
        """The server's signature verification key (pinned by the key holder)."""
        return self._key.public_key()

    @property
    def contributors(self) -> tuple[int, ...]:
        """Clients whose ciphertexts are in the current sum."""
        return tuple(self._contributors)

    def begin_round(self, round_id: int, length: int) -> None:
        """Start summing ``[length]`` vectors for ``round_id``; discards any previous state."""
        if round_id < 0 or length < 1:
            raise ValueError(f"round id must be >= 0 and length >= 1, got {round_id}, {length}")
        self._round = round_id
        self._length = length
        self._acc = []
        self._contributors = []

    def receive(self, client_id: int, messages: Sequence[bytes]) -> None:
        """Verify one client's chunk messages and add its ciphertexts to the sum (all or nothing).

        Raises:
            CKKSMessageError: naming the client and the failed check.
        """
        if self._round is None:
            raise RuntimeError("server: begin_round() first")
        key = self._verify_keys.get(client_id)
        if key is None:
            raise CKKSMessageError(
                client_id, "client", "unknown client (no registered verification key)"
            )
        if client_id in self._contributors:
            raise CKKSMessageError(client_id, "duplicate", "already contributed this round")
        bounds = _chunk_bounds(self._length, self.params.slots)
        if len(messages) != len(bounds):
            raise CKKSMessageError(
                client_id, "chunk_count", f"{len(messages)} messages, expected {len(bounds)}"
            )
        chunks: dict[int, ts.CKKSVector] = {}
        for msg in messages:
            header, ct, sig, payload = unpack_message(msg, client_id, self._session)
            if header.sender != client_id:
                raise CKKSMessageError(
                    client_id,
                    "client",
                    f"message claims to be from client {header.sender}",
                )
            _verify(key, sig, payload, client_id, header.chunk_index)
            _check_header(
                header,
                client_id,
                kind=KIND_UPLOAD,
                round_id=self._round,
                fingerprint=self.fingerprint,
                length=self._length,
                chunk_count=len(bounds),
            )
            if header.chunk_index in chunks:
                raise CKKSMessageError(
                    client_id, "chunk_index", f"chunk {header.chunk_index} sent twice"
                )
            try:
                vec = ts.ckks_vector_from(self._context, ct)
            except (ValueError, RuntimeError) as exc:
                raise CKKSMessageError(
                    client_id, "ciphertext", f"chunk {header.chunk_index} does not parse ({exc})"
                ) from exc
            lo, hi = bounds[header.chunk_index]
            if vec.size() != hi - lo:
                raise CKKSMessageError(
                    client_id,
                    "chunk_size",
                    f"chunk {header.chunk_index} holds {vec.size()} values, expected {hi - lo}",
                )
            self._check_ciphertext(client_id, header.chunk_index, vec)
            chunks[header.chunk_index] = vec
        if not self._acc:
            self._acc = [chunks[i] for i in range(len(bounds))]
        else:
            for i, vec in chunks.items():
                self._acc[i].add_(vec)
        self._contributors.append(client_id)

    def _check_ciphertext(self, client_id: int, index: int, vec: ts.CKKSVector) -> None:
        """Same scale and level as a fresh ciphertext (else the sum would be garbage or fail)."""
        first = self._context.seal_context().data.first_parms_id()
        for c in vec.ciphertext():
            if c.parms_id() != first or c.size() != 2:
                raise CKKSMessageError(
                    client_id,
                    "ciphertext",
                    f"chunk {index} is not a fresh ciphertext (level or size differs)",
                )
            if c.scale != self._context.global_scale:
                raise CKKSMessageError(
                    client_id,
                    "ciphertext",
                    f"chunk {index} has scale {c.scale:g}, expected {self._context.global_scale:g}",
                )

    def finish(self) -> list[bytes]:
        """Serialize and sign the summed ciphertexts (one message per chunk).

        Raises:
            AggregationAbortedError: nobody contributed.
        """
        if self._round is None or not self._acc:
            raise AggregationAbortedError("server: no client contributed this round")
        count = len(self._acc)
        out = []
        for i, vec in enumerate(self._acc):
            header = MessageHeader(
                KIND_AGGREGATE,
                self._round,
                SERVER_SENDER,
                i,
                count,
                self._length,
                self.fingerprint,
            )
            out.append(pack_message(header, vec.serialize(), self._key, self._session))
        self._acc = []
        return out
