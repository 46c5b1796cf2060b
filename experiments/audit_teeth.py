"""Audits with teeth: lying and honest record-level DP runs at realistic scale, audited with
white-box gradient canaries (issue 15, item 4).

Each variant trains the project's own DP-SGD trainer (256 members, Poisson batch 64, clip 1,
Adam, ``--steps`` steps, ``--canaries`` Dirac gradient canaries) and writes a run directory
whose ledger CLAIMS epsilon (at delta 1e-5) for the calibrated noise multiplier; the run itself
uses:

- ``lying_noise0``: no noise at all, claims epsilon 1;
- ``lying_quarter``: a quarter of the epsilon-1 noise, claims epsilon 1;
- ``honest_eps1`` / ``honest_eps8``: the calibrated noise.

Every run is audited by ``run_audit`` against ``external_released_model`` (four attacks, 256
members vs 256 non-members) at audit delta 1e-6; the table gives the canaries' eps_LB, the
accountant's epsilon at the audit delta, the TRUE epsilon of the noise used, the ``dp-holds``
outcome and the whole audit's verdict; honest variants are repeated over ``--seeds`` seeds for
the false-alarm rate.

    python experiments/audit_teeth.py --out runs/audit_teeth --seeds 5

``--level client`` (client-level DP, DP-FedAvg): each variant is a real ``securefed run``
(``run_experiment``: the federation, the trainer, the aggregation protocol, the ledger) with
``--clients`` clients of ``--per-client`` records, ``--per-round`` of them selected per round
for ``--rounds`` rounds, ``dp.level: client`` calibrated to the claimed epsilon, and
``--canaries`` canary clients (:class:`securefed.privacy.canaries.CanaryClients`). The lying
variants run the aggregation through
:class:`~securefed.audit.harness.UnderNoisedProtocol` (noise times 0 or 1/4) while the ledger
charges the calibrated noise. ``dp-holds`` is judged from the canary clients alone; the attacks
of the whole audit run on ``--max-examples`` members and non-members.

    python experiments/audit_teeth.py --level client --out runs/audit_teeth_client --seeds 10
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = {
    "lying_noise0": 0.0,
    "lying_quarter": 0.25,
    "honest_eps1": 1.0,
    "honest_eps8": 1.0,
}
CLAIMED = {"lying_noise0": 1.0, "lying_quarter": 1.0, "honest_eps1": 1.0, "honest_eps8": 8.0}
LEDGER_DELTA = 1e-5


def _config(seed: int, steps: int, eps: float, lr: float) -> Any:
    from securefed.config import parse_config

    return parse_config(
        {
            "name": "audit-teeth",
            "seed": seed,
            "data": {"name": "digits", "max_examples": 512, "holdout_fraction": 0.5},
            "partition": {"kind": "iid"},
            "model": {"base_channels": 8, "channel_mults": [1, 2], "norm_groups": 4},
            "diffusion": {"timesteps": 100},
            "federation": {"num_clients": 1, "rounds": 1},
            "client": {"local_steps": steps, "batch_size": 64, "lr": lr},
            "dp": {
                "level": "record",
                "target_epsilon": eps,
                "delta": LEDGER_DELTA,
                "max_grad_norm": 1.0,
                "secure_noise": True,
            },
            "evaluation": {"fid": False},
        }
    )


def run_variant(
    name: str, seed: int, out: Path, steps: int, m: int, lr: float, audit: dict[str, Any]
) -> dict[str, Any]:
    from securefed.audit.harness import train_model, write_run_dir
    from securefed.audit.runner import AuditSettings, run_audit
    from securefed.audit.threats import load_threat_model
    from securefed.builders import prepare_data
    from securefed.client.dp import sample_rate_for
    from securefed.privacy import calibrate_noise_multiplier, epsilon_of

    t0 = time.perf_counter()
    claimed = CLAIMED[name]
    cfg = _config(seed, steps, claimed, lr)
    data = prepare_data(cfg)
    q = sample_rate_for(cfg.client, len(data.members))
    sigma_claimed = calibrate_noise_multiplier(claimed, LEDGER_DELTA, q, steps, "prv")
    sigma = VARIANTS[name] * sigma_claimed
    trained = train_model(
        cfg, data.members, steps=steps, seed=seed, noise_multiplier=sigma, gradient_canaries=m
    )
    train_s = time.perf_counter() - t0
    run_dir = write_run_dir(
        out / f"{name}_s{seed}", cfg, trained, ledger_noise_multiplier=sigma_claimed,
        ledger_target_epsilon=claimed,
    )
    st = AuditSettings(**{"progress": False, "seed": seed, **audit})
    rep = run_audit(run_dir, [load_threat_model("external_released_model")], st)
    true_eps = (
        float("inf") if sigma == 0 else epsilon_of([(sigma, q, steps)], st.audit_delta, "prv")
    )
    return _row(rep, name, seed, sigma, sigma_claimed, true_eps, train_s)


def _row(
    rep: Any, name: str, seed: int, used: float, claimed: float, true_eps: float,
    train_s: float, **extra: Any,
) -> dict[str, Any]:
    """One table row from an audit report (``extra``: level-specific columns)."""
    eps = rep.epsilon
    dp = next(c for c in rep.criteria if c.id == "dp-holds")
    return {
        "variant": name,
        "seed": seed,
        "sigma_used": used,
        "sigma_claimed": claimed,
        "claimed_eps_ledger_delta": eps.get("accountant_ledger"),
        "accountant_eps_audit_delta": eps.get("accountant"),
        "true_eps_audit_delta": true_eps,
        "eps_lb": eps.get("eps_lb"),
        "ceiling": eps.get("ceiling"),
        "eps_est": eps.get("eps_est"),
        "v_r": f"{eps['one_run']['v']}/{eps['one_run']['r']}",
        **extra,
        "dp_holds": dp.outcome,
        "audit": "PASS" if rep.passed else "FAIL",
        "failed": sorted(c.id for c in rep.criteria if not c.passed),
        "train_s": round(train_s, 1),
        "audit_s": round(rep.seconds, 1),
    }


def _client_config(
    seed: int, eps: float, clients: int, per_client: int, per_round: int, rounds: int,
    local_steps: int, m: int,
) -> Any:
    from securefed.config import parse_config

    return parse_config(
        {
            "name": "audit-teeth-client",
            "seed": seed,
            "data": {"name": "digits", "max_examples": 2 * clients * per_client,
                     "holdout_fraction": 0.5},
            "partition": {"kind": "iid"},
            "model": {"base_channels": 8, "channel_mults": [1, 2], "norm_groups": 4},
            "diffusion": {"timesteps": 100},
            "federation": {"num_clients": clients, "rounds": rounds,
                           "fraction_fit": per_round / clients, "min_fit_clients": per_round},
            "client": {"local_steps": local_steps, "batch_size": 16, "lr": 0.003},
            "secure_aggregation": {"protocol": "plain"},
            "dp": {"level": "client", "target_epsilon": eps, "delta": LEDGER_DELTA,
                   "max_update_norm": 0.5},
            "canaries": {"enabled": True, "m": m},
            "evaluation": {"fid": False, "every": 1000, "grid_samples": 4,
                           "sampling_steps": 2},
            "checkpoint": {"every": 1000},
        }
    )


def run_client_variant(
    name: str, seed: int, out: Path, args: argparse.Namespace, audit: dict[str, Any]
) -> dict[str, Any]:
    """One client-level variant: a real run (lying ones under-noised), then ``run_audit``."""
    import shutil

    from securefed.audit.harness import under_noised_runs
    from securefed.audit.runner import AuditSettings, run_audit
    from securefed.audit.threats import load_threat_model
    from securefed.privacy import PrivacyLedger, epsilon_of
    from securefed.run import run_experiment

    t0 = time.perf_counter()
    claimed = CLAIMED[name]
    cfg = _client_config(seed, claimed, args.clients, args.per_client, args.per_round,
                         args.rounds, args.local_steps, args.canaries)
    run_dir = out / f"client_{name}_s{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    with under_noised_runs(VARIANTS[name]):
        run_experiment(cfg, run_dir, progress=False, write_report=False)
    train_s = time.perf_counter() - t0
    st = AuditSettings(**{"progress": False, "seed": seed, **audit})
    rep = run_audit(run_dir, [load_threat_model("external_released_model")], st)
    eps = rep.epsilon
    led = PrivacyLedger.load(run_dir / "privacy_ledger.json")
    z_claimed = float(led.get_plan(led.clients[0]).noise_multiplier)
    z_used = VARIANTS[name] * z_claimed
    # the noise actually used, charged like the ledger charges (worst canary's participations)
    best = max((b for b in eps.get("bounds", [])), key=lambda b: b["eps_lb"], default={})
    k_max = int(eps.get("canary_participations_max") or 0)
    true_eps = (
        float("inf") if z_used == 0
        else epsilon_of([(z_used, 1.0, max(1, k_max))], st.audit_delta, "prv")
    )
    cos = (best.get("andrew_cosine") or {}).get("eps_est")
    return {"level": "client", **_row(rep, name, seed, z_used, z_claimed, true_eps, train_s,
                                      cosine_est=cos, participations_max=k_max)}


def table(rows: list[dict[str, Any]]) -> str:
    def f(x: Any) -> str:
        if isinstance(x, float):
            return "inf" if x == float("inf") else f"{x:.2f}"
        return str(x)

    lines = [
        "| variant | seed | noise used / claimed | claimed eps (delta 1e-5) | accountant eps at "
        "audit delta 1e-6 | true eps at 1e-6 | canary eps_LB (v/r) | Gaussian-fit est. | "
        "dp-holds | audit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    client = any(r.get("level") == "client" for r in rows)
    if client:
        lines[0] = lines[0].replace("Gaussian-fit est. |", "Gaussian-fit est. / cosine est. |")
    for r in rows:
        est = f(r["eps_est"])
        if client:
            est += f" / {f(r.get('cosine_est'))}"
        lines.append(
            f"| {r['variant']} | {r['seed']} | {f(r['sigma_used'])} / {f(r['sigma_claimed'])} | "
            f"{f(r['claimed_eps_ledger_delta'])} | {f(r['accountant_eps_audit_delta'])} | "
            f"{f(r['true_eps_audit_delta'])} | **{f(r['eps_lb'])}** ({r['v_r']}) | "
            f"{est} | {r['dp_holds']} | {r['audit']} |"
        )
    honest = [r for r in rows if r["variant"].startswith("honest")]
    lying = [r for r in rows if r["variant"].startswith("lying")]
    if honest:
        fa = sum(r["dp_holds"] != "PASS" for r in honest)
        fa_all = sum(r["audit"] != "PASS" for r in honest)
        lines += [
            "",
            f"Honest runs: dp-holds false alarms {fa}/{len(honest)}; whole-audit false alarms "
            f"{fa_all}/{len(honest)}.",
        ]
    if lying:
        caught = sum(r["dp_holds"] == "FAIL" for r in lying)
        lines.append(f"Lying runs caught by dp-holds: {caught}/{len(lying)}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--seeds", type=int, default=1, help="seeds of the honest variants")
    p.add_argument("--lying-seeds", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--max-examples", type=int, default=256)
    p.add_argument("--bootstrap", type=int, default=100)
    p.add_argument("--level", choices=("record", "client"), default="record")
    p.add_argument("--clients", type=int, default=20, help="client level: real clients")
    p.add_argument("--per-client", type=int, default=32, help="client level: records each")
    p.add_argument("--per-round", type=int, default=10, help="client level: selected per round")
    p.add_argument("--rounds", type=int, default=20, help="client level: rounds")
    p.add_argument("--local-steps", type=int, default=2, help="client level: local steps")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    audit = {"max_examples": args.max_examples, "bootstrap": args.bootstrap}
    rows: list[dict[str, Any]] = []
    path = out / "teeth.json"
    if path.exists():
        rows = json.loads(path.read_text())
    done = {(r["variant"], r["seed"]) for r in rows}
    names = args.variants.split(",")
    for seed in range(max(args.seeds, args.lying_seeds)):
        for name in names:
            n_seeds = args.seeds if name.startswith("honest") else args.lying_seeds
            if seed >= n_seeds or (name, seed) in done:
                continue
            if args.level == "client":
                rows.append(run_client_variant(name, seed, out, args, audit))
            else:
                rows.append(
                    run_variant(name, seed, out, args.steps, args.canaries, args.lr, audit)
                )
            path.write_text(json.dumps(rows, indent=1))
            print(json.dumps(rows[-1]), flush=True)
    text = table(sorted(rows, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"])))
    (out / "teeth.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
