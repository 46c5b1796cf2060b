"""The CKKS client role (:class:`CKKSClient`): holds the shared secret context and its own
Ed25519 identity key; encrypts and signs its ``[D]`` update chunk by chunk, and, as key holder,
verifies and decrypts the server's aggregate, rounding it to the release grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.secagg.ckks.errors import CKKSContextError, CKKSMessageError
from securefed.secagg.ckks.keys import context_fingerprint, context_params
from securefed.secagg.ckks.params import release_round
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
from securefed.secagg.plain import validate_inputs

__all__ = [
    "CKKSClient",
]


class CKKSClient:
    """A client: holds the shared secret context and its own Ed25519 signing key."""

    def __init__(
        self,
        client_id: int,
        context: ts.Context,
        signing_key: Ed25519PrivateKey,
        *,
        max_abs: float | None = None,
        session: bytes = b"",
    ) -> None:
        """
        Args:
            client_id: this client's id (bound into every message).
            session: a deployment's run id, bound into every signature (default: none).
            context: the shared secret CKKS context.
            signing_key: this client's Ed25519 identity key.
            max_abs: largest |value| this client may encrypt; None:
                :meth:`CKKSParams.max_abs_sum` (the protocol passes that / num_clients so that
                no sum can wrap around the modulus).
        """
        if not 0 <= client_id < SERVER_SENDER:
            raise ValueError(f"client id must be in [0, 2^32 - 1), got {client_id}")
        if not context.is_private():
            raise CKKSContextError(f"client {client_id}: context has no secret key")
        self.client_id = client_id
        self.context = context
        self.params = context_params(context)
        self.fingerprint = context_fingerprint(context)
        self.max_abs = self.params.max_abs_sum() if max_abs is None else max_abs
        self._key = signing_key
        self._session = bytes(session)

    @property
    def verify_key(self) -> Ed25519PublicKey:
        """The public half of this client's signing key (registered with the server)."""
        return self._key.public_key()

    def encrypt_update(self, round_id: int, vector: np.ndarray) -> list[bytes]:
        """Encrypt ``vector`` (``[D]`` float) into signed chunk messages for ``round_id``.

        Raises:
            ValueError: not a finite 1-D vector, or a value beyond what the modulus can hold.
        """
        vec = np.asarray(vector, dtype=np.float64)
        validate_inputs({self.client_id: vec})
        limit = self.max_abs
        peak = float(np.max(np.abs(vec))) if vec.size else 0.0
        if peak > limit:
            raise CKKSMessageError(
                self.client_id,
                "magnitude",
                f"max |value| {peak:.3g} exceeds {limit:.3g} (the largest sum the CKKS modulus "
                "holds, shared among the clients); lower ckks_scale_bits or enlarge "
                "ckks_coeff_mod_bit_sizes",
            )
        bounds = _chunk_bounds(vec.shape[0], self.params.slots)
        out = []
        for i, (lo, hi) in enumerate(bounds):
            ct = ts.ckks_vector(self.context, vec[lo:hi]).serialize()
            header = MessageHeader(
                KIND_UPLOAD,
                round_id,
                self.client_id,
                i,
                len(bounds),
                vec.shape[0],
                self.fingerprint,
            )
            out.append(pack_message(header, ct, self._key, self._session))
        return out

    def decrypt_aggregate(
        self,
        round_id: int,
        length: int,
        messages: Sequence[bytes],
        server_key: Ed25519PublicKey,
    ) -> np.ndarray:
        """Verify and decrypt the server's aggregate messages into the ``[length]`` float64 sum.

        Raises:
            CKKSMessageError: a check failed (sender named ``"server"``).
        """
        count = len(_chunk_bounds(length, self.params.slots))
        if len(messages) != count:
            raise CKKSMessageError(
                "server", "chunk_count", f"{len(messages)} aggregate messages, expected {count}"
            )
        out = np.empty(length, dtype=np.float64)
        seen: set[int] = set()
        for msg in messages:
            header, ct, sig, payload = unpack_message(msg, "server", self._session)
            if header.sender != SERVER_SENDER:
                raise CKKSMessageError(
                    "server", "sender", f"aggregate claims sender {header.sender}"
                )
            _verify(server_key, sig, payload, "server", header.chunk_index)
            _check_header(
                header,
                "server",
                kind=KIND_AGGREGATE,
                round_id=round_id,
                fingerprint=self.fingerprint,
                length=length,
                chunk_count=count,
            )
            if header.chunk_index in seen:
                raise CKKSMessageError(
                    "server", "chunk_index", f"chunk {header.chunk_index} sent twice"
                )
            seen.add(header.chunk_index)
            lo = header.chunk_index * self.params.slots
            hi = min(lo + self.params.slots, length)
            try:
                values = ts.ckks_vector_from(self.context, ct).decrypt()
            except (ValueError, RuntimeError) as exc:
                raise CKKSMessageError(
                    "server", "ciphertext", f"chunk {header.chunk_index}: {exc}"
                ) from exc
            if len(values) != hi - lo:
                raise CKKSMessageError(
                    "server",
                    "chunk_size",
                    f"chunk {header.chunk_index} has {len(values)} values, expected {hi - lo}",
                )
            out[lo:hi] = values
        return release_round(out, self.params.release_quantum)
