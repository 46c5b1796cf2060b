"""Differential privacy: accounting, the per-client ledger, secure noise, the Opacus engine."""

from __future__ import annotations

from securefed.noise.secure_noise import (
    NOISE_KEY_FILENAME,
    InsecureNoiseWarning,
    NoiseSource,
    SecureGaussian,
    TorchGaussian,
    derive_key,
    dp_round_key,
    load_or_create_run_key,
    make_noise_source,
)
from securefed.privacy.accountant import (
    ACCOUNTANTS,
    History,
    calibrate_noise_multiplier,
    compact_history,
    default_delta,
    epsilon_of,
)
from securefed.privacy.ledger import (
    LEDGER_FILENAME,
    ClientPlan,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
)
from securefed.privacy.opacus_engine import (
    DPModelError,
    OpacusStepResult,
    clip_factors,
    make_private_module,
    opacus_dp_step,
)

__all__ = [
    "ACCOUNTANTS",
    "LEDGER_FILENAME",
    "NOISE_KEY_FILENAME",
    "ClientPlan",
    "DPModelError",
    "History",
    "InsecureNoiseWarning",
    "LedgerEntry",
    "LedgerError",
    "NoiseSource",
    "OpacusStepResult",
    "PrivacyLedger",
    "SecureGaussian",
    "TorchGaussian",
    "calibrate_noise_multiplier",
    "clip_factors",
    "compact_history",
    "default_delta",
    "derive_key",
    "dp_round_key",
    "epsilon_of",
    "load_or_create_run_key",
    "make_noise_source",
    "make_private_module",
    "opacus_dp_step",
]
