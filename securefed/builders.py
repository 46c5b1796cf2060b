"""The experiment builders: one place that turns a config into data, a model, privacy state
and a strategy stack, for every entry point (``run`` simulation, ``deploy`` sites and
coordinator, ``audit``, ``cli``, experiments and benchmarks), as improved-diffusion's
``script_util`` does. Nothing here trains or writes a run directory.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from securefed.artefacts.rundir import RunDir
from securefed.client.dp import sample_rate_for
from securefed.client.trainer import local_steps_for
from securefed.config import ExperimentConfig
from securefed.data import (
    ImageDataset,
    label_histogram,
    load_dataset,
    partition,
    split_member_holdout,
)
from securefed.diffusion import NoiseSchedule, UNet
from securefed.diffusion.params import param_slices
from securefed.federation.auxiliary import calibrate_with_extra, pretrain_steps_for
from securefed.federation.simulation import (
    PrivacyContext,
    SimClient,
)
from securefed.privacy import (
    PrivacyLedger,
    SecureGaussian,
    TorchGaussian,
    calibrate_noise_multiplier,
    default_delta,
    dp_round_key,
    load_or_create_run_key,
)
from securefed.privacy.client_level import ClientLevelDP
from securefed.seeds import Purpose, derive_seed
from securefed.strategies import Strategy, build_strategy
from securefed.strategies.fedddpm import FedDDPM, ServerCalibrator, split_holdout
from securefed.strategies.fedddpm_plus import FedDDPMPlus
from securefed.strategies.feddiffuse import FedDiffuse, group_indices

__all__ = [
    "PreparedData",
    "build_client_level_privacy",
    "build_model",
    "build_privacy",
    "build_strategy_stack",
    "cache_dir",
    "client_level_dp",
    "client_level_multiplier",
    "client_level_schedule",
    "fedddpm_wrapper",
    "prepare_data",
    "resolve_device",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    """Members (split among clients), holdout (never reaches a client) and the partition."""

    members: ImageDataset
    holdout: ImageDataset
    parts: list[np.ndarray]
    histogram: np.ndarray  # [K, C]


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device: 'cuda' was requested but torch sees no CUDA device; use --device cpu or auto"
        )
    return torch.device(name)


def cache_dir() -> Path:
    """Where cached artefacts (domain feature networks) live: ``$SECUREFED_CACHE`` or
    ``~/.cache/securefed``."""
    return Path(os.environ.get("SECUREFED_CACHE", Path.home() / ".cache" / "securefed"))


def prepare_data(cfg: ExperimentConfig) -> PreparedData:
    """Load, split into members/holdout (fixed ``data.split_seed``) and partition members."""
    ds = load_dataset(cfg.data)
    members, holdout = split_member_holdout(ds, cfg.data.holdout_fraction, cfg.data.split_seed)
    labels = members.labels.numpy()
    sites = members.sites.numpy() if members.sites is not None else None
    parts = partition(labels, cfg.partition, cfg.federation.num_clients, cfg.seed, sites=sites)
    hist = label_histogram(labels, parts, members.num_classes)
    return PreparedData(members, holdout, parts, hist)


def build_model(cfg: ExperimentConfig, image_shape: tuple[int, int, int], num_classes: int) -> UNet:
    """The UNet, initialised from ``cfg.seed`` without touching the global RNG stream."""
    c, h, w = image_shape
    if h != w:
        raise ValueError(f"data: images must be square, got {h}x{w}; set data.image_size")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, Purpose.MODEL_INIT))
        return UNet(cfg.model, c, h, num_classes if cfg.model.class_conditional else None)


def build_privacy(
    cfg: ExperimentConfig,
    run_dir: Path,
    clients: list[SimClient],
    resume: bool,
) -> PrivacyContext:
    """Ledger + per-client noise multipliers (calibrated ONCE for the whole planned schedule)
    + per-client-round noise sources, for ``dp.level: record``."""
    dp = cfg.dp
    fd = cfg.fedddpm
    path = RunDir(run_dir).ledger
    ledger = PrivacyLedger.load(path) if resume and path.exists() else PrivacyLedger(path)
    sigmas: dict[int, float] = {}
    # FedDDPM phase 0 is part of the SAME budget: the plan covers pretrain + rounds x local
    # steps, and (class-conditional, histogram counts) one Gaussian histogram release
    hist_release = fd.enabled and cfg.model.class_conditional and fd.class_counts == "histogram"
    extra = [(fd.histogram_noise_multiplier, 1.0, 1)] if hist_release else []
    for c in clients:
        n = len(c.data)
        q = sample_rate_for(cfg.client, n)
        planned = cfg.federation.rounds * local_steps_for(cfg.client, n)
        if fd.enabled:
            planned += pretrain_steps_for(cfg, n)
        delta = dp.delta if dp.delta is not None else default_delta(n)
        if dp.delta is not None and dp.delta >= 1.0 / n:
            raise ValueError(
                f"dp.delta: {dp.delta} is not below 1/n = {1.0 / n:.3g} for client {c.cid} "
                f"({n} examples); choose a smaller delta or leave it unset (min(1e-5, 1/(10 n)))"
            )
        if c.cid in ledger.clients:
            sigmas[c.cid] = float(ledger.get_plan(c.cid).noise_multiplier)
            continue
        if dp.noise_multiplier is not None:
            sigma = dp.noise_multiplier
        else:
            if dp.target_epsilon is None:  # pragma: no cover - excluded by DPConfig validation
                raise ValueError("dp.target_epsilon: required when noise_multiplier is unset")
            if extra:
                sigma = calibrate_with_extra(
                    dp.target_epsilon, delta, q, planned, extra, dp.accountant
                )
            else:
                sigma = calibrate_noise_multiplier(
                    dp.target_epsilon, delta, q, planned, dp.accountant
                )
        ledger.plan(
            c.cid,
            noise_multiplier=sigma,
            sample_rate=q,
            planned_steps=planned,
            target_epsilon=dp.target_epsilon,
            delta=delta,
            accountant=dp.accountant,
        )
        sigmas[c.cid] = sigma
    ledger.save()

    if dp.secure_noise:
        # 0600, 32 bytes; anyone holding it can regenerate the noise: never release it
        # the same key on resume: a replay either reproduces the released update's digest or
        # is discarded and retrained with a fresh key (client.dp.train_private_charged)
        run_key = load_or_create_run_key(RunDir(run_dir).noise_key)

        def source(rnd: int, cid: int) -> Any:
            return SecureGaussian(key=dp_round_key(run_key, rnd, cid))

        def phase_source(rnd: int, cid: int, phase: int) -> Any:
            return SecureGaussian(key=dp_round_key(run_key, rnd, cid, phase))
    else:  # TorchGaussian warns loudly, once per process

        def source(rnd: int, cid: int) -> Any:
            return TorchGaussian(seed=derive_seed(cfg.seed, Purpose.NOISE, rnd, cid))

        def phase_source(rnd: int, cid: int, phase: int) -> Any:
            return TorchGaussian(seed=derive_seed(cfg.seed, Purpose.NOISE, rnd, cid, phase))

    return PrivacyContext(
        ledger=ledger, noise_multipliers=sigmas, noise_source=source,
        phase_noise_source=phase_source,
    )


def client_level_schedule(cfg: ExperimentConfig) -> tuple[int, float]:
    """``dp.level: client``: the participations each client is planned for,
    ``ceil(rounds * k / N)`` with ``k`` clients a round out of ``N``, and the delta
    (``dp.delta``, else ``min(1e-5, 1 / (10 N))``)."""
    dp, fed = cfg.dp, cfg.federation
    n = fed.num_clients
    per_round = min(n, max(fed.min_fit_clients, round(fed.fraction_fit * n)))
    planned = max(1, math.ceil(fed.rounds * per_round / n))
    delta = dp.delta if dp.delta is not None else min(1e-5, 1.0 / (10 * n))
    return planned, delta


def client_level_multiplier(cfg: ExperimentConfig) -> float:
    """``dp.level: client``: the effective noise multiplier ``z`` each participation is charged
    at, calibrated once from ``target_epsilon`` for :func:`client_level_schedule` (or
    ``dp.noise_multiplier``). A deployed site and its coordinator compute it each from the
    experiment, as the simulation does."""
    dp = cfg.dp
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    if dp.target_epsilon is None:  # pragma: no cover - excluded by DPConfig validation
        raise ValueError("dp.target_epsilon: required when noise_multiplier is unset")
    planned, delta = client_level_schedule(cfg)
    return _calibrated(float(dp.target_epsilon), delta, planned, dp.accountant)


@functools.lru_cache(maxsize=64)
def _calibrated(target_epsilon: float, delta: float, steps: int, accountant: str) -> float:
    """The accountant's bisection, once per plan (a deployed site and coordinator recompute the
    round's noise plan at every stage)."""
    return float(calibrate_noise_multiplier(target_epsilon, delta, 1.0, steps, accountant))


