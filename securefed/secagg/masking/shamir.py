"""Shamir t-out-of-m secret sharing over the prime field GF(2^521 - 1).

Shamir 1979 ("How to share a secret"); used by Bonawitz et al. 2017 (§4) to share each client's
self-mask seed ``b_u`` and its mask secret key ``s_u^SK`` among its neighbours, so that any ``t``
surviving neighbours can reconstruct exactly the secrets the server is entitled to.

The field is the Mersenne prime ``2^521 - 1`` (large enough for any 32-byte secret, cheap
reduction). Polynomial coefficients come from :mod:`secrets`. A share is ``(x, f(x))`` with
``x = client id + 1`` (never 0, where the secret lives). Any ``t`` shares determine the secret;
any ``t - 1`` shares are consistent with every possible secret, so they reveal nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "bytes_to_secret",
    "decode_share",
    "encode_share",
    "lagrange_at_zero",
    "reconstruct",
    "secret_to_bytes",
    "split",
]

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32


def split(secret: int, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` for the points ``xs`` with a random degree-(t-1) ``f``.

    Raises:
        ValueError: ``threshold`` outside ``[1, len(xs)]``, a point 0 or repeated, or a secret
            outside the field.
    """
    if not 0 <= secret < PRIME:
        raise ValueError("secret must lie in [0, 2^521 - 1)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}] (number of shares)")
    if len(set(x % PRIME for x in xs)) != len(xs) or any(x % PRIME == 0 for x in xs):
        raise ValueError("share points must be distinct and non-zero mod p")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, int] = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares[x] = acc
    return shares


@lru_cache(maxsize=256)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients ``l_i`` with ``f(0) = sum_i l_i f(x_i)`` for any polynomial of degree < len."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """The secret from at least ``threshold`` shares (the ``threshold`` lowest points are used).

    Raises:
        ValueError: fewer than ``threshold`` shares.
    """
    if threshold < 1 or len(shares) < threshold:
        raise ValueError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    xs = tuple(sorted(shares)[:threshold])
    coeffs = lagrange_at_zero(xs)
    return sum(c * shares[x] for c, x in zip(coeffs, xs, strict=True)) % PRIME


def secret_to_bytes(value: int) -> bytes:
    """A reconstructed secret back to its 32 bytes.

    Raises:
        ValueError: the value does not fit (the shares were inconsistent).
    """
    if not 0 <= value < 1 << (8 * SECRET_BYTES):
        raise ValueError("reconstructed value is not a 32-byte secret (inconsistent shares)")
    return value.to_bytes(SECRET_BYTES, "big")


def bytes_to_secret(data: bytes) -> int:
    if len(data) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data, "big")


def encode_share(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """Raises ValueError on a wrong size or a value outside the field."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("share value outside the field")
    return y
