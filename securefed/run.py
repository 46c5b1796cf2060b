"""``run_experiment(cfg)``: wires data, model, clients, strategy and aggregation into a run dir.

Run directory::

    runs/<name>/config.yaml          resolved config (every default written out)
                metrics.jsonl        one line per round
                label_histogram.json per-client label counts of the partition
                checkpoints/         round_XXXX.pt + latest.json (checksummed)
                samples/round_XXXX.png
                report.md + *.png    written by securefed.report
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from securefed.client.update import get_flat, num_params, set_flat
from securefed.config import ExperimentConfig, dump_config, parse_config
from securefed.data import (
    ImageDataset,
    label_histogram,
    load_dataset,
    partition,
    split_member_holdout,
)
from securefed.diffusion import NoiseSchedule, UNet, sample
from securefed.federation.checkpoint import CheckpointError, load_latest
from securefed.federation.engine import RoundEngine
from securefed.federation.record import RoundRecord, read_records
from securefed.federation.simulation import (
    InProcessClients,
    PrivacyContext,
    SimClient,
    SimulationEvaluation,
)
from securefed.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    write_jsonl,
)
from securefed.report.grid import save_grid
from securefed.secagg import build_protocol
from securefed.seeds import Purpose, derive_seed
from securefed.strategies import Strategy, build_strategy

if TYPE_CHECKING:
    from securefed.privacy.client_level import ClientLevelDP

__all__ = [
    "PreparedData",
    "RunResult",
    "build_model",
    "cache_dir",
    "prepare_data",
    "resolve_device",
    "run_experiment",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a run produced.

    Attributes:
        run_dir: the run directory.
        rounds_completed: last completed round.
        final_params: ``[D]`` float32 global model after the last completed round.
        metrics: all metrics lines (including earlier sessions of a resumed run).
        finished: True when every configured round ran.
    """

    run_dir: Path
    rounds_completed: int
    final_params: torch.Tensor
    metrics: list[dict[str, Any]]
    finished: bool


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
    import os

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
    from securefed.client.dp import sample_rate_for
    from securefed.client.trainer import local_steps_for
    from securefed.federation.auxiliary import calibrate_with_extra, pretrain_steps_for
    from securefed.privacy import (
        PrivacyLedger,
        SecureGaussian,
        TorchGaussian,
        calibrate_noise_multiplier,
        default_delta,
        dp_round_key,
        load_or_create_run_key,
    )

    dp = cfg.dp
    fd = cfg.fedddpm
    path = run_dir / "privacy_ledger.json"
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
        run_key = load_or_create_run_key(run_dir / "secrets" / "dp_noise.key")

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
    from securefed.privacy import calibrate_noise_multiplier

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
    from securefed.privacy import PrivacyLedger
    from securefed.privacy.client_level import ClientLevelDP

    dp = cfg.dp
    planned, delta = client_level_schedule(cfg)
    path = run_dir / "privacy_ledger.json"
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


