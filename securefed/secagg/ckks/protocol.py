"""The in-process CKKS driver: :class:`CKKSAggregation` (an
:class:`~securefed.secagg.base.AggregationProtocol`) runs one round as client encrypt -> server
verify + sum -> key holder decrypt, passing only bytes between the roles; plus the recorded
server view (:class:`CKKSTranscript`). The survivor threshold is the one every protocol uses,
:func:`~securefed.secagg.base.resolve_threshold`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import tenseal as ts
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefed.noise.secure_noise import SecureGaussian
from securefed.secagg.base import (
    AggregationAbortedError,
    AggregationProtocol,
    AggregationResult,
    DistributedNoise,
    resolve_threshold,
)
from securefed.secagg.ckks.client import CKKSClient
from securefed.secagg.ckks.errors import CKKSContextError, CKKSKeyFileError, CKKSMessageError
from securefed.secagg.ckks.keys import (
    PUBLIC_CONTEXT_FILE,
    SECRET_CONTEXT_FILE,
    context_fingerprint,
    context_params,
    load_ckks_context,
    make_ckks_context,
    public_context_bytes,
    secret_context_bytes,
)
from securefed.secagg.ckks.params import CKKSParams, ckks_error_bound, validate_ckks_params
from securefed.secagg.ckks.server import CKKSServer
from securefed.secagg.plain import validate_inputs

if TYPE_CHECKING:
    from securefed.config import SecureAggregationConfig

__all__ = [
    "CKKSAggregation",
    "CKKSTranscript",
]


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
        if threshold is not None:
            resolve_threshold(threshold, num_clients)  # a count above the federation: refused
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
            try:
                need = resolve_threshold(self.threshold, len(set(inputs) | set(dropouts)))
            except ValueError as exc:  # a count above this round's clients: fail closed
                raise AggregationAbortedError(str(exc)) from None
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
