"""Gaussian noise sources for DP-SGD: an AES-256-CTR CSPRNG (default) and a seeded torch fallback.

DP-SGD's guarantee (Abadi et al. 2016) assumes the Gaussian noise is unpredictable to the
adversary. ``torch.randn`` (Mersenne Twister / Philox) is not: its state can be recovered from
outputs or guessed from a seed. :class:`SecureGaussian` therefore draws from an AES-256 keystream
in counter mode (NIST SP 800-38A; the CTR_DRBG construction of SP 800-90A without reseeding)
keyed by 32 secret bytes, with AES-NI about 1.5x faster than ChaCha20 here:

1. keystream -> little-endian 64-bit words -> the low 53 bits -> uniform ``float64`` on
   ``[0, 1)`` with step ``2^-53`` (every float64 of that grid equally likely), converted in
   torch, once, on the target device;
2. Box-Muller in float64 (Box & Muller 1958): ``r = sqrt(-2 ln(1 - u1))``,
   ``(r cos 2 pi u2, r sin 2 pi u2)`` are two independent N(0, 1);
3. floating-point attack mitigation (Holohan & Braghin 2021, "Secure Random Sampling in
   Differential Privacy", arXiv:2107.10138, §5.1), as Opacus' ``secure_mode`` does in
   ``opacus.optimizers.optimizer._generate_noise``: each output is the sum of ``2n = 4``
   independent standard normals divided by ``sqrt(2n) = 2``. A single float Gaussian sample
   leaks which floats its generator can produce, and that can reveal the un-noised value
   (Mironov 2012, "On Significance of the Least Significant Bits for Differential Privacy";
   for Opacus: Jin et al. 2022, "Are We There Yet? Timing and Floating-Point Attacks on
   Differential Privacy Systems", arXiv:2112.05307); summing 2n draws raises the attack's
   cost to ``2^(53 (2n - 1))``. (Opacus also discards one draw to perturb torch's generator
   state; with a fresh keystream that is unnecessary.)

Steps 2-3 run in float64 vectorised kernels on the parameter's device on contiguous rows
(uniforms ``4i .. 4i+3`` feed element ``i``; on the CPU the radii's ``log``/``sqrt`` are NumPy's,
~2-3x faster than torch's float64 ones, the rest torch's, in work buffers reused across chunks),
so the noise for a whole model is a few vectorised passes; ``dp_sgd_step`` draws it in one call
for all parameters. Cost (651k parameters, one core,
issue 14): the keystream is written with ``update_into`` into a reused buffer (AES-NI speed,
~2.5 ms for the 21 MB; ``update(bytes(n))`` spent 3x that allocating and zeroing), the words
are transposed and converted by one copy into unit-stride rows (the strided rows of a transposed
view defeated vectorisation), and ``ln(1 - u)`` uses ``log`` on the exactly representable
``1 - u = (2^53 - k) 2^-53`` (torch's float64 ``log1p`` is not vectorised, 8x slower): ~10 ms
per model instead of ~30 ms, the same construction and precision (float64 throughout, four
normals per coordinate), values equal to the previous sampler's up to float64 rounding.

Every key keys one stream (nonce 0) that is consumed in order, so the same key gives the same
noise, call by call. For replayable resume the key is derived per client-round from a secret run
key with :func:`dp_round_key` (HKDF-SHA256, Krawczyk 2010, RFC 5869); the run key is 32 bytes from
``os.urandom`` stored with mode ``0600`` in the run directory (:func:`load_or_create_run_key`).
Whoever holds the run key can regenerate, hence subtract, every client's noise: it must never
leave the machine of the party that adds the noise (in a deployment, each client keeps its own).

DP-SGD's Poisson sampling must be just as unpredictable: amplification by subsampling assumes the
adversary does not know which steps used a record (Opacus' ``secure_mode`` draws its sampler from
a CSPRNG for this reason). :meth:`SecureGaussian.sampling_source` is the SAME key's AES-CTR
stream with nonce ``SAMPLING_STREAM`` (the noise is nonce ``NOISE_STREAM``): an independent
keystream, so the coins are keyed per (run secret, round, client, phase, purpose) exactly as
the noise is, and a replay with the same key redraws the same batches.

:class:`TorchGaussian` (``dp.secure_noise: false``) is a seeded ``torch.Generator`` with the same
API, for fast experiments only; it warns loudly, once per process, that it is not secure.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import struct
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefed.artefacts.rundir import NOISE_KEY_FILE
from securefed.io import atomic_write_bytes
from securefed.seeds import Purpose, derive_seed

__all__ = [
    "KEY_BYTES",
    "NOISE_KEY_FILENAME",
    "NOISE_STREAM",
    "SAMPLING_STREAM",
    "InsecureNoiseWarning",
    "NoiseSource",
    "SecureGaussian",
    "TorchGaussian",
    "TorchUniform",
    "UniformSource",
    "derive_key",
    "dp_round_key",
    "load_or_create_run_key",
    "make_noise_source",
]

log = logging.getLogger(__name__)

KEY_BYTES = 32
NOISE_KEY_FILENAME = NOISE_KEY_FILE
_KDF_INFO = b"securefed/privacy/noise/v1"
#: normals summed per output (Holohan & Braghin 2021 with n = 2, as in Opacus)
_DRAWS = 4
#: outputs generated per chunk (float64 work memory ~1 MiB: stays in cache, measured fastest)
_CHUNK = 1 << 15
#: per (key, stream): 2^36 AES blocks (1 TiB); the PRP/PRF switching bound stays below 2^-57
_MAX_STREAM_BYTES = 1 << 40
_MASK53 = (1 << 53) - 1
_AES_BLOCK = 16
_LITTLE_ENDIAN = sys.byteorder == "little"
#: counter-mode streams (the IV's high 64 bits) of one client-round key: noise, Poisson coins
NOISE_STREAM, SAMPLING_STREAM = 0, 1


class InsecureNoiseWarning(UserWarning):
    """DP noise drawn from a non-cryptographic generator."""


class NoiseSource(Protocol):
    """Draws ``std * N(0, I)`` noise of a given shape."""

    def normal(
        self,
        shape: Sequence[int] | torch.Size,
        std: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor: ...


class UniformSource(Protocol):
    """Draws ``[n]`` float64 uniforms on ``[0, 1)`` (DP-SGD's Poisson inclusion coins)."""

    def uniform(self, n: int) -> torch.Tensor: ...


def _check_std(std: float) -> float:
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std >= 0):
        raise ValueError(f"std: must be a finite number >= 0, got {std!r}")
    return float(std)