def _check_resume_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        raise CheckpointError(f"{run_dir} has no config.yaml: it is not a securefed run directory")
    import yaml

    saved = parse_config(yaml.safe_load(saved_path.read_text()))
    if saved.model_dump(mode="json") != cfg.model_dump(mode="json"):
        a, b = saved.model_dump(mode="json"), cfg.model_dump(mode="json")
        diffs = [k for k in a if a[k] != b.get(k)]
        raise CheckpointError(
            f"--resume: the config differs from the run's saved config.yaml in {diffs}; resume "
            "with the run's own config (securefed run --resume RUN_DIR without a CONFIG)"
        )


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    device: str | None = None,
    stop_after_round: int | None = None,
    progress: bool = True,
    write_report: bool = True,
) -> RunResult:
    """Train a DDPM federatedly in simulation and fill the run directory.

    Args:
        cfg: the validated experiment.
        out_dir: run directory (default ``runs/<name>``). Must be new or empty unless ``resume``.
        resume: continue from the run directory's latest checkpoint.
        device: overrides ``cfg.device``.
        stop_after_round: stop (as if killed) after this round, for resume tests.
        progress: show progress bars.
        write_report: write ``report.md`` and plots at the end.
    """
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
    dev = resolve_device(device or cfg.device)
    if resume:
        _check_resume_config(run_dir, cfg)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"run directory {run_dir} already exists and is not empty; pass a new --out, or "
            f"--resume {run_dir} to continue it"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    data = prepare_data(cfg)
    image_shape = data.members.image_shape
    model = build_model(cfg, image_shape, data.members.num_classes).to(dev)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    if cfg.pretrain.enabled and not resume:  # on resume the checkpoint holds the global model
        _public_pretrain(cfg, run_dir, model, schedule, data, dev)
    clients = [SimClient(cid, data.members.subset(idx)) for cid, idx in enumerate(data.parts)]
    # weights n_i / n_members keep every summed value (and the summed weight) inside [-1, 1],
    # the range secure aggregation quantises
    strategy = build_strategy(
        cfg.strategy, cfg.federation.num_clients, weight_scale=float(len(data.members))
    )
    protocol = build_protocol(cfg.secure_aggregation, cfg.federation.num_clients)
    conditional = cfg.model.class_conditional
    sched_dev = schedule.to(dev)

    samples_dir = run_dir / "samples"

    def write_samples(rnd: int, params: torch.Tensor) -> None:
        set_flat(model, params)
        gen = torch.Generator(device=dev).manual_seed(derive_seed(cfg.seed, Purpose.SAMPLES))
        n = cfg.evaluation.grid_samples
        y = None
        if conditional:
            y = torch.arange(n, device=dev) % data.members.num_classes
        imgs = sample(
            model,
            sched_dev,
            n,
            image_shape,
            sampler=cfg.evaluation.sampler,
            steps=cfg.evaluation.sampling_steps,
            y=y,
            generator=gen,
            device=dev,
        )
        save_grid(imgs, samples_dir / f"round_{rnd:04d}.png")

    evaluator = None
    if cfg.evaluation.fid:
        from securefed.metrics import SampleEvaluator

        evaluator = SampleEvaluator(
            data.members.images,
            data.members.labels,
            data.holdout.images,
            data.holdout.labels,
            data.members.num_classes,
            dataset_fingerprint=data.members.fingerprint(),
            cfg=cfg.evaluation,
            cache_dir=cache_dir() / "featnets",
            seed=cfg.seed,
            device=dev,
        )

    def quality(rnd: int, params: torch.Tensor) -> dict[str, Any]:
        if evaluator is None:
            return {}
        set_flat(model, params)
        gen = torch.Generator(device=dev).manual_seed(derive_seed(cfg.seed, Purpose.FID, rnd))
        n = cfg.evaluation.num_fid_samples
        y = None
        if conditional:
            y = torch.randint(0, data.members.num_classes, (n,), generator=gen, device=dev)
        imgs = sample(
            model,
            sched_dev,
            n,
            image_shape,
            sampler=cfg.evaluation.sampler,
            steps=cfg.evaluation.sampling_steps,
            y=y,
            generator=gen,
            device=dev,
        )
        rep = evaluator.evaluate(imgs.cpu())
        return {k: v for k, v in rep.as_dict().items() if v is not None}

    privacy: PrivacyContext | None = None
    if cfg.dp.level == "record":
        privacy = build_privacy(cfg, run_dir, clients, resume)
        if cfg.canaries.enabled:
            from securefed.privacy.canaries import GradientCanaries

            # audit-only secrets under canaries/ (0600); never part of a released artefact
            privacy.canary_dir = run_dir / "canaries"
            privacy.canaries = GradientCanaries.create_or_load(
                privacy.canary_dir, model, cfg.canaries.m, len(clients), cfg.dp.max_grad_norm
            )
    elif cfg.dp.level == "client":
        strategy, privacy = build_client_level_privacy(cfg, run_dir, clients, strategy, resume)
        if cfg.canaries.enabled:
            from securefed.privacy.canaries import CanaryClients

            # canary clients (audit-only secrets under canaries/, 0600)
            privacy.canary_dir = run_dir / "canaries"
            privacy.canaries = CanaryClients.create_or_load(
                privacy.canary_dir, model, cfg.canaries.m
            )
    transport = InProcessClients(
        cfg, model, schedule, clients, protocol, dev, progress=progress, privacy=privacy
    )
    evaluation = SimulationEvaluation(
        cfg, clients, data.holdout, model, schedule, dev,
        evaluate_quality=quality, on_samples=write_samples,
    )
    engine = RoundEngine(cfg, strategy, transport, get_flat(model), evaluate=evaluation)

    if cfg.feddiffuse.enabled:
        engine.strategy = _wrap_feddiffuse(cfg, model, engine.strategy)
    if cfg.fedddpm.enabled:
        engine.strategy = _wrap_fedddpm(
            cfg, run_dir, engine, transport, data, privacy, resume, progress
        )

    metrics_path = run_dir / "metrics.jsonl"
    ckpt_dir = run_dir / "checkpoints"
    rows: list[RoundRecord]
    if resume:
        ckpt = load_latest(ckpt_dir)
        engine.restore(ckpt)
        if privacy is not None and privacy.level == "record":
            # charges of rounds after the checkpoint are KEPT (their updates may have left); a
            # replayed round is free only if it reproduces the recorded digest of the released
            # update, else it is retrained with fresh noise and charged again. Client-level
            # noise is drawn from os.urandom inside the protocol: never replayed, always kept.
            privacy.ledger.reopen_after(ckpt.round)
        rows = [r for r in read_records(metrics_path) if r.round <= ckpt.round]
        write_jsonl(metrics_path, [r.to_json() for r in rows])  # drop rounds after the checkpoint
        log.info("resumed %s after round %d", run_dir, ckpt.round)
    else:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        atomic_write_json(
            run_dir / "label_histogram.json",
            {
                "num_classes": data.members.num_classes,
                "class_names": list(data.members.class_names),
                "counts": data.histogram.tolist(),
                "members": len(data.members),
                "holdout": len(data.holdout),
            },
        )
        atomic_write_json(
            run_dir / "model.json",
            {
                "parameters": num_params(model),
                "groups": {k: len(v) for k, v in model.parameter_groups().items()},
                "image_shape": list(image_shape),
            },
        )
        # real holdout digits beside the samples on the report's first screen (the holdout is
        # the evaluator's reference: it never reaches a client)
        save_grid(data.holdout.images[: cfg.evaluation.grid_samples], samples_dir / "holdout.png")
        rows = []
        if cfg.evaluation.fid_at_start or cfg.pretrain.enabled:
            # with public pre-training, round 0 IS the public-only model: always measured
            t0 = time.perf_counter()
            start = get_flat(model)
            extra: dict[str, Any] = {"public_only": True} if cfg.pretrain.enabled else {}
            loss = evaluation.holdout_loss(start)
            write_samples(0, start)
            if cfg.evaluation.fid:
                extra.update(quality(0, start))
            rows.append(
                RoundRecord(round=0, holdout_loss=loss, evaluation=extra).with_seconds(
                    fid=time.perf_counter() - t0
                )
            )
        write_jsonl(metrics_path, [r.to_json() for r in rows])

    rounds = cfg.federation.rounds
    last = rounds if stop_after_round is None else min(rounds, stop_after_round)
    meta = {"name": cfg.name, "parameters": num_params(model)}
    bar = tqdm(
        total=rounds, initial=engine.round, desc="rounds", disable=not progress, unit="round"
    )

    def on_round(record: RoundRecord) -> None:
        bar.update(1)
        bar.set_postfix_str(_postfix(record))

    stop_reason = engine.run(run_dir, rows, meta, last=last, on_round=on_round)
    bar.close()

    finished = engine.round >= rounds or stop_reason is not None
    if write_report and finished:
        from securefed.report import write_run_report

        write_run_report(run_dir)
    log.info("run %s: %d rounds in %.1f s", run_dir, engine.round, time.perf_counter() - t_start)
    return RunResult(
        run_dir, engine.round, engine.global_params.clone(), [r.to_json() for r in rows],
        finished,
    )


