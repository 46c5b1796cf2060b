"""CKKS homomorphic-encryption aggregation with TenSEAL (NVIDIA FLARE's design, hardened).

Roles and what each one holds:

- every client (:class:`CKKSClient`) holds the same *secret* CKKS context. It encrypts its
  (already weighted) ``[D]`` vector in chunks of ``poly_modulus_degree / 2`` slots, one ciphertext
  per chunk, and signs each chunk message with its own Ed25519 identity key;
- the server (:class:`CKKSServer`) is built from *public* context bytes only (no secret key; it
  refuses a context that has one). It verifies every message and adds ciphertexts;
- the key holder (a client, by default the surviving client with the lowest id) verifies and
  decrypts the server's aggregate and returns the plaintext sum to the strategy, rounded to
  :attr:`CKKSParams.release_quantum` so that the release does not expose the CKKS noise (a
  ciphertext plus its exact decryption yields the secret key: Li & Micciancio 2021).

Only ``bytes`` cross role boundaries. Each message is ``header || ciphertext || signature``:

``header`` (66 bytes, big-endian): magic ``b"SFCK"``, version, kind (upload / aggregate), round
id, sender id, chunk index, chunk count, vector length ``D``, and the context fingerprint (SHA-256
of the canonical public-context bytes, see :func:`context_fingerprint`).

``signature``: Ed25519 over ``DOMAIN || header || SHA-256(ciphertext)``. CKKS ciphertexts are
malleable (anyone with the public context can add to them), so without a signature a network
attacker could shift any client's contribution undetected. Ed25519 rather than HMAC: the server
holds only *verification* keys, so neither the server nor anyone who breaks into it can forge a
client's message, and the key holder can verify the server's aggregate with the server's public
key. Pre-hashing the ciphertext with SHA-256 (hardware-accelerated) keeps signing at ~1 ms/MB.

The shared secret key is the weak spot of this design (as in FLARE): a server colluding with ANY
client can decrypt every individual update; a *malicious* server can also feed the key holder a
crafted "aggregate" and use it as a decryption oracle. This protocol defends against an
honest-but-curious server and network attackers only. See ``docs/secagg_ckks.md``.
Package layout, one module per role (every public name is re-exported here, so
``from securefed.secagg.ckks import X`` works for all of them):

- :mod:`.errors`: the exceptions;
- :mod:`.params`: :class:`CKKSParams`, their validation, the error bound and release rounding;
- :mod:`.keys`: contexts, their serializations and fingerprint, and the key files;
- :mod:`.wire`: the signed message format;
- :mod:`.client` / :mod:`.server`: the two roles, bytes in and bytes out;
- :mod:`.protocol`: the in-process driver :class:`CKKSAggregation`.

TenSEAL is imported by :mod:`.keys`, :mod:`.client`, :mod:`.server` and :mod:`.protocol`, so
importing this package imports TenSEAL; :mod:`securefed.secagg` imports it only on demand.
"""

from __future__ import annotations

from securefed.secagg.ckks.client import CKKSClient
from securefed.secagg.ckks.errors import (
    CKKSContextError,
    CKKSKeyFileError,
    CKKSKeyPermissionError,
    CKKSMessageError,
)
from securefed.secagg.ckks.keys import (
    PUBLIC_CONTEXT_FILE,
    SECRET_CONTEXT_FILE,
    context_fingerprint,
    context_params,
    init_ckks_keys,
    load_ckks_context,
    make_ckks_context,
    public_context_bytes,
    secret_context_bytes,
)
from securefed.secagg.ckks.params import (
    CKKSParams,
    ckks_error_bound,
    release_quantum,
    release_round,
    validate_ckks_params,
)
from securefed.secagg.ckks.protocol import CKKSAggregation, CKKSTranscript
from securefed.secagg.ckks.server import CKKSServer
from securefed.secagg.ckks.wire import (
    DOMAIN,
    HEADER_BYTES,
    KIND_AGGREGATE,
    KIND_UPLOAD,
    MAGIC,
    SERVER_SENDER,
    SIGNATURE_BYTES,
    VERSION,
    MessageHeader,
    pack_message,
    unpack_message,
)

__all__ = [
    "DOMAIN",
    "HEADER_BYTES",
    "KIND_AGGREGATE",
    "KIND_UPLOAD",
    "MAGIC",
    "PUBLIC_CONTEXT_FILE",
    "SECRET_CONTEXT_FILE",
    "SERVER_SENDER",
    "SIGNATURE_BYTES",
    "VERSION",
    "CKKSAggregation",
    "CKKSClient",
    "CKKSContextError",
    "CKKSKeyFileError",
    "CKKSKeyPermissionError",
    "CKKSMessageError",
    "CKKSParams",
    "CKKSServer",
    "CKKSTranscript",
    "MessageHeader",
    "ckks_error_bound",
    "context_fingerprint",
    "context_params",
    "init_ckks_keys",
    "load_ckks_context",
    "make_ckks_context",
    "pack_message",
    "public_context_bytes",
    "release_quantum",
    "release_round",
    "secret_context_bytes",
    "unpack_message",
    "validate_ckks_params",
]