def _numel(shape: Sequence[int] | torch.Size) -> tuple[tuple[int, ...], int]:
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape: dimensions must be >= 0, got {dims}")
    return dims, math.prod(dims)


def _radii_cpu(u: np.ndarray) -> np.ndarray:
    """Box-Muller radii ``sqrt(-2 ln(1 - u))`` of float64 uniforms ``u``, in place.

    ``1 - u = (2^53 - k) 2^-53`` is exact, in ``(0, 1]``, so ``log`` of it is as accurate as
    ``log1p(-u)`` (torch's float64 ``log1p`` is not vectorised) and every radius is finite.
    NumPy's float64 ``log`` and ``sqrt`` are the SIMD ones (AVX2/AVX-512 dispatch), a few ulp
    from the correctly rounded values like torch's, and ~2-3x faster than torch's here.
    """
    np.subtract(1.0, u, out=u)
    np.log(u, out=u)
    u *= -2.0
    return np.sqrt(u, out=u)


class SecureGaussian:
    """Gaussian noise from an AES-256-CTR keystream (see the module docstring).

    Args:
        key: 32 secret bytes; ``None`` draws a fresh key from ``os.urandom`` (not replayable).
            Pass ``dp_round_key(run_key, ...)`` for noise that resume can regenerate.
        stream: selects one of ``2^64`` independent streams of the same key (the high 64 bits
            of the counter block; the low 64 bits count blocks).
    """

    def __init__(self, key: bytes | None = None, *, stream: int = 0) -> None:
        if key is None:
            key = os.urandom(KEY_BYTES)
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(
                f"key: must be {KEY_BYTES} bytes, got {type(key).__name__} "
                f"of length {len(key) if isinstance(key, bytes) else '?'}"
            )
        if not 0 <= stream < 1 << 64:
            raise ValueError(f"stream: must lie in [0, 2^64), got {stream}")
        iv = stream.to_bytes(8, "big") + bytes(8)  # stream || 64-bit block counter from 0
        self._key, self._stream = key, stream
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
        self._used = 0
        self._zeros = b""  # plaintext zeros for update_into, grown on demand
        self._buf = bytearray()  # keystream output buffer, reused across calls

    def sampling_source(self) -> SecureGaussian:
        """The Poisson-sampling coins of this key: its independent ``SAMPLING_STREAM`` stream.

        Raises:
            ValueError: this source is not a noise stream (``stream != NOISE_STREAM``).
        """
        if self._stream != NOISE_STREAM:
            raise ValueError(
                f"sampling_source: only the noise stream ({NOISE_STREAM}) has a sampling stream; "
                f"this source is stream {self._stream}"
            )
        return SecureGaussian(self._key, stream=SAMPLING_STREAM)

    def _keystream_words(self, n: int) -> torch.Tensor:
        """The next ``8 n`` keystream bytes as ``[n]`` little-endian int64 words.

        The keystream is AES-CTR applied to zeros, written with ``update_into`` into a buffer
        this source reuses (allocating and zeroing ``8 n`` fresh bytes per call, as
        ``update(bytes(8 n))`` does, cost 3x the AES-NI encryption itself). The returned tensor
        is a view of that buffer: valid until the next call; copy it to keep it.
        """
        nbytes = 8 * n
        if self._used + nbytes > _MAX_STREAM_BYTES:
            raise RuntimeError("SecureGaussian: keystream exhausted (1 TiB); use a new key")
        self._used += nbytes
        if len(self._zeros) < nbytes:
            self._zeros = bytes(nbytes)
            self._buf = bytearray(nbytes + _AES_BLOCK - 1)  # update_into needs block - 1 spare
        written = self._cipher.update_into(memoryview(self._zeros)[:nbytes], self._buf)
        if written != nbytes:  # CTR is a stream mode: every input byte gives one output byte
            raise RuntimeError(f"SecureGaussian: AES-CTR wrote {written} of {nbytes} bytes")
        if _LITTLE_ENDIAN:
            return torch.frombuffer(self._buf, dtype=torch.int64, count=n)
        return torch.from_numpy(np.frombuffer(self._buf, dtype="<i8", count=n).astype(np.int64))

    def _words(self, n: int) -> torch.Tensor:
        """``[n]`` int64 words, each holding 53 uniform random bits (the low 53 of 64)."""
        return self._keystream_words(n).bitwise_and(_MASK53)

    def uniform(self, n: int) -> torch.Tensor:
        """``[n]`` float64 uniform on ``[0, 1)``: 53 random bits each (``k * 2^-53``)."""
        return self._words(n).to(torch.float64).mul_(2.0**-53)

    def standard_normal(self, n: int) -> torch.Tensor:
        """``[n]`` float64 N(0, 1) by Box-Muller (``n`` rounded up to even internally)."""
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs).view(pairs, 2).t().contiguous()  # [2, pairs]
        r = u[0].neg_().log1p_().mul_(-2.0).sqrt_()  # log(1 - u1), 1 - u1 in (0, 1]: finite
        theta = u[1].mul_(2.0 * math.pi)
        return torch.stack((r * torch.cos(theta), r * theta.sin_()), dim=1).view(-1)[:n]

    def _sum4(self, m: int, device: torch.device | str | None) -> torch.Tensor:
        """``[m]`` float64 ``z1 + z2 + z3 + z4`` (two Box-Muller pairs) from uniforms
        ``4i .. 4i+3`` for element ``i``, computed on ``device``.

        The ``[m, 4]`` words are masked in place in the keystream buffer, then transposed AND
        converted to float64 by one copy into ``[4, m]`` whose rows are contiguous, so that the
        transcendental kernels below run on unit-stride rows (vectorised; on the strided rows
        of a transposed view they ran ~2.5x slower). On the CPU the radii are computed by
        :func:`_radii_cpu` (NumPy's float64 ``log``/``sqrt``, ~3x and ~2x faster than torch's on
        this build); the angles' ``cos``/``sin`` stay in torch (NumPy's are ~3x slower).
        """
        if device is None or torch.device(device).type == "cpu":
            return self._sum4_cpu(m)
        words = self._keystream_words(4 * m).bitwise_and_(_MASK53).view(m, 4).t()  # [4, m]
        words = words.contiguous().to(device, non_blocking=True)
        u = torch.empty((2, 2, m), dtype=torch.float64, device=words.device)
        u.view(4, m).copy_(words).mul_(2.0**-53)  # exact: k * 2^-53 with k < 2^53
        # pairs (4i, 4i+1) and (4i+2, 4i+3): radius uniforms u[:, 0], angle uniforms u[:, 1]
        v = u[:, 0].mul_(-1.0).add_(1.0)  # 1 - u = (2^53 - k) 2^-53: exact, in (0, 1]
        # log, not log1p: the argument is exact, so log(1 - u) is as accurate as log1p(-u)
        r = v.log_().mul_(-2.0).sqrt_()  # [2, m] Box-Muller radii, finite
        theta = u[:, 1].mul_(2.0 * math.pi)
        z = torch.cos(theta).add_(theta.sin_()).mul_(r)  # [2, m]: r cos + r sin per pair
        return z[0].add_(z[1])

    def _sum4_cpu(
        self, m: int, work: tuple[np.ndarray, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """:meth:`_sum4` on the CPU: the same construction, radii via NumPy (see there).

        ``work``: float64 buffers of at least ``4 m`` (NumPy) and ``2 m`` (torch) elements that
        :meth:`_fill` reuses across chunks (cache-warm; fresh ~1 MiB arrays per chunk were ~10%
        slower); the result then lives in ``work[1]``, valid until the next call with them.
        """
        words = self._keystream_words(4 * m).numpy()  # a view of the keystream buffer
        np.bitwise_and(words, _MASK53, out=words)
        if work is None:
            work = (np.empty(4 * m, dtype=np.float64), torch.empty(2 * m, dtype=torch.float64))
        u = work[0][: 4 * m].reshape(2, 2, m)
        # transpose + convert in one copy: rows 4i, 4i+1, 4i+2, 4i+3 -> u[0,0], u[0,1], ...
        np.copyto(u.reshape(4, m), words.reshape(m, 4).T, casting="unsafe")
        u *= 2.0**-53  # exact: k * 2^-53 with k < 2^53
        r = _radii_cpu(u[:, 0])  # [2, m], in place
        theta = torch.from_numpy(u[:, 1]).mul_(2.0 * math.pi)  # [2, m] angles
        z = torch.cos(theta, out=work[1][: 2 * m].view(2, m))
        z.add_(theta.sin_()).mul_(torch.from_numpy(r))  # [2, m]: r cos + r sin per pair
        return z[0].add_(z[1])

    def normal(
        self,
        shape: Sequence[int] | torch.Size,
        std: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``std * N(0, I)`` of ``shape``, computed in float64 on ``device``, then cast.

        Each element is ``std * (z_1 + z_2 + z_3 + z_4) / 2`` for independent standard normals
        (Holohan & Braghin 2021, §5.1); element ``i`` uses uniforms ``4i .. 4i+3`` of the stream,
        so the result does not depend on chunking or on how a draw is split into calls.
        ``std == 0`` returns zeros and consumes nothing.
        """
        std = _check_std(std)
        dims, n = _numel(shape)
        if std == 0.0 or n == 0:
            return torch.zeros(dims, device=device, dtype=dtype)
        out = torch.empty(n, device=device, dtype=dtype)
        self._fill(out, std)
        return out.view(dims)

    def normal_many(
        self,
        shapes: Sequence[Sequence[int] | torch.Size],
        std: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """``[normal(s, std, device, dtype) for s in shapes]`` in ONE pass over the stream.

        Equal, element for element, to the per-shape calls (the stream is consumed in order and
        element ``i`` depends only on its own uniforms); one call per model instead of one per
        parameter saves the per-call overhead of the small tensors.
        """
        std = _check_std(std)
        dims = [_numel(s) for s in shapes]
        total = sum(n for _, n in dims)
        flat = torch.empty(total, device=device, dtype=dtype)
        if std == 0.0:
            flat.zero_()
        elif total:
            self._fill(flat, std)
        return [t.view(d) for t, (d, _) in zip(flat.split([n for _, n in dims]), dims, strict=True)]

    def _fill(self, out: torch.Tensor, std: float) -> None:
        """Fill the 1-d ``out`` with ``std * (z1 + z2 + z3 + z4) / 2``, chunk by chunk."""
        n, device = out.shape[0], out.device
        scale = std / math.sqrt(_DRAWS)
        work = None
        if device.type == "cpu":  # float64 work buffers reused by every chunk
            c = min(_CHUNK, n)
            work = (np.empty(4 * c, dtype=np.float64), torch.empty(2 * c, dtype=torch.float64))
        for start in range(0, n, _CHUNK):  # cache-sized chunks: ~2x faster than one pass
            m = min(_CHUNK, n - start)
            z = self._sum4(m, device) if work is None else self._sum4_cpu(m, work)
            out[start : start + m].copy_(z.mul_(scale))


_warned_insecure = False


class TorchGaussian:
    """Seeded ``torch.Generator`` noise: reproducible and fast, NOT cryptographically secure.

    Drawn on the CPU (the same numbers on every device), then moved. For debugging and quick
    experiments (``dp.secure_noise: false``) only; warns once per process.

    Args:
        seed: ``None`` draws a seed from ``os.urandom``.
    """

    def __init__(self, seed: int | None = None) -> None:
        global _warned_insecure
        if not _warned_insecure:
            _warned_insecure = True
            msg = (
                "dp.secure_noise is false: DP-SGD noise and Poisson sampling come from torch's "
                "non-cryptographic generator seeded from the public config seed, so they can be "
                "predicted or recovered; the (epsilon, delta) "
                "guarantee does NOT hold against such an adversary. Use secure_noise: true for "
                "any result that claims privacy."
            )
            log.warning(msg)
            warnings.warn(msg, InsecureNoiseWarning, stacklevel=2)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        self._seed = int(seed)
        self._gen = torch.Generator().manual_seed(self._seed)

    def sampling_source(self) -> TorchUniform:
        """Poisson-sampling coins from the same (insecure, predictable) seed."""

        return TorchUniform(derive_seed(self._seed, Purpose.DP_SAMPLING))

    def normal(
        self,
        shape: Sequence[int] | torch.Size,
        std: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``std * N(0, I)`` of ``shape`` on ``device``; ``std == 0`` consumes nothing."""
        std = _check_std(std)
        dims, n = _numel(shape)
        if std == 0.0 or n == 0:
            return torch.zeros(dims, device=device, dtype=dtype)
        z = torch.randn(dims, generator=self._gen, dtype=torch.float64)
        return (z * std).to(device=device, dtype=dtype)


class TorchUniform:
    """Seeded ``torch.Generator`` uniforms (the insecure sampler of :class:`TorchGaussian`)."""

    def __init__(self, seed: int) -> None:
        self._gen = torch.Generator().manual_seed(int(seed))

    def uniform(self, n: int) -> torch.Tensor:
        """``[n]`` float64 uniform on ``[0, 1)``."""
        return torch.rand(n, generator=self._gen, dtype=torch.float64)


def dp_round_key(run_key: bytes, round: int, client: int, phase: int = 0) -> bytes:
    """The secret key of one client's DP randomness in one round and phase.

    ``HKDF-SHA256(run_key, info = label || round || client || phase)``, fixed arity (phase 0:
    DP-SGD; phase >= 1: other mechanisms of the same client-round, e.g. a histogram release).
    ``SecureGaussian(dp_round_key(...))`` draws the noise; its :meth:`~SecureGaussian.
    sampling_source` the Poisson coins. The same inputs give the same key (exact replay on
    resume); a fresh, non-replayable source is ``SecureGaussian()`` (``os.urandom`` key).
    Shared by the simulation and the deployed site (each site holds its own ``run_key``).
    """
    return derive_key(run_key, round, client, phase)


def derive_key(run_key: bytes, *parts: int) -> bytes:
    """Per-purpose noise key: ``HKDF-SHA256(run_key, info = label || parts as u64)`` (RFC 5869).

    E.g. ``derive_key(run_key, client_id, round, phase_id)``: distinct parts give independent
    keys; the same parts give the same key, so a replayed client-round redraws identical noise.
    """
    if not isinstance(run_key, bytes) or len(run_key) < KEY_BYTES:
        raise ValueError(f"run_key: must be at least {KEY_BYTES} secret bytes")
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < 1 << 64:
            raise ValueError(f"derive_key: parts must be integers in [0, 2^64), got {p!r}")
    info = _KDF_INFO + struct.pack(f">{len(parts)}Q", *parts)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(run_key)


def load_or_create_run_key(path: str | Path) -> bytes:
    """Read the run's secret noise key, creating 32 ``os.urandom`` bytes (mode 0600) if absent.

    Raises:
        ValueError: the file is not 32 bytes, or is readable by group/others (``chmod 600`` it:
            whoever reads it can remove the DP noise).
    """
    p = Path(path)
    if not p.exists():
        atomic_write_bytes(p, os.urandom(KEY_BYTES), mode=0o600)
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise ValueError(
            f"{p}: the DP noise key is accessible to other users (mode {mode:o}); run "
            f"`chmod 600 {p}`: anyone who reads it can regenerate and remove the noise"
        )
    key = p.read_bytes()
    if len(key) != KEY_BYTES:
        raise ValueError(f"{p}: a DP noise key has {KEY_BYTES} bytes, this file has {len(key)}")
    return key


def make_noise_source(
    secure: bool, seed: int | None = None, *, key: bytes | None = None
) -> SecureGaussian | TorchGaussian:
    """The noise source of ``dp.secure_noise``.

    Args:
        secure: ``True`` -> :class:`SecureGaussian` keyed by ``key`` (``None``: a fresh random
            key); ``False`` -> :class:`TorchGaussian` seeded by ``seed``.
        seed: only for the insecure source. A secure source is never keyed by an integer seed.
        key: only for the secure source, e.g. ``derive_key(run_key, client_id, round)``.

    Raises:
        ValueError: ``seed`` given with ``secure=True`` or ``key`` given with ``secure=False``.
    """
    if secure:
        if seed is not None:
            raise ValueError(
                "make_noise_source: a secure noise source is keyed by 32 secret bytes, not an "
                "integer seed; pass key=derive_key(run_key, ...) for replayable noise"
            )
        return SecureGaussian(key)
    if key is not None:
        raise ValueError("make_noise_source: key is for secure=True; the torch source takes seed")
    return TorchGaussian(seed)
