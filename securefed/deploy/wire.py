"""What travels between the coordinator and a site, and how it is parsed (no pickle).

A deployment message is a flat mapping ``str -> int | float | str | bytes | list`` (what a
Flower ``ConfigRecord`` holds). Tensors travel as raw little-endian float32 bytes with their
length stated next to them; the receiver checks the length before it touches the bytes
(:func:`decode_vector`). Secure-aggregation messages are the masking protocol's own canonical,
signed byte encodings, carried unchanged under the key ``"secagg"``.

Message types (Flower ``message_type``), in the order a run uses them:

=====================  ================================================  ======================
type                   coordinator -> site                               site -> coordinator
=====================  ================================================  ======================
``query.setup``        experiment YAML, protocol version, run id         run id, client id,
                                                                         #examples, image
                                                                         shape, class count,
                                                                         roster digest, epsilon
``train.<stage>``      run id, round, stage, the masking server's        run id, round, status,
(one per masking       message for this site; at ``advertise_keys`` also the site's protocol
stage)                 the broadcast (global model), weight scale and    reply (and, after
                       the previous round's commit flag (and, with       training, its vector
                       ``canaries.enabled``, the site's signed audit     names and epsilon;
                       canaries, :mod:`securefed.deploy.canaries`)       its signed canary
                                                                         scores)
=====================  ================================================  ======================

Nothing a site computes from its data travels outside DP and the masking protocol: no loss, no
step count (``docs/deploy.md``, "Exactly what the coordinator sees").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "MESSAGE_CKKS_DECRYPT",
    "MESSAGE_CKKS_UPLOAD",
    "MESSAGE_PHASE0",
    "MESSAGE_SETUP",
    "PROTOCOL_VERSION",
    "WireError",
    "decode_vector",
    "encode_vector",
    "get_bytes",
    "get_float",
    "get_int",
    "get_str",
    "pack_chunks",
    "stage_message_type",
    "unpack_chunks",
]

#: 2: the next round's keys ride on the unmasking stage; FedDDPM phase 0; client-level DP
PROTOCOL_VERSION = "securefed-deploy-2"
MESSAGE_SETUP = "query.setup"
#: FedDDPM phase 0: local DP pre-training, then the site's upload (samples or its model)
MESSAGE_PHASE0 = "train.fedddpm_phase0"
#: CKKS (honest-but-curious coordinator, sites opted in): train + encrypted upload; decryption
#: of the round's aggregate by its key holder
MESSAGE_CKKS_UPLOAD = "train.ckks_upload"
MESSAGE_CKKS_DECRYPT = "train.ckks_decrypt"


def pack_chunks(chunks: list[bytes]) -> bytes:
    """Several byte strings as one: each as a 4-byte big-endian length, then its bytes."""
    return b"".join(len(c).to_bytes(4, "big") + c for c in chunks)


def unpack_chunks(data: bytes, who: str, field: str, limit: int = 4096) -> list[bytes]:
    """Inverse of :func:`pack_chunks` (at most ``limit`` chunks, every length checked)."""
    out: list[bytes] = []
    i = 0
    while i < len(data):
        if len(out) >= limit or i + 4 > len(data):
            raise WireError(f"{who}: {field}: malformed chunk list")
        n = int.from_bytes(data[i : i + 4], "big")
        if i + 4 + n > len(data):
            raise WireError(f"{who}: {field}: a chunk runs past the end")
        out.append(bytes(data[i + 4 : i + 4 + n]))
        i += 4 + n
    return out


def stage_message_type(stage: str) -> str:
    """Flower message type of a masking stage (``train.<stage>``)."""
    return f"train.{stage}"


class WireError(ValueError):
    """A received message is malformed; ``str(e)`` names the sender, the field and the problem."""


def encode_vector(t: torch.Tensor) -> bytes:
    """``[D]`` tensor -> raw little-endian float32 bytes."""
    arr = t.detach().to("cpu", torch.float32).reshape(-1).numpy()
    return arr.astype("<f4", copy=False).tobytes()


def decode_vector(data: bytes, numel: int, who: str, field: str) -> torch.Tensor:
    """Inverse of :func:`encode_vector`, with the length and finiteness checked first."""
    if not isinstance(data, bytes | bytearray):
        raise WireError(f"{who}: {field}: expected bytes, got {type(data).__name__}")
    if numel < 0 or len(data) != 4 * numel:
        raise WireError(
            f"{who}: {field}: {len(data)} bytes, expected {4 * numel} ({numel} float32 values)"
        )
    arr = np.frombuffer(bytes(data), dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise WireError(f"{who}: {field}: contains NaN or infinite values")
    return torch.from_numpy(arr.copy())


def _get(content: Mapping[str, Any], key: str, who: str) -> Any:
    if key not in content:
        raise WireError(f"{who}: missing field {key!r}")
    return content[key]


def get_int(content: Mapping[str, Any], key: str, who: str, minimum: int | None = None) -> int:
    v = _get(content, key, who)
    if isinstance(v, bool) or not isinstance(v, int):
        raise WireError(f"{who}: {key}: expected an integer, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise WireError(f"{who}: {key}: must be >= {minimum}, got {v}")
    return int(v)


def get_float(content: Mapping[str, Any], key: str, who: str) -> float:
    v = _get(content, key, who)
    if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
        raise WireError(f"{who}: {key}: expected a finite number, got {v!r}")
    return float(v)


def get_str(content: Mapping[str, Any], key: str, who: str) -> str:
    v = _get(content, key, who)
    if not isinstance(v, str):
        raise WireError(f"{who}: {key}: expected a string, got {type(v).__name__}")
    return v


def get_bytes(content: Mapping[str, Any], key: str, who: str) -> bytes:
    v = _get(content, key, who)
    if not isinstance(v, bytes | bytearray):
        raise WireError(f"{who}: {key}: expected bytes, got {type(v).__name__}")
    return bytes(v)
