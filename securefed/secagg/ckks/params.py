"""CKKS encryption parameters: :class:`CKKSParams`, their validation against SEAL's 128-bit
security limits, the error bound of a released sum and the release rounding grid
(Li & Micciancio 2021). Pure arithmetic: this module does not use TenSEAL."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from securefed.secagg.ckks.errors import CKKSContextError

__all__ = [
    "CKKSParams",
    "ckks_error_bound",
    "release_quantum",
    "release_round",
    "validate_ckks_params",
]

#: SEAL's largest total coefficient-modulus size (bits) at 128-bit classical security.
_MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: bits between the scale and the data modulus below which we refuse the parameters
_MIN_HEADROOM_BITS = 20
#: multiple of the per-slot noise std used by :func:`ckks_error_bound` (see its docstring)
_ERROR_SIGMAS = 30.0


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
