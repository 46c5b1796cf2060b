"""What the coordinator and every site derive identically from the experiment config."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from securefed.builders import client_level_dp
from securefed.config import ExperimentConfig
from securefed.errors import SecurefedError
from securefed.privacy.client_level import ClientLevelDP
from securefed.secagg.keys import ROSTER_FILE
from securefed.secagg.masking.plan import MaskingParams
from securefed.secagg.masking.protocol import MaskingAggregation
from securefed.strategies import build_strategy

__all__ = [
    "DeployConfigError",
    "check_deployable",
    "client_level_layer",
    "cohort_session",
    "find_layer",
    "masking_params",
    "new_run_id",
    "roster_digest",
    "round_masking_params",
    "run_masking_params",
]

#: a strategy layer type (find_layer)
_L = TypeVar("_L")


class DeployConfigError(SecurefedError, ValueError):
    """The experiment cannot run on the deployment path; names the field, value and fix."""


def check_deployable(cfg: ExperimentConfig) -> None:
    """Refuse configurations the deployment path does not implement (yet).

    Raises:
        DeployConfigError: naming the field, its value and what to use instead.
    """
    sa = cfg.secure_aggregation
    if sa.protocol == "plain":
        raise DeployConfigError(
            "secure_aggregation.protocol: 'plain' is not supported on the deployment path, "
            "which never sends an unmasked update off a site; use 'masking'"
        )
    if sa.protocol == "ckks":
        if sa.server_threat != "honest_but_curious":
            raise DeployConfigError(
                "secure_aggregation.protocol: 'ckks' defends against an honest-but-curious "
                "coordinator only (with the shared secret key, a coordinator colluding with any "
                "site decrypts every update); set secure_aggregation.server_threat: "
                "honest_but_curious (every site must opt in), or use 'masking'"
            )
    if cfg.federation.dropout_prob != 0:
        raise DeployConfigError(
            f"federation.dropout_prob: {cfg.federation.dropout_prob} simulates dropouts; a "
            "deployment has real ones: set it to 0"
        )
    if cfg.fedddpm.enabled and cfg.dp.level == "client":
        raise DeployConfigError(
            "fedddpm.enabled: FedDDPM with dp.level: client is not deployed (its phase-0 "
            "upload is an individual release that client-level DP does not cover); use "
            "dp.level: record"
        )
    if cfg.feddiffuse.enabled and cfg.dp.level == "client":
        raise DeployConfigError(
            "feddiffuse.enabled: FedDiffuse with dp.level: client is not deployed yet; use "
            "dp.level: record with FedDiffuse, or client-level DP without it"
        )
    if cfg.feddiffuse.enabled and cfg.feddiffuse.variant == "usplit" and sa.protocol == "ckks":
        raise DeployConfigError(
            "feddiffuse.variant: 'usplit' runs two aggregation sessions a round (front and "
            "back), which the deployment runs on masking only; set secure_aggregation.protocol: "
            "masking, or use 'full', 'udec' or 'ulatdec' with ckks"
        )
    if cfg.federation.num_clients < 2:
        raise DeployConfigError(
            f"federation.num_clients: {cfg.federation.num_clients}; secure aggregation needs at "
            "least 2 sites"
        )


def masking_params(cfg: ExperimentConfig) -> MaskingParams:
    """The public masking parameters, resolved and validated exactly as the simulation does
    (:meth:`MaskingAggregation.from_config`). Identities come from the deployment's key folders,
    so ``secure_aggregation.keys_dir`` is ignored here."""
    sa = cfg.secure_aggregation.model_copy(update={"keys_dir": None})
    return MaskingAggregation.from_config(sa, cfg.federation.num_clients).params


def new_run_id() -> str:
    """A fresh run id: 16 bytes from the OS CSPRNG, as 32 lowercase hex digits."""
    return secrets.token_hex(16)


def run_masking_params(cfg: ExperimentConfig, run_id: str) -> MaskingParams:
    """:func:`masking_params` bound to the run ``run_id`` (every signature, key derivation and
    AEAD header of the run's masking protocol covers it)."""
    try:
        session = bytes.fromhex(run_id)
    except ValueError:
        raise ValueError(f"run_id: {run_id!r} is not hex") from None
    return dataclasses.replace(masking_params(cfg), session=session)


def cohort_session(run_id: str, cohort: str, round_clients: Sequence[int]) -> bytes:
    """The masking session of one upload cohort of a multi-cohort round (FedDiffuse
    ``usplit``: ``front`` / ``back``): the run id, then the cohort's name and the round's
    selected clients (the list ``pair_clients`` splits). Bound into every signature, HKDF info
    and AEAD header of that session exactly as the run id is
    (:func:`~securefed.noise.prg.session_prefix`), so a ``front`` message does not verify in the
    ``back`` session, and a RoundStart that verifies proves the coordinator signed that round
    client list (from which each site recomputes the pairing itself).

    Args:
        run_id: the run id (32 hex digits). cohort: the cohort's name (``front``, ``back``).
        round_clients: the round's selected clients (any order; sorted here).
    """
    try:
        run = bytes.fromhex(run_id)
    except ValueError:
        raise ValueError(f"run_id: {run_id!r} is not hex") from None
    if not re.fullmatch(r"[a-z]+", cohort):
        raise ValueError(f"cohort: {cohort!r} is not a cohort name (lowercase letters)")
    clients = ",".join(str(int(c)) for c in sorted(round_clients))
    return run + b"/cohort/" + cohort.encode() + b"/clients/" + clients.encode()


def roster_digest(keys_dir: Path) -> str:
    """SHA-256 of ``roster.json``: every party must hold the same roster."""
    path = Path(keys_dir) / ROSTER_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"keys-dir: no {ROSTER_FILE} in {keys_dir}; copy the roster written by "
            "`securefed keys init` there"
        )
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_layer(strategy: Any, kind: type[_L]) -> _L | None:
    """The outermost layer of type ``kind`` in a strategy stack (each wrapper keeps the
    strategy it wraps in ``base``), or None."""
    layer = strategy
    while layer is not None and not isinstance(layer, kind):
        layer = getattr(layer, "base", None)
    return layer


def client_level_layer(strategy: Any) -> Any:
    """The DP-FedAvg layer (:class:`~securefed.privacy.client_level.ClientLevelDP`) of a
    strategy stack (``dp.level: client``)."""
    layer = find_layer(strategy, ClientLevelDP)
    if layer is None:  # pragma: no cover - build_strategy_stack wraps it
        raise TypeError("dp.level client: the strategy stack has no ClientLevelDP layer")
    return layer


def round_masking_params(
    cfg: ExperimentConfig, run_id: str, participants: int, vector_length: int,
    clip: float | None = None,
) -> MaskingParams:
    """The masking parameters of one round: :func:`run_masking_params`, plus, with client-level
    DP, the std of the distributed discrete Gaussian noise the round's sum carries (which sets
    each participant's share and widens the grid): the fixed-clipping noise plan of
    :meth:`~securefed.privacy.client_level.ClientLevelDP.round_noise` for ``participants`` and
    the packed length ``vector_length``; with adaptive clipping, at the round's clip norm
    ``clip`` (the coordinator's estimate, broadcast with the round; the noise scales with it, so
    the multiplier each participation is charged does not depend on it)."""
    params = run_masking_params(cfg, run_id)
    if cfg.dp.level != "client":
        return params

    plan = client_level_dp(cfg, build_strategy(cfg.strategy, cfg.federation.num_clients))
    if clip is not None:
        plan.clip = float(clip)
    noise = plan.round_noise(participants, vector_length)
    return dataclasses.replace(params, noise_std=float(noise.std))
