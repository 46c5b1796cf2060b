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

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from securefed.artefacts.checkpoint import CheckpointError, load_latest
from securefed.artefacts.rundir import RunDir
from securefed.builders import (
    PreparedData,
    build_client_level_privacy,
    build_model,
    build_privacy,
    cache_dir,
    fedddpm_wrapper,
    feddiffuse_wrapper,
    prepare_data,
    resolve_device,
)
from securefed.config import ExperimentConfig, dump_config, parse_config
from securefed.diffusion import NoiseSchedule, UNet, sample
from securefed.diffusion.params import get_flat, num_params, set_flat
from securefed.federation.auxiliary import build_auxiliary_set, load_auxiliary, save_auxiliary
from securefed.federation.engine import RoundEngine
from securefed.federation.public_pretrain import public_pretrain
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
from securefed.privacy.canaries import CanaryClients, GradientCanaries
from securefed.report import write_run_report
from securefed.secagg import build_protocol
from securefed.seeds import Purpose, derive_seed
from securefed.strategies import Strategy, build_strategy

__all__ = ["RunResult", "run_experiment"]

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


def _check_resume_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    saved_path = RunDir(run_dir).config
    if not saved_path.exists():
        raise CheckpointError(f"{run_dir} has no config.yaml: it is not a securefed run directory")

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
    elif not RunDir(run_dir).is_new():
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

    rd = RunDir(run_dir)

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
        rd.save_sample_grid(rnd, imgs)

    evaluator = None
    if cfg.evaluation.fid:
        # lazy: securefed.metrics imports torchmetrics (about 2 s); only evaluation.fid runs need it
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
            # audit-only secrets under canaries/ (0600); never part of a released artefact
            privacy.canary_dir = RunDir(run_dir).canaries
            privacy.canaries = GradientCanaries.create_or_load(
                privacy.canary_dir, model, cfg.canaries.m, len(clients), cfg.dp.max_grad_norm
            )
    elif cfg.dp.level == "client":
        strategy, privacy = build_client_level_privacy(cfg, run_dir, clients, strategy, resume)
        if cfg.canaries.enabled:
            # canary clients (audit-only secrets under canaries/, 0600)
            privacy.canary_dir = RunDir(run_dir).canaries
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
        engine.strategy = feddiffuse_wrapper(cfg, model, engine.strategy)
    if cfg.fedddpm.enabled:
        engine.strategy = _wrap_fedddpm(
            cfg, run_dir, engine, transport, data, privacy, resume, progress
        )

    metrics_path = RunDir(run_dir).metrics
    ckpt_dir = RunDir(run_dir).checkpoints
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
        atomic_write_text(RunDir(run_dir).config, dump_config(cfg))
        atomic_write_json(
            RunDir(run_dir).label_histogram,
            {
                "num_classes": data.members.num_classes,
                "class_names": list(data.members.class_names),
                "counts": data.histogram.tolist(),
                "members": len(data.members),
                "holdout": len(data.holdout),
            },
        )
        atomic_write_json(
            RunDir(run_dir).model_info,
            {
                "parameters": num_params(model),
                "groups": {k: len(v) for k, v in model.parameter_groups().items()},
                "image_shape": list(image_shape),
            },
        )
        # real holdout digits beside the samples on the report's first screen (the holdout is
        # the evaluator's reference: it never reaches a client)
        rd.save_holdout_grid(data.holdout.images[: cfg.evaluation.grid_samples])
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
    res = public_pretrain(
        cfg, model, schedule, [data.members, data.holdout], dev, cache_dir() / "pretrain"
    )
    atomic_write_json(
        RunDir(run_dir).public_pretrain,
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
            atomic_write_bytes(RunDir(run_dir).received_upload(cid), buf.getvalue())
        set_flat(sim.model, init)  # phase 0 left a client's local model in the instance
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        save_auxiliary(run_dir, aux, meta)
    return fedddpm_wrapper(
        cfg, engine.strategy, sim.model, sim.schedule, sim.device, aux,
        [len(c.data) for c in sim.clients],
    )


def _postfix(record: RoundRecord) -> str:
    parts = []
    if record.mean_local_loss is not None:
        parts.append(f"loss={record.mean_local_loss:.4f}")
    if record.holdout_loss is not None:
        parts.append(f"holdout={record.holdout_loss:.4f}")
    if record.fid is not None:
        parts.append(f"fid={record.fid:.2f}")
    return " ".join(parts)
