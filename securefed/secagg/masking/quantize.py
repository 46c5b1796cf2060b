"""Fixed-point encoding of clipped float vectors into the ring Z_{2^bits}, and back.

Pairwise masking (Bonawitz et al. 2017, §3) works over a finite group, so every client maps its
float vector to integers first. Here each coordinate is clipped to ``[-c, c]`` and mapped to the
grid ``{0, 1, ..., L}`` with ``L = floor((2^bits - 1) / n)`` levels, ``n`` being the number of
clients that may be summed. The sum of ``n`` grid values is then at most ``n * L < 2^bits``: the
masked sum, computed mod ``2^bits``, never wraps around, so the unmasked sum is exact in the grid.

Rounding onto the grid is stochastic (``floor(y + u)``, ``u ~ U[0, 1)``), which is unbiased:
``E[q] = y``. The uniforms come from the AES-256-CTR keystream of :mod:`~securefed.noise.prg`,
keyed by 32 bytes
the caller draws from the operating system's CSPRNG (:func:`os.urandom`), never from numpy's
generators: the rounding noise is part of what the server sees through the sum, and a CSPRNG
keeps it unpredictable.

All functions are pure. Words are ``<u4`` when ``bits <= 32`` and ``<u8`` otherwise; arithmetic is
done in the word width (which wraps mod 2^32 or 2^64, a multiple of 2^bits) and reduced at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from securefed.noise.prg import uniform01

__all__ = [
    "MIN_LEVELS",
    "QuantizationParams",
    "decode_words",
    "dequantize_sum",
    "encode_words",
    "quantization_error_bound",
    "quantization_params",
    "quantize",
    "reduce_words",
    "word_dtype",
    "word_width",
]

#: at least this many grid levels per client (4 bits of resolution) or the config is rejected
MIN_LEVELS = 16

_EPS = 2.0**-52


def word_dtype(bits: int) -> np.dtype:
    """The little-endian unsigned dtype that holds a ring element mod ``2^bits``."""
    return np.dtype("<u4") if bits <= 32 else np.dtype("<u8")


def word_width(bits: int) -> int:
    """Bytes per ring element on the wire: ``ceil(bits / 8)``."""
    return (bits + 7) // 8


@dataclass(frozen=True)
class QuantizationParams:
    """The fixed-point grid shared by every party of a round.

    Attributes:
        bits: ring ``Z_{2^bits}``.
        clip_range: inputs are clipped to ``[-clip_range, clip_range]``.
        max_summands: how many client vectors may be added without wrapping (the round's clients).
    """

    bits: int
    clip_range: float
    max_summands: int

    @property
    def levels(self) -> int:
        """``L``: a client's grid value lies in ``{0, ..., L}``; ``max_summands * L < 2^bits``."""
        return ((1 << self.bits) - 1) // self.max_summands

    @property
    def step(self) -> float:
        """Width of one grid step in input units: ``2 c / L``."""
        return 2.0 * self.clip_range / self.levels

    @property
    def modulus_mask(self) -> int:
        return (1 << self.bits) - 1


def quantization_params(bits: int, clip_range: float, max_summands: int) -> QuantizationParams:
    """Validate ``bits`` against the number of clients and the clip range.

    Raises:
        ValueError: naming ``secure_aggregation.bits`` (or ``clip_range``) and the fix.
    """
    if not 8 <= bits <= 62:
        raise ValueError(f"secure_aggregation.bits: must be in [8, 62], got {bits}")
    if not (math.isfinite(clip_range) and clip_range > 0):
        raise ValueError(
            f"secure_aggregation.clip_range: must be a finite positive number, got {clip_range}"
        )
    if max_summands < 1:
        raise ValueError(f"secure_aggregation: need at least one client, got {max_summands}")
    params = QuantizationParams(bits, float(clip_range), int(max_summands))
    if params.levels < MIN_LEVELS:
        need = math.ceil(math.log2(MIN_LEVELS * max_summands + 1))
        raise ValueError(
            f"secure_aggregation.bits: {bits} bits leave {params.levels} grid levels per client "
            f"for {max_summands} clients (the sum must not wrap mod 2^bits); "
            f"use bits >= {need}"
        )
    return params


def quantize(x: np.ndarray, params: QuantizationParams, rounding_key: bytes) -> np.ndarray:
    """Clip ``x`` and round it stochastically onto the grid.

    Args:
        x: ``[D]`` finite float vector.
        params: the round's grid.
        rounding_key: 32 bytes from a CSPRNG; keys the keystream of rounding uniforms.

    Returns:
        ``[D]`` words (:func:`word_dtype`) in ``{0, ..., L}``.

    Raises:
        ValueError: ``x`` is not 1-D or holds NaN/inf.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"input must be a 1-D vector, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("input contains NaN or infinite values")
    c = params.clip_range
    y = (np.clip(x, -c, c) + c) * (params.levels / (2.0 * c))
    y += uniform01(rounding_key, x.shape[0])
    np.floor(y, out=y)
    np.maximum(y, 0.0, out=y)
    dtype = word_dtype(params.bits)
    words = y.astype(dtype)
    # clamp in integers: float(L) may round above L when L > 2^53
    np.minimum(words, dtype.type(params.levels), out=words)
    return words


def dequantize_sum(total: np.ndarray, params: QuantizationParams, count: int) -> np.ndarray:
    """Map the unmasked grid sum of ``count`` clients back to the float64 sum of their inputs.

    Args:
        total: ``[D]`` words, the sum mod ``2^bits`` (which equals the integer sum: no wrap).
        count: the number of clients in the sum.

    Returns:
        ``[D]`` float64.
    """
    if count > params.max_summands:
        raise ValueError(
            f"cannot dequantize a sum of {count} clients on a grid for {params.max_summands}"
        )
    return total.astype(np.float64) * params.step - count * params.clip_range


def quantization_error_bound(params: QuantizationParams, count: int) -> float:
    """Per-coordinate bound on ``|dequantize(sum of quantize(x_i)) - sum of clip(x_i)|``.

    Stochastic rounding moves each client by less than one grid step; the float64 arithmetic of
    scaling and of converting the integer sum adds at most a few ulps of ``L`` per term.
    """
    return count * params.step * (1.0 + 8.0 * _EPS * params.levels) + 8.0 * _EPS * (
        count * params.clip_range
    )


def reduce_words(words: np.ndarray, bits: int) -> np.ndarray:
    """In place: reduce words computed mod 2^32 / 2^64 to ``[0, 2^bits)``; returns ``words``."""
    if bits < 8 * words.dtype.itemsize:
        np.bitwise_and(words, words.dtype.type((1 << bits) - 1), out=words)
    return words


def encode_words(words: np.ndarray, bits: int) -> bytes:
    """Canonical wire form: ``ceil(bits/8)`` little-endian bytes per element, no header."""
    words = np.ascontiguousarray(words, dtype=word_dtype(bits))
    width = word_width(bits)
    if width == words.dtype.itemsize:
        return words.tobytes()
    return words.view(np.uint8).reshape(-1, words.dtype.itemsize)[:, :width].tobytes()


def decode_words(data: bytes, length: int, bits: int) -> np.ndarray:
    """Inverse of :func:`encode_words`.

    Raises:
        ValueError: wrong byte count (message names "length") or an element >= 2^bits ("range").
    """
    width = word_width(bits)
    dtype = word_dtype(bits)
    if len(data) != width * length:
        got = len(data) / width
        raise ValueError(
            f"length: vector has {got:g} elements ({len(data)} bytes), expected {length}"
        )
    if width == dtype.itemsize:
        words = np.frombuffer(data, dtype=dtype).copy()
    else:
        raw = np.zeros((length, dtype.itemsize), dtype=np.uint8)
        raw[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(length, width)
        words = raw.view(dtype).reshape(length)
    if bits < 8 * width and length and int(words.max()) >> bits:
        raise ValueError(f"range: an element is outside [0, 2^{bits})")
    return words