def build_client_level_privacy(
    cfg: ExperimentConfig,
    run_dir: Path,
    clients: list[SimClient],
    strategy: Strategy,
    resume: bool,
) -> tuple[Strategy, PrivacyContext]:
    """``dp.level: client``: wrap the strategy in DP-FedAvg and plan every client's ledger.

    Each client is charged one Gaussian-mechanism step (sample rate 1: the server knows whom it
    selected, so sampling gives no amplification against it) per round it trains in. ``z`` is
    calibrated once from ``target_epsilon`` for the expected number of participations
    ``ceil(rounds * k / N)``; a client selected more often than expected stops when its budget is
    spent (``budget_exhausted``).
    """
    dp = cfg.dp
    planned, delta = client_level_schedule(cfg)
    path = RunDir(run_dir).ledger
    ledger = PrivacyLedger.load(path) if resume and path.exists() else PrivacyLedger(path)
    if clients and clients[0].cid in ledger.clients and dp.noise_multiplier is None:
        z = float(ledger.get_plan(clients[0].cid).noise_multiplier)
    else:
        z = client_level_multiplier(cfg)
    for c in clients:
        ledger.plan(
            c.cid,
            noise_multiplier=z,
            sample_rate=1.0,
            planned_steps=planned,
            target_epsilon=dp.target_epsilon,
            delta=delta,
            accountant=dp.accountant,
        )
    ledger.save()
    wrapped = ClientLevelDP(strategy, dp, cfg.secure_aggregation, z)

    def no_source(rnd: int, cid: int) -> Any:  # noise is drawn by the protocol, not the client
        raise RuntimeError("client-level DP draws its noise inside the aggregation protocol")

    return wrapped, PrivacyContext(
        ledger=ledger, noise_multipliers=dict.fromkeys((c.cid for c in clients), z),
        noise_source=no_source, level="client",
    )


