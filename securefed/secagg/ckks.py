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
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import stat
import struct
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import tenseal as ts
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.secagg.base import (
    AggregationAbortedError,
    AggregationProtocol,
    AggregationResult,
    DistributedNoise,
)
from securefed.secagg.plain import validate_inputs

if TYPE_CHECKING:
    from securefed.config import SecureAggregationConfig

__all__ = [
    "PUBLIC_CONTEXT_FILE",
    "SECRET_CONTEXT_FILE",
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
    "resolve_threshold",
    "secret_context_bytes",
    "unpack_message",
    "validate_ckks_params",
]

SECRET_CONTEXT_FILE = "ckks_secret.ctx"
PUBLIC_CONTEXT_FILE = "ckks_public.ctx"

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

#: SEAL's largest total coefficient-modulus size (bits) at 128-bit classical security.
_MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: bits between the scale and the data modulus below which we refuse the parameters
_MIN_HEADROOM_BITS = 20
#: multiple of the per-slot noise std used by :func:`ckks_error_bound` (see its docstring)
_ERROR_SIGMAS = 30.0


# --------------------------------------------------------------------------- errors


class CKKSMessageError(ValueError):
    """A protocol message failed a check. ``client`` is the sender (``"server"`` for aggregates)."""

    def __init__(self, client: int | str, check: str, detail: str) -> None:
        self.client = client
        self.check = check
        who = client if isinstance(client, str) else f"client {client}"
        super().__init__(f"{who}: {check} check failed: {detail}")


class CKKSContextError(ValueError):
    """Invalid CKKS parameters, an unreadable context, or contexts that do not belong together."""


class CKKSKeyFileError(FileNotFoundError):
    """A CKKS key file is missing (the message names the config field and the command)."""