def _public_pretrain(
    cfg: ExperimentConfig,
    run_dir: Path,
    model: UNet,
    schedule: NoiseSchedule,
    data: PreparedData,
    dev: torch.device,
) -> None:
    """``pretrain.enabled``: the public model (cached) becomes the initial global model; its
    facts and the public/private relation go to ``public_pretrain.json``. No ledger charge."""
    from securefed.federation.public_pretrain import public_pretrain

    res = public_pretrain(
        cfg, model, schedule, [data.members, data.holdout], dev, cache_dir() / "pretrain"
    )
    atomic_write_json(
        run_dir / "public_pretrain.json",
        {
            **res.meta,
            "private_dataset": cfg.data.name,
            "relation": (
                f"public {cfg.pretrain.data.name!r} and private {cfg.data.name!r} are different "
                "collections (checked by name and root) with no identical image (checked bit for "
                "bit at the model's shape); the public model is trained on public data only and "
                "charged to no privacy ledger"
            ),
        },
    )
    log.info(
        "public pre-training on %s (%d images, %d steps): %s", cfg.pretrain.data.name,
        res.meta["examples"], res.meta["steps"],
        "from cache" if res.meta["cached"] else f"{res.meta['seconds']} s",
    )


def build_strategy_stack(cfg: ExperimentConfig, model: UNet, weight_scale: float) -> Strategy:
    """The strategy a deployed coordinator and site build, as :func:`run_experiment` does:
    ``cfg.strategy`` (FedAvg / FedProx / SCAFFOLD with the server optimizer), in DP-FedAvg when
    ``dp.level: client`` (:func:`client_level_dp`), in FedDiffuse when ``feddiffuse.enabled``."""
    strategy = build_strategy(cfg.strategy, cfg.federation.num_clients, weight_scale=weight_scale)
    if cfg.dp.level == "client":
        strategy = client_level_dp(cfg, strategy)
    return _wrap_feddiffuse(cfg, model, strategy) if cfg.feddiffuse.enabled else strategy


