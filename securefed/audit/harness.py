"""Small, self-contained training runs for auditing the auditor (tests, ``experiments/``).

:func:`train_model` trains one model on one dataset with the project's own trainers
(:class:`~securefed.client.trainer.LocalTrainer` or DP-SGD with
:class:`~securefed.client.dp.DPLocalTrainer`), optionally with canaries inserted;
:func:`write_run_dir` writes a run directory that ``securefed audit`` opens like any other
(config.yaml, model.json, label_histogram.json, checkpoint, privacy_ledger.json, canaries/).

A run is "centralised": one client holds every member (``federation.num_clients: 1``,
``rounds: 1``), so ``prepare_data(cfg)`` reproduces the members exactly. A LYING run trains
with a different noise multiplier than the one its ledger records: the audit must catch it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import securefed.run as run_mod
from securefed.artefacts.checkpoint import Checkpoint, save_checkpoint
from securefed.artefacts.rundir import RunDir
from securefed.audit.canaries import CanarySet, insert_canaries, save_canaries
from securefed.builders import build_model
from securefed.client.dp import DPLocalTrainer, sample_rate_for
from securefed.client.trainer import LocalTrainer
from securefed.config import ExperimentConfig, dump_config
from securefed.data import ImageDataset
from securefed.diffusion import NoiseSchedule
from securefed.diffusion.params import get_flat, num_params
from securefed.io import atomic_write_json, atomic_write_text
from securefed.privacy import PrivacyLedger, SecureGaussian, TorchGaussian, default_delta
from securefed.privacy.canaries import GradientCanaries
from securefed.secagg.base import DistributedNoise
from securefed.seeds import Purpose, derive_seed
from securefed.strategies.base import LocalObjective

__all__ = [
    "TrainedModel",
    "UnderNoisedProtocol",
    "train_model",
    "under_noised_runs",
    "write_run_dir",
]


@dataclass(frozen=True)
class TrainedModel:
    """Parameters ``[D]`` of a trained model, what it saw and how it was trained."""

    params: torch.Tensor
    data: ImageDataset
    steps: int
    noise_multiplier: float | None
    sample_rate: float
    gradient_canaries: Any | None = None
    gradient_scores: Any | None = None


def train_model(
    cfg: ExperimentConfig,
    members: ImageDataset,
    *,
    steps: int,
    seed: int,
    noise_multiplier: float | None = None,
    canaries: CanarySet | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    gradient_canaries: int = 0,
    noise_source: Any | None = None,
    canary_key: bytes | None = None,
) -> TrainedModel:
    """Train the run's UNet (``cfg.model``, initialised from ``cfg.seed``) on ``members``
    (+ the included canaries) for ``steps`` steps.

    Args:
        noise_multiplier: None trains without DP (``LocalTrainer``); a float runs DP-SGD
            (``DPLocalTrainer``, Poisson rate ``batch_size / n``, clip ``cfg.dp.max_grad_norm``)
            at that multiplier; 0 is allowed (clipping without noise: a LYING run).
        gradient_canaries: ``m > 0`` inserts ``m`` white-box Dirac gradient canaries into the
            DP-SGD steps (:mod:`securefed.privacy.canaries`, fresh secret key); their scores
            come back in :attr:`TrainedModel.gradient_scores`.
        canary_key: 32 secret bytes for the gradient canaries (default: fresh ``os.urandom``;
            tests pass a fixed one to be reproducible).
        noise_source: overrides the DP noise source (default: ChaCha20 when
            ``cfg.dp.secure_noise``, else seeded torch noise).
    """
    dev = device or torch.device("cpu")
    data = members if canaries is None else insert_canaries([members], canaries)[0]
    model = build_model(cfg, data.image_shape, data.num_classes).to(dev)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    ccfg = cfg.client.model_copy(update={"local_steps": steps, "local_epochs": None})
    start = get_flat(model)
    bar = tqdm(total=steps, desc="training", disable=not progress, unit="step")
    cond = cfg.model.class_conditional
    gc = hook = None
    if gradient_canaries:
        if noise_multiplier is None:
            raise ValueError("train_model: gradient canaries live in the DP-SGD step; pass a "
                             "noise_multiplier (0 for a run without noise)")

        gc = GradientCanaries.draw(model, gradient_canaries, 1, key=canary_key)
        hook = gc.for_client(1, 0, model, sample_rate_for(ccfg, len(data)), cfg.dp.max_grad_norm)
    try:
        if noise_multiplier is None:
            res = LocalTrainer(model, schedule, ccfg, dev, cond).train(
                data, start, LocalObjective(), seed=seed, progress=bar
            )
        else:
            trainer = DPLocalTrainer(model, schedule, ccfg, cfg.dp, dev, cond)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = trainer.train_private(
                    data,
                    start,
                    LocalObjective(),
                    seed,
                    noise_multiplier=float(noise_multiplier),
                    # the project's secure (AES-CTR) noise when the config asks for it (fresh key);
                    # seeded torch noise otherwise (reproducible tests)
                    noise_source=noise_source
                    if noise_source is not None
                    else SecureGaussian()
                    if cfg.dp.secure_noise
                    else TorchGaussian(seed=derive_seed(seed, Purpose.AUDIT_NOISE)),
                    progress=bar,
                    canaries=hook,
                )
    finally:
        bar.close()
    return TrainedModel(
        params=res.params,
        data=data,
        steps=steps,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate_for(ccfg, len(data)),
        gradient_canaries=gc,
        gradient_scores=None if hook is None else hook.scores.copy(),
    )


def write_run_dir(
    run_dir: str | Path,
    cfg: ExperimentConfig,
    trained: TrainedModel,
    *,
    canaries: CanarySet | None = None,
    ledger_noise_multiplier: float | None = None,
    ledger_target_epsilon: float | None = None,
    delta: float | None = None,
) -> Path:
    """Write a run directory for ``trained`` that ``securefed audit`` can open.

    With ``cfg.dp.level: record`` a privacy ledger is written for client 0, planned and charged
    for ``trained.steps`` steps at ``ledger_noise_multiplier`` (default: the multiplier actually
    used) and ``delta`` (default ``cfg.dp.delta``, else ``1 / (10 n)``). Passing a LARGER
    multiplier than the one used writes a ledger that lies.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.federation.num_clients != 1:
        raise ValueError(
            "write_run_dir: harness runs are centralised; set federation.num_clients: 1 "
            f"(got {cfg.federation.num_clients})"
        )
    # the saved config says what was trained: one client, one round of `steps` local steps
    # (shadow models read it to train like the target)
    cfg = cfg.model_copy(
        update={
            "client": cfg.client.model_copy(
                update={"local_steps": trained.steps, "local_epochs": None}
            )
        }
    )
    atomic_write_text(RunDir(run_dir).config, dump_config(cfg))
    model = build_model(cfg, trained.data.image_shape, trained.data.num_classes)
    atomic_write_json(
        RunDir(run_dir).model_info,
        {"parameters": num_params(model), "image_shape": list(trained.data.image_shape)},
    )
    atomic_write_json(
        RunDir(run_dir).label_histogram,
        {
            "num_classes": trained.data.num_classes,
            "class_names": list(trained.data.class_names),
            "counts": [
                torch.bincount(trained.data.labels, minlength=trained.data.num_classes).tolist()
            ],
            "members": len(trained.data),
        },
    )
    save_checkpoint(
        RunDir(run_dir).checkpoints,
        Checkpoint(1, trained.params.clone(), {}, {}, {"harness": True}),
    )
    if canaries is not None:
        save_canaries(run_dir, canaries)
    if trained.gradient_canaries is not None:
        trained.gradient_canaries.save(RunDir(run_dir).canaries, cfg.dp.max_grad_norm)
        trained.gradient_canaries.commit(RunDir(run_dir).canaries, 1, trained.gradient_scores)
    if cfg.dp.level == "record":
        sigma = ledger_noise_multiplier
        if sigma is None:
            sigma = trained.noise_multiplier
        if not sigma:
            raise ValueError(
                "write_run_dir: a record-level DP ledger needs a positive noise multiplier; "
                "pass ledger_noise_multiplier"
            )
        ledger = PrivacyLedger(RunDir(run_dir).ledger)
        ledger.plan(
            0,
            noise_multiplier=sigma,
            sample_rate=trained.sample_rate,
            planned_steps=trained.steps,
            target_epsilon=ledger_target_epsilon,
            delta=delta or cfg.dp.delta or default_delta(len(trained.data)),
            accountant=cfg.dp.accountant,
        )
        ledger.charge(0, phase="round", round=1, steps=trained.steps)
    atomic_write_json(run_dir / "harness.json", {"steps": trained.steps})
    return run_dir