class CKKSKeyPermissionError(PermissionError):
    """A CKKS secret-key file is accessible to group/others (refused, not just warned)."""


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class CKKSParams:
    """CKKS encryption parameters.

    Attributes:
        poly_modulus_degree: ring dimension N (power of two); each ciphertext holds N/2 slots.
        coeff_mod_bit_sizes: bit sizes of the RNS primes; the last one is SEAL's special prime
            (used only for key switching / encryption), the others form the data modulus.
        scale_bits: log2 of the encoding scale (global_scale = 2**scale_bits).
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40)
    scale_bits: int = 40

    @property
    def slots(self) -> int:
        """Values per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus fresh ciphertexts live under (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    def max_abs_sum(self) -> float:
        """Largest |value| a decrypted SUM may have without wrapping around the data modulus.

        Encoded coefficients are bounded by |value| * 2**scale_bits; we keep two bits of margin
        below q/2 for noise and rounding.
        """
        return float(2.0 ** (self.data_modulus_bits - self.scale_bits - 2))

    @property
    def release_quantum(self) -> float:
        """Grid the key holder rounds the decrypted sum to before releasing it (see
        :func:`release_quantum`). N=8192, Δ=2^40: 2^-25 ≈ 3.0e-8."""
        return release_quantum(self.poly_modulus_degree, self.scale_bits)


def release_quantum(poly_modulus_degree: int, scale_bits: int) -> float:
    """``g = 2^(ceil(log2 sqrt(12 N)) + 6) / Δ``: the rounding grid of a released CKKS sum.

    A CKKS decryption carries the noise ``e``, and a ciphertext together with its exact
    decryption gives away the secret key by linear algebra (Li & Micciancio, EUROCRYPT 2021);
    here the server holds the aggregate ciphertext and receives its decryption. After rounding
    the slots to multiples of ``g`` the server only learns ``m + e`` up to a residual whose
    coefficients have std ``g Δ / sqrt(12 N) >= 64``, i.e. an RLWE instance with an error 20x
    wider than the σ = 3.2 of standard parameters. A heuristic countermeasure (cheaper than
    statistical noise flooding, which would cost ~20 bits of precision), not a proof.
    """
    exponent = math.ceil(math.log2(math.sqrt(12.0 * poly_modulus_degree))) + 6
    return float(2.0 ** (exponent - scale_bits))


def validate_ckks_params(params: CKKSParams, *, prefix: str = "secure_aggregation.") -> None:
    """Reject CKKS parameters that TenSEAL/SEAL would refuse or that would lose the sum.

    Raises:
        CKKSContextError: naming the config field (``prefix`` + ``ckks_...``) and the fix.
    """
    n = params.poly_modulus_degree
    sizes = params.coeff_mod_bit_sizes
    if n not in _MAX_COEFF_BITS_128:
        raise CKKSContextError(
            f"{prefix}ckks_poly_modulus_degree: must be a power of two in 1024..32768, got {n}"
        )
    if len(sizes) < 2:
        raise CKKSContextError(
            f"{prefix}ckks_coeff_mod_bit_sizes: need at least 2 primes (data primes + SEAL's "
            f"special prime), got {list(sizes)}"
        )
    bad = [b for b in sizes if not 20 <= b <= 60]
    if bad:
        raise CKKSContextError(
            f"{prefix}ckks_coeff_mod_bit_sizes: every prime must have 20..60 bits, "
            f"got {list(sizes)}"
        )
    total = sum(sizes)
    if total > _MAX_COEFF_BITS_128[n]:
        raise CKKSContextError(
            f"{prefix}ckks_coeff_mod_bit_sizes: total {total} bits exceeds the 128-bit-security "
            f"limit {_MAX_COEFF_BITS_128[n]} for poly_modulus_degree {n}; use fewer/smaller primes "
            "or a larger ckks_poly_modulus_degree"
        )
    if not 10 <= params.scale_bits <= 60:
        raise CKKSContextError(
            f"{prefix}ckks_scale_bits: must be in 10..60, got {params.scale_bits}"
        )
    headroom = params.data_modulus_bits - params.scale_bits
    if headroom < _MIN_HEADROOM_BITS:
        raise CKKSContextError(
            f"{prefix}ckks_scale_bits: scale 2^{params.scale_bits} leaves {headroom} bits of "
            f"headroom in the data modulus ({params.data_modulus_bits} bits = sum of "
            f"ckks_coeff_mod_bit_sizes except the last); need >= {_MIN_HEADROOM_BITS}: lower "
            "ckks_scale_bits or enlarge the first primes"
        )


def ckks_error_bound(
    n: int,
    max_abs: float,
    *,
    poly_modulus_degree: int = 8192,
    scale_bits: int = 40,
    release_quantum: float | None = None,
) -> float:
    """Absolute per-coordinate error bound of a released CKKS sum of ``n`` fresh ciphertexts.

    Model (SEAL public-key encryption, which encrypts under the special prime and divides it
    away): the dominant per-slot error of one fresh ciphertext is ``Re(s_i * r_i) / Δ`` where
    ``s`` is the ternary secret and ``r`` the rounding error of that division, both seen through
    the canonical embedding (a ring homomorphism, so products stay products). Its standard
    deviation is ``σ1 = N / (6 Δ)`` (Δ = 2**scale_bits): measured std/σ1 = 0.99..1.005 for
    N in {4096, 8192, 16384} and scale bits 20..50, independent of the values' magnitude
    (1e-3..1e6). ``s`` is common to all ciphertexts, so the error of a sum of ``n`` ciphertexts
    is ``Re(s_i * Σ r_i) / Δ``: std ``sqrt(n) σ1`` with the same product-of-Gaussians tail,
    ``P(|err| > k sqrt(n) σ1) <= sqrt(π k / √2) exp(-√2 k)`` (observed: maxima of 8.5..12 σ
    over 5e5..1e6 slots, tail decaying e^-1.45 per σ). We take ``k = 30``: a per-slot
    exceedance probability of ~3e-18. Smaller terms: the two roundings (encoding, and the c0
    division), ``30 sqrt(n) sqrt(N / 12) / Δ``; double-precision encode/decode FFTs (relative
    ~log2(N) 2^-53), covered by ``n * max_abs * 2^-45``. Finally the key holder rounds the
    sum to the grid of :func:`release_quantum`, adding up to half of it.

    Args:
        n: number of summed vectors (>= 1).
        max_abs: bound B on |value| of every coordinate of every input vector.
        poly_modulus_degree: N.
        scale_bits: log2 Δ.
        release_quantum: rounding grid of the released sum; None: the protocol's default
            (:func:`release_quantum`); 0: the raw decryption error.

    Returns:
        The bound on ``max_i |released_i - exact_sum_i|``. For N=8192, Δ=2^40 the CKKS part is
        3.8e-8 at n=1, 1.2e-7 at n=10, 3.8e-7 at n=100 (B=1); the default rounding adds 1.5e-8.
    """
    if n < 1:
        raise ValueError(f"ckks_error_bound: n must be >= 1, got {n}")
    if not max_abs >= 0:
        raise ValueError(f"ckks_error_bound: max_abs must be >= 0, got {max_abs}")
    scale = 2.0**scale_bits
    sigma1 = poly_modulus_degree / (6.0 * scale)
    rounding = math.sqrt(poly_modulus_degree / 12.0) / scale
    quantum = (
        _release_quantum(poly_modulus_degree, scale_bits)
        if release_quantum is None
        else release_quantum
    )
    return (
        math.sqrt(n) * _ERROR_SIGMAS * (sigma1 + rounding)
        + n * float(max_abs) * 2.0**-45
        + quantum / 2.0
    )


def release_round(values: np.ndarray, quantum: float) -> np.ndarray:
    """Round ``values`` to multiples of ``quantum`` (a power of two, so exactly representable)."""
    if quantum <= 0:
        return values
    return np.round(values / quantum) * quantum


_release_quantum = release_quantum  # the name is shadowed by ckks_error_bound's argument


# --------------------------------------------------------------------------- contexts


def make_ckks_context(params: CKKSParams | None = None) -> ts.Context:
    """A fresh CKKS context holding a new secret key (keys generated by SEAL's CSPRNG)."""
    params = params or CKKSParams()
    validate_ckks_params(params)
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
    except (ValueError, RuntimeError) as exc:
        raise CKKSContextError(
            f"secure_aggregation.ckks_coeff_mod_bit_sizes: TenSEAL refused {params}: {exc}"
        ) from exc
    ctx.global_scale = 2.0**params.scale_bits
    return ctx


def secret_context_bytes(ctx: ts.Context) -> bytes:
    """Serialize a context WITH its secret key (for clients only). No relin/Galois keys: sums
    need none."""
    if not ctx.is_private():
        raise CKKSContextError("secret_context_bytes: the context holds no secret key")
    return ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )


