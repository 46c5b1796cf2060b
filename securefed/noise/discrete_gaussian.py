"""Discrete Gaussian noise from a cryptographically secure keystream.

The discrete Gaussian ``N_Z(0, sigma^2)`` puts mass proportional to ``exp(-x^2 / (2 sigma^2))`` on
every integer ``x``. It is the noise of the distributed discrete Gaussian mechanism (Kairouz, Liu
and Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
Secure Aggregation", ICML): every client adds ``N_Z(0, sigma^2)`` to its integer-quantised update
BEFORE pairwise masking, so the unmasked sum of ``n`` clients carries noise that is within
``tau`` (their Theorem 4) of ``N_Z(0, n sigma^2)``, and the server never sees an un-noised sum.

Sampling follows Canonne, Kamath and Steinke 2020 ("The Discrete Gaussian for Differential
Privacy", NeurIPS, Algorithm 3), vectorised: propose from the discrete Laplace with scale
``t = floor(sigma) + 1`` and accept ``y`` with probability
``exp(-(|y| - sigma^2 / t)^2 / (2 sigma^2))``. The discrete Laplace is the difference of two
i.i.d. geometric variables, drawn by inversion. All uniforms come from the AES-256-CTR keystream
of :func:`securefed.noise.prg.uniform01` under a key from :func:`os.urandom` (never
from numpy's generators). The acceptance test and the inversion are computed in float64, as in
most deployed implementations (the exact rational-arithmetic sampler of the paper is far too
slow for ``10^6`` coordinates in Python); the float error is below ``2^-40`` in probability per
coordinate and is stated in docs/guide.md.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np

from securefed.noise.prg import uniform01

__all__ = ["ddg_tau", "discrete_gaussian"]


def _uniforms(key: bytes, counter: int, n: int) -> np.ndarray:
    """``[n]`` uniforms in ``(0, 1)`` from a per-call sub-key (53 bits: two 32-bit words)."""
    sub = hashlib.sha256(key + counter.to_bytes(8, "little")).digest()
    u = uniform01(sub, 2 * n)
    out = u[0::2] + u[1::2] * 2.0**-32
    # keep strictly inside (0, 1): log(0) is undefined
    return np.clip(out, 2.0**-64, 1.0 - 2.0**-53)


def discrete_gaussian(sigma: float, size: int, key: bytes | None = None) -> np.ndarray:
    """``[size]`` i.i.d. samples of ``N_Z(0, sigma^2)`` as int64.

    Args:
        sigma: the standard-deviation parameter, ``> 0`` and ``< 2^50`` (int64 head-room).
        size: number of samples, ``>= 0``.
        key: 32 secret bytes keying the keystream; ``None`` draws them from :func:`os.urandom`.

    Raises:
        ValueError: ``sigma`` or ``size`` out of range, or a key of the wrong length.
    """
    if not (math.isfinite(sigma) and 0 < sigma < 2.0**50):
        raise ValueError(f"discrete_gaussian: sigma must be in (0, 2^50), got {sigma}")
    if size < 0:
        raise ValueError(f"discrete_gaussian: size must be >= 0, got {size}")
    if key is None:
        key = os.urandom(32)
    if len(key) != 32:
        raise ValueError(f"discrete_gaussian: key must be 32 bytes, got {len(key)}")
    t = math.floor(sigma) + 1
    log_p = -1.0 / t  # geometric success parameter 1 - exp(-1/t)
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    counter = 0
    while todo.size:
        m = todo.size
        u = _uniforms(key, counter, 3 * m)
        counter += 1
        g1 = np.floor(np.log(u[:m]) / log_p)
        g2 = np.floor(np.log(u[m : 2 * m]) / log_p)
        y = g1 - g2  # discrete Laplace, P(y) proportional to exp(-|y| / t)
        accept_log = -((np.abs(y) - sigma**2 / t) ** 2) / (2.0 * sigma**2)
        ok = np.log(u[2 * m :]) < accept_log
        out[todo[ok]] = y[ok].astype(np.int64)
        todo = todo[~ok]
    return out


def ddg_tau(sigma: float, n: int) -> float:
    """Kairouz et al. 2021, Theorem 4: the sum of ``n`` i.i.d. ``N_Z(0, sigma^2)`` is within
    ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))`` of ``N_Z(0, n sigma^2)`` in the
    sense that it enjoys the continuous mechanism's guarantee with ``delta`` increased by
    ``tau`` (per coordinate bound used conservatively in the accounting)."""
    if n < 1 or sigma <= 0:
        raise ValueError(f"ddg_tau: need sigma > 0 and n >= 1, got sigma={sigma}, n={n}")
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n))
