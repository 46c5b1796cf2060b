"""``report.md`` and its plots for a run directory (regenerable: ``securefed report RUN_DIR``)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml

from securefed.artefacts.rundir import RunDir
from securefed.federation.record import RoundRecord, read_records
from securefed.io import atomic_write_bytes, atomic_write_text
from securefed.privacy import PrivacyLedger
from securefed.report.audit_section import audit_section

__all__ = [
    "plot_epsilon",
    "plot_label_histogram",
    "plot_training_curves",
    "write_run_report",
]


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_training_curves(rows: list[RoundRecord], path: Path) -> Path:
    """Loss (local and holdout) per round, and FID per round when measured."""
    has_fid = any(r.fid is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_fid else 1, figsize=(10 if has_fid else 5.5, 3.6))
    ax_loss = axes[0] if has_fid else axes
    tr = [(r.round, r.mean_local_loss) for r in rows if r.mean_local_loss is not None]
    ho = [(r.round, r.holdout_loss) for r in rows if r.holdout_loss is not None]
    if tr:
        ax_loss.plot(*zip(*tr, strict=True), marker=".", label="mean local loss (members)")
    if ho:
        ax_loss.plot(*zip(*ho, strict=True), marker="o", label="holdout denoising loss")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("epsilon-prediction MSE")
    ax_loss.set_title("Denoising loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if has_fid:
        fid = [(r.round, r.fid) for r in rows if r.fid is not None]
        axes[1].plot(*zip(*fid, strict=True), marker="o", color="tab:red")
        axes[1].set_xlabel("round")
        axes[1].set_ylabel("domain FID vs holdout")
        axes[1].set_title("FID (lower is better)")
        axes[1].set_yscale("log")
        axes[1].grid(alpha=0.3, which="both")
    _save_fig(fig, path)
    return path


def plot_label_histogram(hist: dict[str, Any], path: Path) -> Path:
    """Stacked bars: examples per class on each client (the non-IID-ness of the partition)."""
    counts = np.asarray(hist["counts"])
    names = hist.get("class_names") or [str(i) for i in range(counts.shape[1])]
    k, c = counts.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * k + 2), 3.6))
    bottom = np.zeros(k)
    cmap = plt.get_cmap("tab10" if c <= 10 else "tab20")
    for j in range(c):
        ax.bar(np.arange(k), counts[:, j], bottom=bottom, color=cmap(j % cmap.N), label=names[j])
        bottom += counts[:, j]
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.set_xticks(np.arange(k))
    ax.set_title("Per-client label histogram")
    if c <= 20:
        ax.legend(ncol=1, fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", title="class")
    _save_fig(fig, path)
    return path


def plot_epsilon(rows: list[RoundRecord], target: float | None, path: Path) -> Path:
    """Epsilon spent by each client after each round (the privacy ledger over time)."""
    eps = [(r.round, r.epsilon) for r in rows if r.epsilon is not None]
    clients = sorted({c for _, e in eps for c in e}, key=int)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for c in clients:
        pts = [(rnd, e[c]) for rnd, e in eps if c in e]
        ax.plot(*zip(*pts, strict=True), marker=".", label=f"client {c}")
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", label="target epsilon")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.set_title("Record-level privacy budget")
    ax.grid(alpha=0.3)
    if len(clients) <= 12:
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    _save_fig(fig, path)
    return path


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def write_run_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` (+ ``curves.png``, ``label_histogram.png``) for a run directory."""
    run_dir = Path(run_dir)
    RunDir(run_dir).require_run()
    cfg_path = RunDir(run_dir).config
    cfg = yaml.safe_load(cfg_path.read_text())
    rows = read_records(RunDir(run_dir).metrics)
    train_rows = [r for r in rows if r.round > 0]
    lines = [f"# Run report: {cfg.get('name', run_dir.name)}", ""]
    data, fed = cfg["data"], cfg["federation"]
    part, strat = cfg["partition"], cfg["strategy"]
    sec = cfg.get("secure_aggregation", {})
    model_info = {}
    if RunDir(run_dir).model_info.exists():
        model_info = json.loads(RunDir(run_dir).model_info.read_text())
    lines += _first_screen(run_dir, cfg, rows)
    lines += [
        "| setting | value |",
        "| --- | --- |",
        f"| dataset | {data['name']} (holdout fraction {data['holdout_fraction']}) |",
        f"| clients | {fed['num_clients']} (fraction per round {fed['fraction_fit']}, "
        f"dropout probability {fed['dropout_prob']}) |",
        f"| partition | {part['kind']}"
        + (f", alpha={part['alpha']}" if part["kind"] in ("dirichlet", "quantity_skew") else "")
        + " |",
        f"| strategy | {strat['name']} (server lr {strat['server_lr']}) |",
        f"| secure aggregation | {sec.get('protocol', 'plain')} |",
        f"| rounds completed | {train_rows[-1].round if train_rows else 0} of {fed['rounds']} |",
        f"| model parameters | {model_info.get('parameters', '-')} |",
        "",
    ]
    final = train_rows[-1] if train_rows else None
    if final is not None:
        lines += ["## Final round", ""]
        keys = [
            "holdout_loss",
            "fid",
            "precision",
            "recall",
            "class_coverage",
            "feature_net_accuracy",
        ]
        lines += ["| metric | value |", "| --- | --- |"]
        values = {"holdout_loss": final.holdout_loss, **final.evaluation}
        lines += [f"| {k} | {_fmt(values[k])} |" for k in keys if values.get(k) is not None]
        start = next((r for r in rows if r.round == 0), None)
        if start is not None and start.fid is not None and final.fid is not None:
            lines.append(
                f"| FID untrained -> final | {start.fid:.3g} -> {final.fid:.3g} "
                f"(ratio {final.fid / start.fid:.3f}) |"
            )
        lines.append("")
    samples = sorted(RunDir(run_dir).samples.glob("round_*.png"))
    if samples:
        lines += [
            "## Samples",
            "",
            f"![samples]({samples[-1].relative_to(run_dir)})",
            "",
            f"_{samples[-1].stem}; earlier grids in `samples/`._",
            "",
        ]
    if train_rows:
        plot_training_curves(rows, run_dir / "curves.png")
        lines += ["## Training curves", "", "![curves](curves.png)", ""]
    dp = cfg.get("dp", {})
    if any(r.epsilon is not None for r in rows):
        plot_epsilon(rows, dp.get("target_epsilon"), run_dir / "privacy.png")
        lines += [
            "## Differential privacy",
            "",
            f"Record-level DP-SGD: target epsilon {dp.get('target_epsilon')}, clip "
            f"{dp.get('max_grad_norm')}, noise multiplicity {dp.get('noise_multiplicity')}, "
            f"{dp.get('accountant')} accountant, "
            + (
                "secure (AES-256-CTR CSPRNG) noise and Poisson sampling."
                if dp.get("secure_noise")
                else "**insecure (Mersenne Twister) noise: for tests only**."
            ),
            "",
            _dp_guarantee_statement(dp),
            "",
            "![epsilon per round](privacy.png)",
            "",
        ]
        ledger_path = RunDir(run_dir).ledger
        if ledger_path.exists():
            lines += ["```", PrivacyLedger.load(ledger_path).table(), "```", ""]
    lines += _fedddpm_section(run_dir, cfg, train_rows)
    stopped = RunDir(run_dir).stopped
    if stopped.exists():
        lines += [f"**Stopped early:** {json.loads(stopped.read_text())['reason']}", ""]
    hist_path = RunDir(run_dir).label_histogram
    if hist_path.exists():
        plot_label_histogram(json.loads(hist_path.read_text()), run_dir / "label_histogram.png")
        lines += ["## Data partition", "", "![label histogram](label_histogram.png)", ""]
    if train_rows:
        up = sum(r.bytes_up or 0 for r in train_rows)
        down = sum(r.bytes_down or 0 for r in train_rows)
        dropped = sum(len(r.dropped or []) for r in train_rows)
        abandoned = sum(1 for r in train_rows if r.abandoned)
        recovered = sum(
            int((r.protocol_info or {}).get("dropouts_recovered", 0)) for r in train_rows
        )
        uploads = sum(len(r.participants or []) for r in train_rows) or 1
        proto = sec.get("protocol", "plain")
        lines += [
            "## Secure aggregation and communication",
            "",
            f"Protocol `{proto}`"
            + (
                f" (threshold {sec.get('threshold')}, neighbours {sec.get('neighbours')}, "
                f"{sec.get('bits')}-bit modulus, clip range ±{sec.get('clip_range')})"
                if proto == "masking"
                else ""
            )
            + f": {up / 1e6:.2f} MB up and {down / 1e6:.2f} MB down in total, "
            f"{up / uploads / 1e6:.3f} MB up per participating client per round "
            f"({up / len(train_rows) / 1e6:.2f} MB per round). "
            f"{dropped} client dropouts handled"
            + (
                f" ({recovered} masks reconstructed from Shamir shares)"
                if proto == "masking"
                else ""
            )
            + f"; {abandoned} rounds abandoned.",
            "",
            "## Per round",
            "",
            "| round | participants | local loss | holdout loss | FID | seconds |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            lines.append(
                f"| {r.round} | {len(r.participants or [])} | "
                f"{_fmt(r.mean_local_loss)} | {_fmt(r.holdout_loss)} | "
                f"{_fmt(r.fid)} | {r.total_seconds:.1f} |"
            )
        lines.append("")

    lines += audit_section(run_dir)
    out = RunDir(run_dir).report
    atomic_write_text(out, "\n".join(lines))
    return out