def public_context_bytes(ctx: ts.Context) -> bytes:
    """Canonical public-only serialization: parameters, scale and public key; never the secret
    key, no relin/Galois keys. Deterministic for a given key, whichever way the context was loaded
    (full serializations with relin keys are not), so it defines :func:`context_fingerprint`."""
    pub = ctx.copy()
    if pub.is_private():
        pub.make_context_public()
    return pub.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


def context_fingerprint(ctx: ts.Context) -> bytes:
    """SHA-256 of :func:`public_context_bytes` (32 bytes): identifies parameters + key pair."""
    return hashlib.sha256(public_context_bytes(ctx)).digest()


def context_params(ctx: ts.Context) -> CKKSParams:
    """Read the parameters back from a (loaded) context.

    Raises:
        CKKSContextError: the context is not a CKKS context.
    """
    seal = ctx.seal_context().data
    key_data = seal.key_context_data()
    if key_data.parms().scheme() != ts._ts_cpp.SCHEME_TYPE.CKKS:
        raise CKKSContextError("context is not a CKKS context")
    # walk the modulus-switching chain from the lowest level up: each level adds one prime
    totals = [key_data.total_coeff_modulus_bit_count()]
    level = seal.first_context_data()
    while level is not None:
        totals.append(level.total_coeff_modulus_bit_count())
        level = level.next_context_data()
    totals = sorted(set(totals))
    sizes = [totals[0]] + [b - a for a, b in itertools.pairwise(totals)]
    return CKKSParams(
        poly_modulus_degree=key_data.parms().poly_modulus_degree(),
        coeff_mod_bit_sizes=tuple(sizes),
        scale_bits=round(math.log2(ctx.global_scale)),
    )


