"""Larger audits from a YAML file (``experiments/audit_*.yaml``): train each variant with the
project's trainers (non-DP, DP at several epsilons, optionally a lying run), insert canaries,
write run directories, audit each against threat models and write a summary table.

    python -m securefed.audit.experiment experiments/audit_digits.yaml --out runs/audit_digits

File layout::

    name: audit_digits
    base: {...}              # an experiment config (one client, one round; see harness.py)
    steps: 600               # training steps of every variant
    delta: 1.0e-5
    canaries: {kind: natural, m: 128, seed: 7}     # optional
    variants:
      - {name: nondp}                              # no DP
      - {name: dp_eps10, epsilon: 10}              # DP-SGD calibrated to epsilon 10
      - {name: lying_eps1, epsilon: 1, lie: true}  # noise 0, ledger claims epsilon 1
    threat_models: [external_released_model]
    audit: {attacks: [...], max_examples: 256, ...}   # AuditSettings fields
    variant_audit: {nondp: {attacks: [...]}}          # per-variant overrides
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from securefed.audit.canaries import draw_canaries
from securefed.audit.harness import train_model, write_run_dir
from securefed.audit.report import write_audit
from securefed.audit.runner import AuditSettings, run_audit
from securefed.audit.threats import load_threat_model
from securefed.builders import prepare_data
from securefed.client.dp import sample_rate_for
from securefed.config import parse_config
from securefed.io import atomic_write_json, atomic_write_text
from securefed.privacy import calibrate_noise_multiplier

__all__ = ["main", "run_audit_experiment"]

log = logging.getLogger(__name__)


def _variant_config(base: dict[str, Any], v: dict[str, Any], delta: float) -> Any:
    raw = json.loads(json.dumps(base))
    raw.setdefault("federation", {}).update(num_clients=1, rounds=1)
    raw.setdefault("partition", {"kind": "iid"})
    eps = v.get("epsilon")
    if eps is None:
        raw["dp"] = {"level": "none"}
    else:
        dp = dict(raw.get("dp") or {})
        dp.update(level="record", target_epsilon=float(eps), delta=delta)
        if v.get("lie"):
            dp.setdefault("secure_noise", False)
        raw["dp"] = dp
    raw["name"] = f"{raw.get('name', 'audit')}-{v['name']}"
    return parse_config(raw)


def run_audit_experiment(
    spec_path: str | Path, out: str | Path, device: str = "cpu", progress: bool = True
) -> Path:
    """Run every variant of the spec; returns the path of ``summary.md``."""
    spec = yaml.safe_load(Path(spec_path).read_text())
    for key in ("base", "steps", "variants", "threat_models"):
        if key not in spec:
            raise ValueError(f"{spec_path}: missing required key {key!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps, delta = int(spec["steps"]), float(spec.get("delta", 1e-5))
    tms = [load_threat_model(n) for n in spec["threat_models"]]
    rows = []

    dev = torch.device(device)
    for v in spec["variants"]:
        t0 = time.perf_counter()
        cfg = _variant_config(spec["base"], v, delta)
        data = prepare_data(cfg)
        canaries = None
        if spec.get("canaries"):
            c = spec["canaries"]
            canaries = draw_canaries(
                c.get("kind", "natural"),
                int(c.get("m", 128)),
                data.members.image_shape,
                data.members.num_classes,
                1,
                int(c.get("seed", 0)),
                data.holdout,
            )
        n = len(data.members) + (0 if canaries is None else int(canaries.included.sum()))
        sigma = claimed = None
        if v.get("epsilon") is not None:
            claimed = calibrate_noise_multiplier(
                float(v["epsilon"]),
                delta,
                sample_rate_for(cfg.client, n),
                steps,
                cfg.dp.accountant,
            )
            sigma = 0.0 if v.get("lie") else claimed
        log.info("variant %s: training %d steps (noise multiplier %s)", v["name"], steps, sigma)
        trained = train_model(
            cfg,
            data.members,
            steps=steps,
            seed=int(spec.get("seed", 0)),
            noise_multiplier=sigma,
            canaries=canaries,
            device=dev,
            progress=progress,
        )
        train_s = time.perf_counter() - t0
        run_dir = write_run_dir(
            out / v["name"],
            cfg,
            trained,
            canaries=canaries,
            ledger_noise_multiplier=claimed,
            ledger_target_epsilon=v.get("epsilon"),
        )
        opts = dict(spec.get("audit") or {})
        opts.update((spec.get("variant_audit") or {}).get(v["name"], {}))
        if "attacks" in opts:
            opts["attacks"] = tuple(opts["attacks"])
        settings = AuditSettings(**{**opts, "device": device, "progress": progress})
        rep = run_audit(run_dir, tms, settings)
        write_audit(rep)
        rows.append(
            {
                "variant": v["name"],
                "epsilon_accountant": rep.epsilon.get("accountant"),
                "noise_multiplier_used": sigma,
                "eps_lb": rep.epsilon.get("eps_lb"),
                "eps_lb_one_run": rep.epsilon.get("eps_lb_one_run"),
                "eps_lb_cp": rep.epsilon.get("eps_lb_cp"),
                "attacks": {
                    a.attack: {"auc": a.auc, "tpr_at_1pct_fpr": a.tpr_at_1pct_fpr}
                    for a in rep.attacks
                },
                "memorization": None
                if rep.memorization is None
                else {
                    "flagged": rep.memorization.flagged,
                    "dcr_share": rep.memorization.dcr_share,
                    "baseline": rep.memorization.baseline_flagged_fraction,
                },
                "passed": rep.passed,
                "train_seconds": round(train_s, 1),
                "audit_seconds": round(rep.seconds, 1),
            }
        )
        atomic_write_json(out / "summary.json", rows)
    attacks = sorted({a for r in rows for a in r["attacks"]})
    lines = [
        f"# Audit experiment {spec.get('name', '')}",
        "",
        f"{steps} steps per variant, delta {delta}; canaries: {spec.get('canaries')}.",
        "",
        "| variant | accountant eps | eps_LB (one-run / CP) | "
        + " | ".join(f"{a} AUC / TPR@1%" for a in attacks)
        + " | memorisation flagged, DCR | audit |",
        "| --- | --- | --- | " + " | ".join("---" for _ in attacks) + " | --- | --- |",
    ]

    def f(x: Any) -> str:
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    for r in rows:
        cells = [
            f"{f(r['attacks'][a]['auc'])} / {f(r['attacks'][a]['tpr_at_1pct_fpr'])}"
            if a in r["attacks"]
            else "-"
            for a in attacks
        ]
        mem = r["memorization"]
        mem_s = "-" if mem is None else f"{mem['flagged']}, {mem['dcr_share']:.3f}"
        lines.append(
            f"| {r['variant']} | {f(r['epsilon_accountant'])} | {f(r['eps_lb'])} "
            f"({f(r['eps_lb_one_run'])} / {f(r['eps_lb_cp'])}) | "
            + " | ".join(cells)
            + f" | {mem_s} | {'PASS' if r['passed'] else 'FAIL'} |"
        )
    path = out / "summary.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("spec", help="experiments/audit_*.yaml")
    p.add_argument("--out", required=True, help="output folder (one run directory per variant)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = run_audit_experiment(args.spec, args.out, args.device, not args.no_progress)
    print(path.read_text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