def _first_screen(run_dir: Path, cfg: dict[str, Any], rows: list[RoundRecord]) -> list[str]:
    """Final samples next to real holdout images, one sentence on what was learned and at what
    privacy cost, and (with public pre-training) the public/private relation and the
    public-only model's FID next to the federated result."""
    out: list[str] = []
    samples = sorted(RunDir(run_dir).samples.glob("round_*.png"))
    holdout = RunDir(run_dir).holdout_grid
    if samples and holdout.exists():
        out += [
            f"| final samples ({samples[-1].stem}) | real holdout images (never trained on) |",
            "| --- | --- |",
            f"| ![samples]({samples[-1].relative_to(run_dir)}) | "
            f"![holdout]({holdout.relative_to(run_dir)}) |",
            "",
        ]
    train = [r for r in rows if r.round > 0]
    start = next((r for r in rows if r.round == 0), None)
    final = train[-1] if train else RoundRecord(round=0)
    start_fid = None if start is None else start.fid
    public = None
    if RunDir(run_dir).public_pretrain.exists():
        public = json.loads(RunDir(run_dir).public_pretrain.read_text())
    eps = final.epsilon or {}
    dp = cfg.get("dp", {})
    if dp.get("level") == "record" and eps:
        cost = (f"at a record-level privacy cost of epsilon <= {max(eps.values()):.2f} per client "
                f"(target {dp.get('target_epsilon')})")
    elif dp.get("level") == "client":
        cost = f"under client-level DP (target epsilon {dp.get('target_epsilon')})"
    else:
        cost = "**without differential privacy**"
    if final.fid is not None:
        what = "the public-only model" if public else "the untrained model"
        before = f"domain FID {start_fid:.2f} ({what}) -> " if start_fid is not None else ""
        precision = final.evaluation.get("precision")
        prec = f", precision {precision:.2f}" if precision is not None else ""
        out += [
            f"**What was learned:** {before}{final.fid:.2f}{prec} against the real holdout "
            f"after {final.round} federated rounds on {cfg['federation']['num_clients']} "
            f"clients, {cost}.",
            "",
        ]
    if public:
        verdict = ""
        if start_fid is not None and final.fid is not None:
            verdict = (
                " Federated DP fine-tuning improved on the public-only model "
                f"({start_fid:.2f} -> {final.fid:.2f})."
                if final.fid < start_fid
                else " **Federated fine-tuning did NOT improve on the public-only model** "
                f"({start_fid:.2f} -> {final.fid:.2f})."
            )
        layout = f", layout {public['layout']}" if public.get("layout") else ""
        out += [
            f"**Public pre-training:** {public['examples']} images of `{public['dataset']}`"
            f"{layout}, {public['steps']} central steps"
            + (" (from the cache)" if public.get("cached") else f" ({public['seconds']} s)")
            + f"; uncharged. {public['relation'][0].upper()}{public['relation'][1:]}.{verdict}",
            "",
        ]
    return out