def load_ckks_context(path: Path | str) -> ts.Context:
    """Load a context file written by :func:`init_ckks_keys` (secret or public).

    Raises:
        CKKSKeyPermissionError: the file holds a SECRET key and is accessible to group/others
            (whoever reads it decrypts every client's update).
        CKKSKeyFileError: the file does not exist.
        CKKSContextError: the file is not a valid CKKS context.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CKKSKeyFileError(f"CKKS context file not found: {path}") from exc
    try:
        ctx = ts.context_from(data)
    except (ValueError, RuntimeError) as exc:
        raise CKKSContextError(f"{path}: not a valid TenSEAL context ({exc})") from exc
    context_params(ctx)
    mode = stat.S_IMODE(path.stat().st_mode)
    if ctx.is_private() and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CKKSKeyPermissionError(
            f"{path} holds a CKKS secret key but is accessible by group/others (mode {mode:o}); "
            f"run `chmod 600 {path}`: whoever reads it can decrypt every client's update"
        )
    return ctx


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a same-folder temp file + fsync + os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def init_ckks_keys(
    out_dir: Path,
    *,
    poly_modulus_degree: int = 8192,
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40),
    scale_bits: int = 40,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Provision a CKKS key pair: the implementation of ``securefed keys init --ckks --out DIR``.

    Writes ``ckks_secret.ctx`` (for every client; mode 0600) and ``ckks_public.ctx`` (for the
    server; public key and parameters only, mode 0644), each atomically, into ``out_dir`` made
    mode 0700. Refuses a folder that holds the server's identity key (``server.key``): the
    folder handed to the server must never contain the clients' CKKS secret.

    Returns:
        ``(secret_path, public_path)``.

    Raises:
        FileExistsError: a key file exists and ``overwrite`` is False (replacing keys breaks a
            running federation), or ``out_dir`` holds ``server.key``.
        CKKSContextError: invalid parameters.
    """
    from securefed.secagg.keys import SERVER_KEY_FILE

    out_dir = Path(out_dir)
    if (out_dir / SERVER_KEY_FILE).exists():
        raise FileExistsError(
            f"{out_dir} holds the server's {SERVER_KEY_FILE}: the clients' CKKS secret must never "
            "be written beside it; give the CKKS keys their own folder (keys init --ckks-out DIR)"
        )
    params = CKKSParams(poly_modulus_degree, tuple(coeff_mod_bit_sizes), scale_bits)
    ctx = make_ckks_context(params)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out_dir, 0o700)  # the secret's folder: nobody else may list or replace it
    secret_path = out_dir / SECRET_CONTEXT_FILE
    public_path = out_dir / PUBLIC_CONTEXT_FILE
    if not overwrite:
        for p in (secret_path, public_path):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass overwrite=True to replace the CKKS keys")
    _atomic_write(secret_path, secret_context_bytes(ctx), 0o600)
    _atomic_write(public_path, public_context_bytes(ctx), 0o644)
    return secret_path, public_path


# --------------------------------------------------------------------------- messages


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


# --------------------------------------------------------------------------- roles


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


# --------------------------------------------------------------------------- driver


def resolve_threshold(threshold: float, round_clients: int) -> int:
    """Minimum survivors for a round of ``round_clients`` selected clients.

    ``threshold > 1`` is a count (must be an integer); ``0 < threshold <= 1`` a fraction, rounded
    up and at least 2 (the meaning of ``secure_aggregation.threshold``).
    """
    if threshold > 1:
        if threshold != int(threshold):
            raise ValueError(f"threshold: a count must be an integer, got {threshold}")
        return int(threshold)
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    return max(2, math.ceil(threshold * round_clients - 1e-9))