def client_level_dp(cfg: ExperimentConfig, base: Strategy) -> ClientLevelDP:
    """``dp.level: client``: DP-FedAvg around ``base`` with the multiplier calibrated from the
    experiment itself (:func:`client_level_multiplier`). A deployed coordinator and every site
    build their own; a site charges, and noises, by its own."""
    from securefed.privacy.client_level import ClientLevelDP

    return ClientLevelDP(base, cfg.dp, cfg.secure_aggregation, client_level_multiplier(cfg))


def _wrap_feddiffuse(cfg: ExperimentConfig, model: UNet, base: Strategy) -> Strategy:
    """``feddiffuse.enabled``: partial-UNet exchange around the base strategy."""
    from securefed.client.update import param_slices
    from securefed.strategies.feddiffuse import FedDiffuse, group_indices

    groups = group_indices(param_slices(model), model.parameter_groups())
    return FedDiffuse(
        base, cfg.feddiffuse, groups, cfg.seed, derive=derive_seed, purpose=Purpose.USPLIT
    )


def _wrap_fedddpm(
    cfg: ExperimentConfig,
    run_dir: Path,
    engine: RoundEngine,
    sim: InProcessClients,
    data: PreparedData,
    privacy: PrivacyContext | None,
    resume: bool,
    progress: bool,
) -> Strategy:
    """``fedddpm.enabled``: phase 0 (or, on resume, the stored auxiliary set) + the wrapper."""
    from securefed.federation.auxiliary import (
        build_auxiliary_set,
        load_auxiliary,
        save_auxiliary,
    )
    fd = cfg.fedddpm
    if fd.upload == "samples" and privacy is None:
        log.warning(
            "fedddpm: dp.level is %r: the uploaded samples come from NON-DP local models and may "
            "reproduce training images; the server sees each client's samples", cfg.dp.level
        )
    if resume:
        aux, _ = load_auxiliary(run_dir)
        log.info("resume: reloaded the auxiliary set (%d images) from %s", len(aux), run_dir)
    else:
        t0 = time.perf_counter()
        init = engine.global_params.clone()
        uploads: dict[int, torch.Tensor] = {}
        aux, meta = build_auxiliary_set(
            cfg, sim.model, sim.schedule, sim.clients, init, data.members.num_classes,
            data.histogram, sim.device, privacy if privacy is not None and privacy.level ==
            "record" else None, trainer=sim.trainer, derive=derive_seed, progress=progress,
            uploads=uploads,
        )
        for cid, vec in uploads.items():
            # what the server received individually (upload: model): kept for the audit's
            # `received` target (threat models of the server)
            buf = io.BytesIO()
            torch.save({"params": vec, "client": cid, "phase": "fedddpm upload"}, buf)
            atomic_write_bytes(run_dir / "received" / f"client_{cid}.pt", buf.getvalue())
        set_flat(sim.model, init)  # phase 0 left a client's local model in the instance
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        save_auxiliary(run_dir, aux, meta)
    return fedddpm_wrapper(
        cfg, engine.strategy, sim.model, sim.schedule, sim.device, aux,
        [len(c.data) for c in sim.clients],
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
    from securefed.client.trainer import local_steps_for
    from securefed.strategies.fedddpm import FedDDPM, ServerCalibrator, split_holdout
    from securefed.strategies.fedddpm_plus import FedDDPMPlus

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


def _postfix(record: RoundRecord) -> str:
    parts = []
    if record.mean_local_loss is not None:
        parts.append(f"loss={record.mean_local_loss:.4f}")
    if record.holdout_loss is not None:
        parts.append(f"holdout={record.holdout_loss:.4f}")
    if record.fid is not None:
        parts.append(f"fid={record.fid:.2f}")
    return " ".join(parts)