def _fedddpm_section(
    run_dir: Path, cfg: dict[str, Any], train_rows: list[RoundRecord]
) -> list[str]:
    """FedDDPM auxiliary-set grid + per-round server compute; FedDiffuse exchange totals."""
    lines: list[str] = []
    aux_dir = RunDir(run_dir).auxiliary
    fd = cfg.get("fedddpm", {})
    if (aux_dir / "meta.json").exists():
        meta = json.loads((aux_dir / "meta.json").read_text())
        n = sum(c.get("aux_images", 0) for c in meta.get("clients", {}).values())
        lines += [
            "## FedDDPM auxiliary set",
            "",
            f"Variant `{fd.get('variant')}`, upload `{meta.get('upload')}` "
            f"({'DP-SGD local models' if meta.get('dp') else '**non-DP local models**'}): "
            f"{n} images from {len(meta.get('clients', {}))} clients, n_i proportional to client "
            f"size, {meta.get('sampler')} {meta.get('sampling_steps')} steps; "
            f"{meta.get('upload_bytes_total', 0) / 1e6:.2f} MB uploaded in phase 0 "
            f"({meta.get('seconds', '-')} s). Stored in `auxiliary/auxiliary.npz`; the server "
            "saw every client's upload individually.",
            "",
        ]
        if (aux_dir / "grid.png").exists():
            lines += ["![auxiliary set](auxiliary/grid.png)", ""]
    server = [
        (r.round, r.server) for r in train_rows if r.server and "server_steps" in r.server
    ]
    if server:
        total = server[-1][1].get("server_steps_total", 0)
        secs = server[-1][1].get("server_seconds_total", 0.0)
        lines += [
            f"Server calibration: {total} steps in {secs:.2f} s over {len(server)} rounds.",
            "",
        ]
        fired = [(rnd, s.get("corrected")) for rnd, s in server if s.get("corrected")]
        for rnd, why in fired:
            lines.append(f"- round {rnd}: FedDDPM+ correction ({why})")
        if "server_steps_saved_vs_fedddpm" in server[-1][1]:
            lines += [
                f"- server steps saved against FedDDPM: "
                f"{server[-1][1]['server_steps_saved_vs_fedddpm']}",
            ]
        lines.append("")
    ex = [r.exchange for r in train_rows if r.exchange is not None]
    if ex and cfg.get("feddiffuse", {}).get("enabled"):
        up = sum(e["params_up"] for e in ex)
        down = sum(e["params_down"] for e in ex)
        lines += [
            "## FedDiffuse exchange",
            "",
            f"Variant `{cfg['feddiffuse']['variant']}`: {up} parameters up and {down} down in "
            f"total ({(up + down) / len(ex):.0f} per round).",
            "",
        ]
        worst = [
            r.evaluation["fid_worst"] for r in train_rows
            if r.evaluation.get("fid_worst") is not None
        ]
        if worst:
            lines += [f"Worst client FID (final): {worst[-1]:.3g}.", ""]
    return lines


def _dp_guarantee_statement(dp: dict[str, Any]) -> str:
    """What the reported epsilon means: delta, the adjacency, and what is NOT protected."""
    delta = dp.get("delta")
    d = (
        f"delta = {delta:g} (configured)"
        if delta is not None
        else "delta = min(1e-5, 1/(10 n)) for a client with n examples (per client in the table)"
    )
    if dp.get("level") == "client":
        unit = (
            "adding or removing ONE CLIENT's whole dataset (client-level DP-FedAvg); the number "
            "of participating clients is public"
        )
    else:
        unit = (
            "adding or removing ONE RECORD of that client's dataset (record-level DP-SGD, "
            "per client)"
        )
    return (
        f"Epsilon is stated at {d} under {unit}. Client dataset sizes are NOT protected: they "
        "are released in the clear (FedAvg weights, `num_examples`, FedDDPM auxiliary "
        "allocation) and treated as public."
    )
