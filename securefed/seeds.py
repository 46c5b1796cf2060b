"""One typed seed API: every reproducible (non-secret) random stream of a run.

A stream is named by the fixed-arity tuple ``(seed, purpose, round, client, phase)``;
:func:`derive_seed` hashes it with SHA-256 (FIPS 180-4) behind a domain label, each field encoded
as one big-endian unsigned 64-bit word, so distinct tuples give distinct, independent 63-bit
seeds (a collision needs a SHA-256 collision on the first 63 bits: ~2^-63 per pair). Fields
that a purpose does not use are 0. There are no ad-hoc offsets (a seed plus a constant): a
sub-stream of a derived seed is ``derive_seed(derived, Purpose.X)``.

These seeds are PUBLIC (``cfg.seed`` is written in ``config.yaml`` and sent to every site): they
may drive model initialisation, client selection, evaluation noise, diffusion (t, eps) draws and
the like, but never anything whose secrecy a privacy claim assumes. DP noise and DP-SGD's Poisson
sampling come from a CSPRNG keyed by a secret (``securefed.noise.secure_noise``).
"""

from __future__ import annotations

import hashlib
import operator
import struct
from enum import IntEnum, unique

__all__ = ["Purpose", "derive_seed"]

_LABEL = b"securefed/seeds/v2\x00"
_MAX = 1 << 64


@unique
class Purpose(IntEnum):
    """What a stream is for: the ONE list of seed purposes of the code base."""

    MODEL_INIT = 0  #: initial model weights
    SELECT = 1  #: client selection and simulated dropouts of a round
    TRAIN = 2  #: a client-round's local training (plain trainer: batch order)
    EVAL_LOSS = 3  #: fixed noise of the holdout loss
    SAMPLES = 4  #: fixed noise of the sample grids
    FID = 5  #: FID sampling of a round
    NOISE = 6  #: DP noise when ``dp.secure_noise: false`` (insecure, warned)
    LOSS_DRAWS = 7  #: (timestep, noise) draws of the diffusion loss inside a trainer
    MODULE_RNG = 8  #: torch's global generator inside a trainer (dropout)
    DP_SAMPLING = 9  #: Poisson sampling when ``dp.secure_noise: false`` (insecure, warned)
    PRETRAIN = 11  #: FedDDPM phase 0 local pre-training
    AUX_SAMPLE = 12  #: FedDDPM phase 0 auxiliary sampling
    CALIBRATE = 13  #: FedDDPM server calibration batches
    AUX_EVAL = 14  #: FedDDPM auxiliary holdout-loss noise
    AUX_SPLIT = 15  #: FedDDPM auxiliary train/holdout split
    USPLIT = 16  #: FedDiffuse USPLIT pairing
    AUDIT_NOISE = 17  #: audit shadow/harness training noise (insecure by design, local only)
    PUBLIC_PRETRAIN = 18  #: public pre-training (seeded by ``pretrain.seed``, not the run seed):
    #: phase 0 model init, 1 batch indices, 2 the device's (timestep, noise) draws


def derive_seed(
    seed: int, purpose: Purpose, round: int = 0, client: int = 0, phase: int = 0
) -> int:
    """The 63-bit seed of stream ``(seed, purpose, round, client, phase)``.

    Args:
        seed: the run seed (``cfg.seed``) or a seed derived from it, in ``[0, 2^64)``.
        purpose: a :class:`Purpose` (plain ints are refused: every purpose is listed there).
        round: round number (0 when the purpose is not per round, e.g. phase 0).
        client: client id (0 when the purpose is not per client).
        phase: sub-phase id (0 unless a purpose has several mechanisms per client-round).

    Raises:
        TypeError: ``purpose`` is not a :class:`Purpose`.
        ValueError: a field is not an integer in ``[0, 2^64)``.
    """
    if not isinstance(purpose, Purpose):
        raise TypeError(
            f"derive_seed: purpose must be a securefed.seeds.Purpose, got {purpose!r}; add the "
            "stream to the Purpose enum instead of using a bare integer"
        )
    fields = {"seed": seed, "round": round, "client": client, "phase": phase}
    vals = []
    for name, v in fields.items():
        try:
            iv = -1 if isinstance(v, bool) else operator.index(v)
        except TypeError:
            iv = -1
        if not 0 <= iv < _MAX:
            raise ValueError(f"derive_seed: {name} must be an integer in [0, 2^64), got {v!r}")
        vals.append(iv)
    words = struct.pack(">5Q", vals[0], int(purpose), *vals[1:])
    digest = hashlib.sha256(_LABEL + words).digest()
    return int.from_bytes(digest[:8], "big") >> 1