def build_strategy_stack(cfg: ExperimentConfig, model: UNet, weight_scale: float) -> Strategy:
    """The strategy a deployed coordinator and site build, as :func:`run_experiment` does:
    ``cfg.strategy`` (FedAvg / FedProx / SCAFFOLD with the server optimizer), in DP-FedAvg when
    ``dp.level: client`` (:func:`client_level_dp`), in FedDiffuse when ``feddiffuse.enabled``."""
    strategy = build_strategy(cfg.strategy, cfg.federation.num_clients, weight_scale=weight_scale)
    if cfg.dp.level == "client":
        strategy = client_level_dp(cfg, strategy)
    return feddiffuse_wrapper(cfg, model, strategy) if cfg.feddiffuse.enabled else strategy


def client_level_dp(cfg: ExperimentConfig, base: Strategy) -> ClientLevelDP:
    """``dp.level: client``: DP-FedAvg around ``base`` with the multiplier calibrated from the
    experiment itself (:func:`client_level_multiplier`). A deployed coordinator and every site
    build their own; a site charges, and noises, by its own."""
    return ClientLevelDP(base, cfg.dp, cfg.secure_aggregation, client_level_multiplier(cfg))


def feddiffuse_wrapper(cfg: ExperimentConfig, model: UNet, base: Strategy) -> Strategy:
    """``feddiffuse.enabled``: partial-UNet exchange around the base strategy."""
    groups = group_indices(param_slices(model), model.parameter_groups())
    return FedDiffuse(
        base, cfg.feddiffuse, groups, cfg.seed, derive=derive_seed, purpose=Purpose.USPLIT
    )


def fedddpm_wrapper(
    cfg: ExperimentConfig,
    base: Strategy,
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    device: torch.device,
    aux: Any,
    client_sizes: list[int],
) -> Strategy:
    """FedDDPM / FedDDPM+ around ``base``: the server calibrator on the auxiliary set ``aux``
    (split into calibration and detector-holdout images by the ``(seed, AUX_SPLIT)`` stream),
    with the calibration budget referenced to the planned client compute per round (from the
    public client sizes). The simulation and the deployed coordinator build it alike."""
    fd = cfg.fedddpm
    train_idx, hold_idx = split_holdout(
        len(aux), fd.aux_holdout_fraction, derive_seed(cfg.seed, Purpose.AUX_SPLIT)
    )
    calibrator = ServerCalibrator(
        model, schedule, aux.images, aux.labels, train_idx, hold_idx, fd, device,
        cfg.seed, cfg.model.class_conditional, derive=derive_seed,
        purpose_calibrate=Purpose.CALIBRATE, purpose_eval=Purpose.AUX_EVAL,
    )
    # planned client compute per round (examples): the calibration budget's reference
    n = cfg.federation.num_clients
    per_round = min(n, max(cfg.federation.min_fit_clients, round(cfg.federation.fraction_fit * n)))
    mean_steps = sum(local_steps_for(cfg.client, size) for size in client_sizes) / n
    client_examples = round(per_round * mean_steps * cfg.client.batch_size)
    if fd.variant == "fedddpm_plus":
        return FedDDPMPlus(base, fd, calibrator, client_examples_per_round=client_examples)
    return FedDDPM(base, fd, calibrator, client_examples_per_round=client_examples)