class UnderNoisedProtocol:
    """FAULT INJECTION for auditing the auditor: an aggregation protocol that adds only
    ``factor`` times the client-level DP noise it is asked for (0: none), while the ledger keeps
    charging the planned noise - a lying DP-FedAvg implementation the audit must catch.

    Wraps any :class:`~securefed.secagg.base.AggregationProtocol`; everything but
    :meth:`aggregate` is the wrapped protocol's. Never use outside tests and experiments.
    """

    def __init__(self, inner: Any, factor: float) -> None:
        if factor < 0:
            raise ValueError(f"UnderNoisedProtocol: factor must be >= 0, got {factor}")
        self.inner = inner
        self.factor = float(factor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def aggregate(
        self, round_id: int, inputs: Any, dropouts: Any = None, *, noise: Any = None
    ) -> Any:
        if noise is not None:
            noise = (
                DistributedNoise(std=noise.std * self.factor, expected=noise.expected)
                if self.factor > 0
                else None
            )
        return self.inner.aggregate(round_id, inputs, dropouts, noise=noise)


@contextmanager
def under_noised_runs(factor: float) -> Iterator[None]:
    """Inside the block, ``securefed.run.run_experiment`` builds :class:`UnderNoisedProtocol`
    aggregation (client-level DP noise times ``factor``; the ledger is unchanged)."""
    original = run_mod.build_protocol

    def build(*args: Any, **kwargs: Any) -> Any:
        return UnderNoisedProtocol(original(*args, **kwargs), factor)

    run_mod.build_protocol = build
    try:
        yield
    finally:
        run_mod.build_protocol = original
