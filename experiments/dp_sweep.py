"""Privacy-utility sweep: run experiments/dp_sweep.yaml at several epsilons, table + plot.

    python experiments/dp_sweep.py --out runs/dp_sweep [--epsilons 1 4 10 inf] [--summary-only]

Every point uses the same schedule (rounds x local steps), so only the noise differs; ``inf`` is
the same run with ``dp.level: none``. Finished runs (``report.md`` present) are not re-run.
Writes ``OUT/dp_sweep.md`` (markdown table) and ``OUT/dp_sweep.png`` (FID and precision vs
epsilon).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from securefed.config import load_config
from securefed.io import atomic_write_text
from securefed.privacy import PrivacyLedger
from securefed.run import run_experiment

CONFIG = Path(__file__).with_name("dp_sweep.yaml")


def _label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def run_point(out: Path, eps: float, config: Path, seed: int | None = None) -> Path:
    """Run (or reuse) one sweep point; returns its run directory (``seed`` overrides the
    config's run seed; the run directory is then ``eps_<e>_s<seed>``)."""
    run_dir = out / point_dir(eps, seed)
    if (run_dir / "report.md").exists():
        print(f"[dp_sweep] epsilon={_label(eps)}: reusing {run_dir}")
        return run_dir
    overrides: dict[str, Any] = {"name": f"dp_sweep_eps_{_label(eps)}"}
    if seed is not None:
        overrides["seed"] = seed
    if math.isinf(eps):
        overrides["dp.level"] = "none"
    else:
        overrides["dp.target_epsilon"] = eps
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    print(f"[dp_sweep] epsilon={_label(eps)}: training into {run_dir}", flush=True)
    run_experiment(cfg, run_dir)
    print(f"[dp_sweep] epsilon={_label(eps)}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def point_dir(eps: float, seed: int | None = None) -> str:
    """``eps_<e>`` (the config's seed) or ``eps_<e>_s<seed>``."""
    return f"eps_{_label(eps)}" + ("" if seed is None else f"_s{seed}")


def summarise(run_dir: Path) -> dict[str, Any]:
    """Final-round metrics, wall time and the worst client epsilon of one run."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]
    wall = sum(float(r.get("seconds", {}).get("round_total", 0.0)) for r in rows)
    ledger_path = run_dir / "privacy_ledger.json"
    eps_spent = None
    sigma = None
    if ledger_path.exists():
        ledger = PrivacyLedger.load(ledger_path)
        eps_spent = max(ledger.epsilon(c) for c in ledger.clients)
        sigma = max(ledger.get_plan(c).noise_multiplier for c in ledger.clients)
    return {
        "fid": final.get("fid"),
        "precision": final.get("precision"),
        "recall": final.get("recall"),
        "holdout_loss": final.get("holdout_loss"),
        "rounds": final["round"],
        "epsilon_spent": eps_spent,
        "noise_multiplier": sigma,
        "wall_s": wall,
    }


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def write_outputs(out: Path, points: dict[float, dict[str, Any]]) -> str:
    lines = [
        "| target epsilon | epsilon spent (max client) | noise multiplier (max) | domain FID | "
        "precision | recall | holdout loss | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for eps in sorted(points):
        p = points[eps]
        lines.append(
            f"| {_label(eps)} | {_fmt(p['epsilon_spent'])} | {_fmt(p['noise_multiplier'])} | "
            f"{_fmt(p['fid'])} | {_fmt(p['precision'])} | {_fmt(p['recall'])} | "
            f"{_fmt(p['holdout_loss'])} | {p['wall_s']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "dp_sweep.md", table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted(e for e in points if not math.isinf(e))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, key in enumerate(("fid", "precision")):
        xs = [e for e in finite if points[e][key] is not None]
        ax[i].plot(xs, [points[e][key] for e in xs], "o-", label="record-level DP-SGD")
        inf = points.get(math.inf)
        if inf is not None and inf[key] is not None:
            ax[i].axhline(inf[key], color="gray", ls="--", label="no DP (epsilon = inf)")
        ax[i].set_xscale("log")
        ax[i].set_xlabel("target epsilon per client")
        ax[i].set_ylabel("domain FID (lower is better)" if key == "fid" else "precision")
        ax[i].legend(fontsize=8)
    fig.suptitle("Privacy-utility: digits, FedAvg, 10 clients, equal steps")
    fig.tight_layout()
    tmp = out / "dp_sweep.png.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out / "dp_sweep.png")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/dp_sweep"))
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--epsilons", nargs="+", default=["1", "4", "10", "inf"])
    ap.add_argument(
        "--summary-only", action="store_true", help="only tabulate finished runs under --out"
    )
    ap.add_argument(
        "--seed", type=int, default=None,
        help="run seed (default: the config's); run directories become eps_<e>_s<seed>",
    )
    args = ap.parse_args(argv)
    try:
        epsilons = [math.inf if e == "inf" else float(e) for e in args.epsilons]
    except ValueError as exc:
        ap.error(f"--epsilons: numbers or 'inf', got {args.epsilons} ({exc})")
    if any(e <= 0 for e in epsilons):
        ap.error(f"--epsilons: must be > 0, got {args.epsilons}")
    args.out.mkdir(parents=True, exist_ok=True)
    points: dict[float, dict[str, Any]] = {}
    for eps in epsilons:
        run_dir = args.out / point_dir(eps, args.seed)
        if not args.summary_only:
            run_dir = run_point(args.out, eps, args.config, args.seed)
        if (run_dir / "metrics.jsonl").exists():
            points[eps] = summarise(run_dir)
    if not points:
        print(f"[dp_sweep] no finished runs under {args.out}")
        return 1
    print(write_outputs(args.out, points))
    print(f"[dp_sweep] wrote {args.out / 'dp_sweep.md'} and {args.out / 'dp_sweep.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
