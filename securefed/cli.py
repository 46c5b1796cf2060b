"""The ``securefed`` command: ``run | sample | report | budget | keys | audit | threats``.

Module level imports what building the parser needs (the deployment subcommands' parsers are
light and flwr-free) and what is cheap and shared (yaml; torch, which
:mod:`securefed.artefacts` loads anyway). Each command imports its own machinery (config, run,
audit, privacy, diffusion, ...) inside its handler, marked ``# lazy: CLI start-up``: those
imports take seconds (opacus, matplotlib, pydantic, the audit), and ``securefed --help`` should
not pay for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import yaml

from securefed.artefacts.checkpoint import load_latest
from securefed.artefacts.grid import save_grid
from securefed.artefacts.rundir import RunDir, released_params
from securefed.deploy.polling import main as supernode_main
from securefed.deploy.simulation_runtime import add_flower_sim_parser
from securefed.deploy.tls import add_keys_tls_parser
from securefed.deploy.worker import add_site_worker_parser
from securefed.errors import SecurefedError

__all__ = ["main"]


def _overrides(pairs: list[str] | None) -> dict[str, object]:
    """``--set partition.alpha=0.1`` -> ``{"partition.alpha": 0.1}`` (values parsed as YAML)."""
    out: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: expected KEY=VALUE (e.g. partition.alpha=0.1), got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from securefed.config import load_config  # lazy: CLI start-up
    from securefed.run import run_experiment  # lazy: CLI start-up

    if args.resume is not None:
        run_dir = Path(args.resume)
        saved = RunDir(run_dir).config
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
    if args.threat_model and not _threats_ok(cfg, args.threat_model, "securefed run"):
        return 1
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
        print(f"report: {RunDir(result.run_dir).report}")
    else:
        print(
            f"stopped after round {result.rounds_completed}; continue with "
            f"`securefed run --resume {result.run_dir}`"
        )
    return 0


def _threats_ok(cfg: object, names: list[str], prog: str) -> bool:
    """Check a config against threat models; print every defence; False if any is missing."""
    from securefed.audit.threats import check_config, load_threat_model  # lazy: CLI start-up

    raw = cfg.model_dump(mode="json")  # type: ignore[attr-defined]
    ok = True
    for name in names:
        tm = load_threat_model(name)
        checks = check_config(tm, raw)
        missing = [c for c in checks if not c.passed]
        for c in checks:
            mark = "ok     " if c.passed else "MISSING"
            print(f"[{tm.name}] {mark} {c.id}: {c.check}  ({c.detail})")
        if missing:
            ok = False
            print(
                f"{prog}: refused: threat model {tm.name!r} requires "
                + "; ".join(f"{c.id} ({c.check}; {c.why or 'see ' + tm.path})" for c in missing),
                file=sys.stderr,
            )
    return ok


def _cmd_threats(args: argparse.Namespace) -> int:
    from securefed.audit.threats import list_threat_models, load_threat_model  # lazy: CLI start-up

    if args.threats_command == "list":
        for name in list_threat_models():
            tm = load_threat_model(name)
            print(f"{name}: {tm.title} ({len(tm.requires)} defences, {len(tm.criteria)} criteria)")
        return 0
    from securefed.config import load_config  # lazy: CLI start-up

    cfg = load_config(args.config, _overrides(args.set))
    if _threats_ok(cfg, args.threat_model, "securefed threats check"):
        print(f"{args.config}: every required defence is present")
        return 0
    return 1


def _cmd_audit(args: argparse.Namespace) -> int:
    from securefed.audit.report import write_audit  # lazy: CLI start-up
    from securefed.audit.runner import AuditSettings, run_audit  # lazy: CLI start-up
    from securefed.audit.threats import load_threat_model  # lazy: CLI start-up

    opts: dict[str, object] = {}
    if args.settings:
        loaded = yaml.safe_load(Path(args.settings).read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"--settings: {args.settings} must hold a mapping of audit settings")
        opts.update(loaded.get("audit", loaded))
    for key in (
        "max_examples",
        "num_samples",
        "sampling_steps",
        "seed",
        "bootstrap",
        "lira_shadows",
        "shadow_steps",
        "audit_delta",
        "device",
    ):
        v = getattr(args, key)
        if v is not None:
            opts[key] = v
    if args.attacks:
        opts["attacks"] = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    elif "attacks" in opts and opts["attacks"] is not None:
        opts["attacks"] = tuple(opts["attacks"])  # type: ignore[arg-type]
    opts["progress"] = not args.no_progress
    try:
        settings = AuditSettings(**opts)  # type: ignore[arg-type]
    except TypeError as exc:
        raise SystemExit(f"securefed audit: bad audit setting: {exc}") from None
    tms = [load_threat_model(n) for n in args.threat_model]
    report = run_audit(args.run_dir, tms, settings)
    out = write_audit(report)
    if RunDir(args.run_dir).metrics.exists():
        from securefed.report import write_run_report  # lazy: CLI start-up

        write_run_report(args.run_dir)
    eps = report.epsilon
    print(
        f"accountant epsilon {eps.get('accountant')} at audit delta {eps.get('delta')} "
        f"(ledger: {eps.get('accountant_ledger')} at {eps.get('ledger_delta')}), empirical "
        f"eps_LB {eps.get('eps_lb', '-')} ({eps.get('source', 'no source')})"
    )
    for a in report.attacks:
        print(
            f"  {a.attack:13s} {a.target:12s} AUC {a.auc:.3f}  TPR@1%FPR {a.tpr_at_1pct_fpr:.3f}  "
            f"TPR@0.1%FPR {a.tpr_at_01pct_fpr:.3f}"
        )
    if report.memorization is not None:
        m = report.memorization
        print(
            f"  memorisation on {m.source}: {m.flagged} flagged of {m.num_samples}, DCR share "
            f"{m.dcr_share:.3f}"
        )
    for c in report.criteria:
        if not c.passed or c.outcome != "PASS":
            print(
                f"  {c.outcome} [{c.threat_model}] {c.id}: {c.metric} = {c.actual} {c.op} "
                f"{c.threshold} required ({c.detail})"
            )
    for tm, checks in report.defences.items():
        for d in checks:
            if not d.passed:
                print(f"  FAIL [{tm}] defence {d.id}: {d.check} ({d.detail})")
    for n in report.notes:
        print(f"  note: {n}")
    print(f"audit {'PASSED' if report.passed else 'FAILED'} in {report.seconds:.1f} s: {out}")
    return 0 if report.passed else 1


def _cmd_sample(args: argparse.Namespace) -> int:
    from securefed.builders import build_model, resolve_device  # lazy: CLI start-up
    from securefed.config import load_config  # lazy: CLI start-up
    from securefed.diffusion import NoiseSchedule, sample  # lazy: CLI start-up
    from securefed.diffusion.params import set_flat  # lazy: CLI start-up

    run_dir = Path(args.run_dir)
    cfg = load_config(RunDir(run_dir).config)
    info = json.loads(RunDir(run_dir).model_info.read_text())
    hist = json.loads(RunDir(run_dir).label_histogram.read_text())
    shape = tuple(info["image_shape"])
    num_classes = int(hist["num_classes"])
    dev = resolve_device(args.device or cfg.device)
    model = build_model(cfg, (shape[0], shape[1], shape[2]), num_classes).to(dev)
    ckpt = load_latest(RunDir(run_dir).checkpoints)
    params = released_params(ckpt)
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
    from securefed.report import write_run_report  # lazy: CLI start-up

    print(f"wrote {write_run_report(args.run_dir)}")
    return 0


def _cmd_keys_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.ckks:
        from securefed.secagg.ckks import init_ckks_keys  # lazy: CLI start-up; CKKS imports TenSEAL

        ckks_out = Path(args.ckks_out) if args.ckks_out is not None else out
        if args.clients is not None and ckks_out.resolve() == out.resolve():
            raise FileExistsError(
                f"keys init: --ckks with --clients would write the clients' CKKS secret beside "
                f"the server's server.key in {out}; add --ckks-out DIR (a separate folder)"
            )
        secret, public = init_ckks_keys(ckks_out, overwrite=args.overwrite)
        print(f"CKKS secret context (clients only, 0600): {secret}")
        print(f"CKKS public context (server): {public}")
    if args.clients is not None:
        from securefed.secagg.keys import init_identity_keys  # lazy: CLI start-up

        roster = init_identity_keys(out, args.clients, overwrite=args.overwrite)
        print(f"{args.clients} client signing keys (0600) and roster: {roster}")
    if args.clients is None and not args.ckks:
        raise SystemExit("securefed keys init: give --clients N and/or --ckks")
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    from securefed.privacy import calibrate_noise_multiplier, epsilon_of  # lazy: CLI start-up

    if args.run_dir is not None:
        from securefed.privacy import PrivacyLedger  # lazy: CLI start-up

        path = RunDir(args.run_dir).ledger
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
    r.add_argument(
        "--threat-model",
        action="append",
        metavar="NAME_OR_YAML",
        help="refuse to train unless the config has every defence this threat model requires "
        "(repeatable; names from threat_models/)",
    )
    r.set_defaults(func=_cmd_run)

    a = sub.add_parser(
        "audit",
        help="attack a run's released model / synthetic data and judge it against threat models",
    )
    a.add_argument("run_dir")
    a.add_argument(
        "--threat-model",
        action="append",
        required=True,
        metavar="NAME_OR_YAML",
        help="threat model(s) whose criteria must pass (repeatable)",
    )
    a.add_argument("--attacks", help="comma-separated attacks (default: those the criteria use)")
    a.add_argument("--settings", help="YAML of audit settings (e.g. experiments/audit_*.yaml)")
    a.add_argument("--max-examples", type=int, help="members and non-members scored (each)")
    a.add_argument("--num-samples", type=int, help="generated samples for memorisation")
    a.add_argument("--sampling-steps", type=int, help="DDIM steps of those samples")
    a.add_argument("--bootstrap", type=int, help="bootstrap resamples for the intervals")
    a.add_argument("--lira-shadows", type=int, help="LiRA shadow models")
    a.add_argument("--shadow-steps", type=int, help="training steps per shadow model")
    a.add_argument("--seed", type=int)
    a.add_argument(
        "--audit-delta",
        type=float,
        help="delta of the empirical bound and of the accountant's recomputed epsilon "
        "(default 1e-6)",
    )
    a.add_argument("--device", choices=["cpu", "cuda"])
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=_cmd_audit)

    t = sub.add_parser("threats", help="threat models: list them, check a config against one")
    tsub = t.add_subparsers(dest="threats_command", required=True)
    tl = tsub.add_parser("list", help="the shipped threat models")
    tl.set_defaults(func=_cmd_threats)
    tc = tsub.add_parser("check", help="does a config have every defence a threat model requires?")
    tc.add_argument("config")
    tc.add_argument("--threat-model", action="append", required=True, metavar="NAME_OR_YAML")
    tc.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    tc.set_defaults(func=_cmd_threats)

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

    add_flower_sim_parser(sub)

    k = sub.add_parser("keys", help="provision protocol keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    ki = ksub.add_parser("init", help="client signing keys + roster, and/or CKKS contexts")
    ki.add_argument("--clients", type=int, help="number of clients (Ed25519 signing keys)")
    ki.add_argument("--ckks", action="store_true", help="CKKS secret (clients) + public (server)")
    ki.add_argument("--out", required=True, help="output folder")
    ki.add_argument(
        "--ckks-out",
        help="folder for the CKKS contexts (0700; required with --clients: never beside "
        "server.key; default --out)",
    )
    ki.add_argument("--overwrite", action="store_true", help="replace existing key files")
    ki.set_defaults(func=_cmd_keys_init)
    add_keys_tls_parser(ksub)  # `keys tls`: Flower deployment
    add_site_worker_parser(sub)  # Flower deployment, per site
    sub.add_parser(
        "supernode",
        help="flower-supernode with its 3 s idle poll shortened (flwr 1.41.x; see docs/deploy.md)",
        add_help=False,
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["supernode"]:  # every other argument belongs to flower-supernode
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return supernode_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (SecurefedError, FileExistsError, FileNotFoundError, PermissionError) as exc:
        # every user-fixable error (config, data, keys, ledger, checkpoint, threat model, ...)
        # derives from SecurefedError: one clear line, exit 2, nothing imported to catch it
        print(f"securefed {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
