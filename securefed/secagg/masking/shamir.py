"""Shamir t-out-of-m secret sharing over the prime field GF(2^521 - 1).

Shamir 1979 ("How to share a secret"); used by Bonawitz et al. 2017 (§4) to share each client's
self-mask seed ``b_u`` and its mask secret key ``s_u^SK`` among its neighbours, so that any ``t``
surviving neighbours can reconstruct exactly the secrets the server is entitled to.

The field is the Mersenne prime ``2^521 - 1`` (large enough for any 32-byte secret, cheap
reduction). Polynomial coefficients come from :mod:`secrets`. A share is ``(x, f(x))`` with
``x = client id + 1`` (never 0, where the secret lives). Any ``t`` shares determine the secret;
any ``t - 1`` shares are consistent with every possible secret, so they reveal nothing.

Robust reconstruction (:func:`reconstruct_verified`): a malicious share holder may return a wrong
share. The secrets of the masking protocol come with a public check (the commitment to ``b_u``,
the advertised public key of ``s_u``), so the secret is the one of any ``t`` shares that passes
the check: first the ``t`` lowest points (one interpolation when everyone is honest), then
decoding with errors (Berlekamp-Welch, McEliece and Sarwate 1981: up to ``floor((m - t) / 2)``
wrong shares of ``m``), then ``t``-subsets against the check. The holders whose shares disagree
with the verified polynomial are returned, so the caller blames them, not the secret's owner.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Mapping, Sequence
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
    "reconstruct_verified",
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


def _interpolate_at(points: Sequence[tuple[int, int]], x: int) -> int:
    """Value at ``x`` of the polynomial of degree < len(points) through ``points``."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def _solve(a: list[list[int]], b: list[int]) -> list[int] | None:
    """One solution of ``a z = b`` over GF(p) (free variables 0), or None if inconsistent."""
    rows, cols = len(a), len(a[0]) if a else 0
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    pivots: list[int] = []
    r = 0
    for c in range(cols):
        piv = next((i for i in range(r, rows) if m[i][c] % PRIME), None)
        if piv is None:
            continue
        m[r], m[piv] = m[piv], m[r]
        inv = pow(m[r][c], -1, PRIME)
        m[r] = [v * inv % PRIME for v in m[r]]
        for i in range(rows):
            if i != r and m[i][c]:
                f = m[i][c]
                m[i] = [(vi - f * vr) % PRIME for vi, vr in zip(m[i], m[r], strict=True)]
        pivots.append(c)
        r += 1
        if r == rows:
            break
    if any(m[i][cols] % PRIME for i in range(r, rows)):
        return None
    z = [0] * cols
    for i, c in enumerate(pivots):
        z[c] = m[i][cols]
    return z


def _berlekamp_welch(points: Sequence[tuple[int, int]], k: int, e: int) -> list[int] | None:
    """Coefficients of the polynomial of degree < ``k`` that agrees with all but at most ``e`` of
    ``points`` (needs ``len(points) >= k + 2e``), or None."""
    # unknowns: Q (degree < k + e), E monic of degree e: Q(x_i) = y_i E(x_i) for every point
    a, b = [], []
    for x, y in points:
        xp = [pow(x, j, PRIME) for j in range(k + 2 * e + 1)]
        a.append(xp[: k + e] + [(-y * xp[j]) % PRIME for j in range(e)])
        b.append(y * xp[e] % PRIME)
    z = _solve(a, b)
    if z is None:
        return None
    q, err = z[: k + e], [*z[k + e :], 1]
    # f = Q / E; the remainder must vanish
    quot = [0] * max(1, len(q) - e)
    rem = q[:]
    inv_lead = 1  # E is monic
    for i in range(len(q) - 1, e - 1, -1):
        coef = rem[i] * inv_lead % PRIME
        quot[i - e] = coef
        for j in range(e + 1):
            rem[i - e + j] = (rem[i - e + j] - coef * err[j]) % PRIME
    if any(rem[:e]) or any(quot[k:]):
        return None
    return quot[:k]


def reconstruct_verified(
    shares: Mapping[int, int],
    threshold: int,
    verify: Callable[[int], bool],
    *,
    max_subsets: int = 20_000,
) -> tuple[int, tuple[int, ...]]:
    """The secret that passes ``verify``, from shares of which some may be wrong.

    Args:
        shares: ``{point: share}``.
        threshold: ``t``, the degree of the sharing polynomial plus one.
        verify: the public check of a candidate secret (a commitment, a public key).
        max_subsets: at most this many ``t``-subsets are tried after decoding with errors.

    Returns:
        ``(secret, bad_points)``: the points whose shares are not on the polynomial of the
        verified secret (empty when the ``t`` lowest points already verify: the other shares
        are not examined).

    Raises:
        ValueError: fewer than ``t`` shares, or no ``t`` of them give a secret that verifies.
    """
    if threshold < 1 or len(shares) < threshold:
        raise ValueError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    pts = sorted(shares.items())
    first = reconstruct(shares, threshold)
    if verify(first):
        return first, ()

    def bad_for(good: Sequence[tuple[int, int]]) -> tuple[int, ...]:
        return tuple(x for x, y in pts if _interpolate_at(good, x) != y)

    e = (len(pts) - threshold) // 2
    if e >= 1:
        coeffs = _berlekamp_welch(pts, threshold, e)
        if coeffs is not None and verify(coeffs[0]):
            bad = tuple(
                x for x, y in pts
                if sum(c * pow(x, j, PRIME) for j, c in enumerate(coeffs)) % PRIME != y
            )
            return coeffs[0], bad
    for n_tried, subset in enumerate(itertools.combinations(pts, threshold)):
        if n_tried >= max_subsets:
            break
        xs = tuple(x for x, _ in subset)
        value = sum(
            c * y for c, (_, y) in zip(lagrange_at_zero(xs), subset, strict=True)
        ) % PRIME
        if verify(value):
            return value, bad_for(subset)
    raise ValueError(
        f"no {threshold} of the {len(pts)} shares (points {[x for x, _ in pts]}) give a secret "
        "that matches its commitment: too many wrong shares"
    )


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