@dataclass(frozen=True)
class CKKSTranscript:
    """Everything the server received and sent in one round (when recording is on)."""

    round_id: int
    uploads: Mapping[int, tuple[bytes, ...]] = field(default_factory=dict)
    aggregate: tuple[bytes, ...] = ()


class CKKSAggregation(AggregationProtocol):
    """CKKS secure aggregation: clients encrypt, the server adds ciphertexts, a key holder
    decrypts the sum.

    Registered clients are ids ``0 .. num_clients - 1``; each gets an Ed25519 identity key whose
    public half is registered with the server at construction (in a deployment: out of band).
    """

    name: ClassVar[str] = "ckks"
    dropout_stages: ClassVar[tuple[str, ...]] = ("upload",)

    def __init__(
        self,
        secret_context: bytes,
        public_context: bytes,
        num_clients: int,
        *,
        key_holder: int | None = None,
        threshold: float | None = None,
        record_transcript: bool = False,
    ) -> None:
        """
        Args:
            secret_context: serialized context with the secret key (all clients).
            public_context: serialized public-only context (the server).
            num_clients: federation size; clients are ids ``0 .. num_clients - 1``.
            key_holder: client id that decrypts the aggregate; None: the surviving client with
                the lowest id in each round.
            threshold: minimum number of survivors whose sum may be released, with the
                semantics of ``secure_aggregation.threshold`` (an int >= 2 is a count, a value in
                (0, 1] a fraction of the round's clients, rounded up, at least 2); None: any
                number (a one-client "sum" then reveals that client's update).
            record_transcript: keep the server's view of the last round in
                :attr:`last_transcript` (memory: ~57 MB per client per 1M parameters).

        Raises:
            CKKSContextError: a context is invalid, or the two contexts are not one key pair.
        """
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        try:
            ctx = ts.context_from(bytes(secret_context))
        except (ValueError, RuntimeError) as exc:
            raise CKKSContextError(f"secret context bytes do not parse ({exc})") from exc
        if not ctx.is_private():
            raise CKKSContextError("the client context holds no secret key")
        params = context_params(ctx)
        validate_ckks_params(params)
        self.params = params
        keys = {c: Ed25519PrivateKey.generate() for c in range(num_clients)}
        per_client = params.max_abs_sum() / num_clients
        self._clients = {c: CKKSClient(c, ctx, k, max_abs=per_client) for c, k in keys.items()}
        self.server = CKKSServer(
            public_context,
            {c: k.public_key() for c, k in keys.items()},
            Ed25519PrivateKey.generate(),
        )
        client_fp = context_fingerprint(ctx)
        if self.server.fingerprint != client_fp:
            raise CKKSContextError(
                "the public context does not belong to the secret context (fingerprints "
                f"{self.server.fingerprint.hex()[:16]} vs {client_fp.hex()[:16]}); provision "
                "both files with one `securefed keys init --ckks` run"
            )
        if key_holder is not None and key_holder not in self._clients:
            raise ValueError(f"key_holder {key_holder} is not a client id in [0, {num_clients})")
        self.num_clients = num_clients
        self.key_holder = key_holder
        if threshold is not None and resolve_threshold(threshold, num_clients) > num_clients:
            raise ValueError(
                f"secure_aggregation.threshold: {threshold} needs more survivors than the "
                f"{num_clients} clients of the federation"
            )
        self.threshold = threshold
        self.record_transcript = record_transcript
        self.last_transcript: CKKSTranscript | None = None

    # ----------------------------------------------------------------- construction

    @classmethod
    def ephemeral(
        cls,
        num_clients: int,
        params: CKKSParams | None = None,
        *,
        key_holder: int | None = None,
        threshold: float | None = None,
        record_transcript: bool = False,
    ) -> CKKSAggregation:
        """Fresh in-memory keys (nothing written to disk)."""
        ctx = make_ckks_context(params)
        return cls(
            secret_context_bytes(ctx),
            public_context_bytes(ctx),
            num_clients,
            key_holder=key_holder,
            threshold=threshold,
            record_transcript=record_transcript,
        )

    @classmethod
    def from_keys_dir(
        cls,
        keys_dir: Path,
        num_clients: int,
        *,
        key_holder: int | None = None,
        threshold: float | None = None,
        record_transcript: bool = False,
    ) -> CKKSAggregation:
        """Load ``ckks_secret.ctx`` / ``ckks_public.ctx`` written by :func:`init_ckks_keys`.

        Raises:
            CKKSKeyFileError: a file is missing (message names the field and the command).
        """
        keys_dir = Path(keys_dir)
        paths = [keys_dir / SECRET_CONTEXT_FILE, keys_dir / PUBLIC_CONTEXT_FILE]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise CKKSKeyFileError(
                f"secure_aggregation.keys_dir: {keys_dir} lacks {', '.join(missing)}; create "
                f"them with `securefed keys init --ckks --out {keys_dir}` or unset keys_dir for "
                "ephemeral keys"
            )
        secret = load_ckks_context(paths[0])
        if not secret.is_private():
            raise CKKSContextError(f"{paths[0]}: holds no secret key")
        public = load_ckks_context(paths[1])
        if public.is_private():
            raise CKKSContextError(
                f"{paths[1]}: the server's file holds a SECRET key; re-provision with "
                f"`securefed keys init --ckks --out {keys_dir}`"
            )
        return cls(
            secret_context_bytes(secret),
            paths[1].read_bytes(),
            num_clients,
            key_holder=key_holder,
            threshold=threshold,
            record_transcript=record_transcript,
        )

    @classmethod
    def from_config(cls, cfg: SecureAggregationConfig, num_clients: int) -> CKKSAggregation:
        """Build from ``secure_aggregation``: keys from ``keys_dir`` if set, else ephemeral.

        Raises:
            CKKSContextError: parameters invalid, or the keys_dir context disagrees with them.
            CKKSKeyFileError: keys_dir set but the files are missing.
        """
        params = CKKSParams(
            cfg.ckks_poly_modulus_degree, tuple(cfg.ckks_coeff_mod_bit_sizes), cfg.ckks_scale_bits
        )
        validate_ckks_params(params)
        if cfg.keys_dir is None:
            return cls.ephemeral(num_clients, params, threshold=cfg.threshold)
        proto = cls.from_keys_dir(cfg.keys_dir, num_clients, threshold=cfg.threshold)
        if proto.params != params:
            raise CKKSContextError(
                f"secure_aggregation.keys_dir: {cfg.keys_dir} holds CKKS keys for {proto.params} "
                f"but the config asks for {params}; set the ckks_* fields to match or re-run "
                f"`securefed keys init --ckks --out {cfg.keys_dir}` with these parameters"
            )
        return proto

    # ----------------------------------------------------------------- accessors

    def client(self, client_id: int) -> CKKSClient:
        """The client role of ``client_id`` (for tests and transports)."""
        return self._clients[client_id]

    def error_bound(self, n: int, max_abs: float) -> float:
        """:func:`ckks_error_bound` for this protocol's parameters (release rounding included)."""
        return ckks_error_bound(
            n,
            max_abs,
            poly_modulus_degree=self.params.poly_modulus_degree,
            scale_bits=self.params.scale_bits,
            release_quantum=self.params.release_quantum,
        )

    # ----------------------------------------------------------------- one round

    def aggregate(
        self,
        round_id: int,
        inputs: Mapping[int, np.ndarray],
        dropouts: Mapping[int, str] | None = None,
        *,
        noise: DistributedNoise | None = None,
    ) -> AggregationResult:
        """Client encrypt -> server verify + sum -> key holder decrypt, passing only bytes.

        With ``noise``, every client adds its share ``N(0, noise.std^2 / noise.expected)`` (secure
        SecureGaussian source) to its vector before encrypting it, so neither the server nor the key
        holder ever sees an un-noised sum.

        A client dropping at ``upload`` contributes nothing; the result is the survivors' sum
        within :meth:`error_bound`. The key holder's upload of the decrypted sum (8 bytes per
        value) is counted in its ``bytes_up``.
        """
        dropouts = dict(dropouts or {})
        for cid, stage in dropouts.items():
            if stage not in self.dropout_stages:
                raise ValueError(
                    f"client {cid}: unknown dropout stage {stage!r}; ckks has {self.dropout_stages}"
                )
        if round_id < 0:
            raise ValueError(f"round id must be >= 0, got {round_id}")
        survivors = sorted(c for c in inputs if c not in dropouts)
        for c in survivors:
            if c not in self._clients:
                raise CKKSMessageError(
                    c, "client", f"unknown client (registered ids are 0..{self.num_clients - 1})"
                )
        live = {c: np.asarray(inputs[c], dtype=np.float64) for c in survivors}
        length = validate_inputs(live)
        if length == 0:
            raise ValueError("inputs are empty vectors (length 0)")
        if self.threshold is not None:
            need = resolve_threshold(self.threshold, len(set(inputs) | set(dropouts)))
            if len(survivors) < need:
                raise AggregationAbortedError(
                    f"only {len(survivors)} clients survived, the threshold is {need}: a smaller "
                    "sum would expose too few clients' updates"
                )
        holder = self.key_holder if self.key_holder is not None else survivors[0]
        if holder not in live:
            raise AggregationAbortedError(f"key holder client {holder} dropped out this round")

        bytes_up: dict[int, int] = {}
        bytes_down: dict[int, int] = dict.fromkeys(survivors, 0)
        client_seconds: dict[int, float] = {}
        uploads: dict[int, tuple[bytes, ...]] = {}
        upload_bytes = 0  # the key holder's ciphertext upload, reported in info
        t0 = time.process_time()
        self.server.begin_round(round_id, length)
        server_seconds = time.process_time() - t0
        # streamed client by client: only one client's ciphertexts are in flight at a time
        for c in survivors:
            t0 = time.process_time()
            if noise is not None and noise.std > 0:
                from securefed.noise.secure_noise import SecureGaussian

                share = SecureGaussian().normal((length,), noise.share_std(), dtype=torch.float64)
                live[c] = live[c] + share.numpy()
            messages = self._clients[c].encrypt_update(round_id, live[c])
            client_seconds[c] = time.process_time() - t0
            bytes_up[c] = sum(len(m) for m in messages)
            t0 = time.process_time()
            self.server.receive(c, messages)
            server_seconds += time.process_time() - t0
            if self.record_transcript:
                uploads[c] = tuple(messages)
            if c == holder:
                upload_bytes = bytes_up[c]
            del messages
        t0 = time.process_time()
        aggregate = self.server.finish()
        server_seconds += time.process_time() - t0

        t0 = time.process_time()
        total = self._clients[holder].decrypt_aggregate(
            round_id, length, aggregate, self.server.verify_key
        )
        sum_bytes = total.astype("<f8").tobytes()  # what the key holder returns to the server
        client_seconds[holder] += time.process_time() - t0
        bytes_down[holder] += sum(len(m) for m in aggregate)
        bytes_up[holder] += len(sum_bytes)
        total = np.frombuffer(sum_bytes, dtype="<f8").astype(np.float64)

        if self.record_transcript:
            self.last_transcript = CKKSTranscript(round_id, uploads, tuple(aggregate))
        return AggregationResult(
            total=total,
            survivors=tuple(survivors),
            dropped=tuple(sorted(dropouts)),
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            client_seconds=client_seconds,
            server_seconds=server_seconds,
            info={
                "key_holder": holder,
                "chunks": len(aggregate),
                "slots_per_chunk": self.params.slots,
                "upload_bytes_per_client": upload_bytes,
                "aggregate_bytes": sum(len(m) for m in aggregate),
                "context_fingerprint": self.server.fingerprint.hex()[:16],
                "poly_modulus_degree": self.params.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.params.coeff_mod_bit_sizes),
                "scale_bits": self.params.scale_bits,
                **(
                    {
                        "noise_std_total": noise.share_std() * float(np.sqrt(len(survivors))),
                        "encoding_sensitivity": 0.0,
                    }
                    if noise is not None and noise.std > 0
                    else {}
                ),
            },
        )
