"""The ``securefed`` command: ``run | sample | report | keys``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _overrides(pairs: list[str] | None) -> dict[str, object]:
    """``--set partition.alpha=0.1`` -> ``{"partition.alpha": 0.1}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: expected KEY=VALUE (e.g. partition.alpha=0.1), got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from securefed.config import load_config
    from securefed.run import run_experiment

    if args.resume is not None:
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if args.config is not None and Path(args.config).resolve() != saved.resolve():
            # a CONFIG given with --resume must equal the saved one (checked in run_experiment)
            cfg = load_config(args.config)
        else:
            cfg = load_config(saved)
        out = run_dir
    else:
        if args.config is None:
            raise SystemExit("securefed run: give a CONFIG.yaml (or --resume RUN_DIR)")
        cfg = load_config(args.config, _overrides(args.set))
        out = Path(args.out) if args.out else Path("runs") / cfg.name
    result = run_experiment(
        cfg,
        out,
        resume=args.resume is not None,
        device=args.device,
        stop_after_round=args.stop_after_round,
        progress=not args.no_progress,
    )
    last = result.metrics[-1] if result.metrics else {}
    summary = {
        k: last[k] for k in ("round", "holdout_loss", "fid", "precision", "recall") if k in last
    }
    print(f"run directory: {result.run_dir}")
    print(f"final: {json.dumps(summary)}")
    if result.finished:
        print(f"report: {result.run_dir / 'report.md'}")
    else:
        print(
            f"stopped after round {result.rounds_completed}; continue with "
            f"`securefed run --resume {result.run_dir}`"
        )
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from securefed.client.update import set_flat
    from securefed.config import load_config
    from securefed.diffusion import NoiseSchedule, sample
    from securefed.federation.checkpoint import load_latest
    from securefed.report.grid import save_grid
    from securefed.run import build_model, resolve_device

    run_dir = Path(args.run_dir)
    cfg = load_config(run_dir / "config.yaml")
    info = json.loads((run_dir / "model.json").read_text())
    hist = json.loads((run_dir / "label_histogram.json").read_text())
    shape = tuple(info["image_shape"])
    num_classes = int(hist["num_classes"])
    dev = resolve_device(args.device or cfg.device)
    model = build_model(cfg, (shape[0], shape[1], shape[2]), num_classes).to(dev)
    ckpt = load_latest(run_dir / "checkpoints")
    params = ckpt.strategy.get("ema", ckpt.global_params)
    set_flat(model, params)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    y = None
    if cfg.model.class_conditional:
        if args.label is not None:
            if not 0 <= args.label < num_classes:
                raise SystemExit(f"--label: must be in 0..{num_classes - 1}, got {args.label}")
            y = torch.full((args.n,), args.label, device=dev, dtype=torch.long)
        else:
            y = torch.arange(args.n, device=dev) % num_classes
    imgs = sample(
        model,
        NoiseSchedule.from_config(cfg.diffusion).to(dev),
        args.n,
        (shape[0], shape[1], shape[2]),
        sampler=args.sampler,
        steps=args.steps,
        y=y,
        generator=gen,
        device=dev,
        progress=True,
    )
    out = save_grid(imgs, args.out)
    print(f"wrote {args.n} samples from round {ckpt.round} to {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from securefed.report import write_run_report

    print(f"wrote {write_run_report(args.run_dir)}")
    return 0


def _cmd_keys_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.ckks:
        from securefed.secagg.ckks import init_ckks_keys

        secret, public = init_ckks_keys(out, overwrite=args.overwrite)
        print(f"CKKS secret context (clients only, 0600): {secret}")
        print(f"CKKS public context (server): {public}")
    if args.clients is not None:
        from securefed.secagg.keys import init_identity_keys

        roster = init_identity_keys(out, args.clients, overwrite=args.overwrite)
        print(f"{args.clients} client signing keys (0600) and roster: {roster}")
    if args.clients is None and not args.ckks:
        raise SystemExit("securefed keys init: give --clients N and/or --ckks")
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    from securefed.privacy import calibrate_noise_multiplier, epsilon_of

    if args.run_dir is not None:
        from securefed.privacy import PrivacyLedger

        path = Path(args.run_dir) / "privacy_ledger.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: the run did not use record-level DP (dp.level: record)"
            )
        print(PrivacyLedger.load(path).table())
        return 0
    missing = [f for f in ("delta", "sample_rate", "steps") if getattr(args, f) is None]
    if missing:
        raise SystemExit(
            "securefed budget: give RUN_DIR, or --delta, --sample-rate and --steps with either "
            f"--target-epsilon or --noise-multiplier (missing: {', '.join(missing)})"
        )
    if (args.target_epsilon is None) == (args.noise_multiplier is None):
        raise SystemExit(
            "securefed budget: give exactly one of --target-epsilon, --noise-multiplier"
        )
    if args.target_epsilon is not None:
        sigma = calibrate_noise_multiplier(
            args.target_epsilon, args.delta, args.sample_rate, args.steps, args.accountant
        )
        print(
            f"noise multiplier {sigma:.4f} gives epsilon <= {args.target_epsilon} at delta "
            f"{args.delta} after {args.steps} steps at sample rate {args.sample_rate} "
            f"({args.accountant} accountant)"
        )
    else:
        eps = epsilon_of(
            [(args.noise_multiplier, args.sample_rate, args.steps)], args.delta, args.accountant
        )
        print(
            f"epsilon {eps:.4f} at delta {args.delta} after {args.steps} steps with noise "
            f"multiplier {args.noise_multiplier} at sample rate {args.sample_rate} "
            f"({args.accountant} accountant)"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="securefed",
        description="Privacy-hardened federated learning for diffusion models.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train a DDPM federatedly (simulation) into a run directory")
    r.add_argument("config", nargs="?", help="experiment YAML (optional with --resume)")
    r.add_argument("--out", help="run directory (default runs/<name>)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    r.add_argument("--device", choices=["cpu", "cuda", "auto"], help="overrides the config")
    r.add_argument(
        "--stop-after-round",
        type=int,
        default=None,
        help="stop after this round (resume later with --resume)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set partition.kind=iid (repeatable)",
    )
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("sample", help="draw samples from a run's latest checkpoint")
    s.add_argument("run_dir")
    s.add_argument("-n", type=int, default=64, help="number of samples")
    s.add_argument("--out", default="samples.png", help="PNG grid path")
    s.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps (ignored by ddpm)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", type=int, default=None, help="class label (conditional models)")
    s.add_argument("--device", choices=["cpu", "cuda", "auto"])
    s.set_defaults(func=_cmd_sample)

    rep = sub.add_parser("report", help="(re)write report.md and plots for a run directory")
    rep.add_argument("run_dir")
    rep.set_defaults(func=_cmd_report)

    b = sub.add_parser(
        "budget",
        help="noise multiplier for a target epsilon, epsilon for a noise multiplier, "
        "or a run's privacy ledger",
    )
    b.add_argument("run_dir", nargs="?", help="print this run's privacy ledger")
    b.add_argument("--target-epsilon", type=float)
    b.add_argument("--noise-multiplier", type=float)
    b.add_argument("--delta", type=float)
    b.add_argument("--sample-rate", type=float)
    b.add_argument("--steps", type=int)
    b.add_argument("--accountant", choices=["prv", "rdp"], default="prv")
    b.set_defaults(func=_cmd_budget)

    k = sub.add_parser("keys", help="provision protocol keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    ki = ksub.add_parser("init", help="client signing keys + roster, and/or CKKS contexts")
    ki.add_argument("--clients", type=int, help="number of clients (Ed25519 signing keys)")
    ki.add_argument("--ckks", action="store_true", help="CKKS secret (clients) + public (server)")
    ki.add_argument("--out", required=True, help="output folder")
    ki.add_argument("--overwrite", action="store_true", help="replace existing key files")
    ki.set_defaults(func=_cmd_keys_init)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from securefed.config import ConfigError
    from securefed.data import DatasetError, PartitionError
    from securefed.federation.checkpoint import CheckpointError

    try:
        return int(args.func(args))
    except (
        ConfigError,
        DatasetError,
        PartitionError,
        CheckpointError,
        FileExistsError,
        FileNotFoundError,
    ) as exc:
        print(f"securefed {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
