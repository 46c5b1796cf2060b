"""Method comparison on digits: centralized, FedAvg, FedProx, SCAFFOLD, FedDDPM(+) with and
without DP, and the four FedDiffuse variants, over partitions and seeds.

    python experiments/compare.py [--seeds 0 1 2] [--partitions iid dir0.5 dir0.1]
                                  [--methods fedavg fedddpm ...] [--scale full|small|tiny|hetero]
                                  [--out runs/compare] [--readme docs/results.md]

Every run is a normal securefed run directory under ``OUT/<scale>/<partition>/<method>/seed<k>``;
a finished run (its line in ``OUT/<scale>/results.jsonl``) is not run again, so the script can
be interrupted and restarted. Output: ``OUT/<scale>/table.md`` (domain FID mean ± std over
seeds, precision/recall, server steps, parameters exchanged, wall time) and
``OUT/<scale>/fid_vs_round.png``; with ``--readme`` (``docs/results.md``, where the grid's table
lives) the table replaces the block between ``<!-- compare:begin -->`` and
``<!-- compare:end -->``.

Equal total client steps: every federated method runs ``rounds x local_steps`` steps on each of
10 clients; ``centralized`` (one client holding every member) runs ``10 x local_steps`` steps per
round. FedDDPM's phase-0 pre-training steps come on top and are listed in the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from securefed.config import parse_config  # noqa: E402
from securefed.io import atomic_write_text, read_jsonl  # noqa: E402
from securefed.run import run_experiment  # noqa: E402

PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"kind": "iid"},
    "dir0.5": {"kind": "dirichlet", "alpha": 0.5},
    "dir0.1": {"kind": "dirichlet", "alpha": 0.1},
    # one class per client (McMahan et al. 2017 shards): the heterogeneous regime
    "shards1": {"kind": "shards", "classes_per_client": 1},
}

_DDPM = {"fedddpm": {"enabled": True, "variant": "fedddpm"}}
_PLUS = {"fedddpm": {"enabled": True, "variant": "fedddpm_plus"}}

METHODS: dict[str, dict[str, Any]] = {
    "centralized": {"centralized": True},
    "fedavg": {"strategy": {"name": "fedavg"}},
    "fedprox": {"strategy": {"name": "fedprox"}},
    "scaffold": {"strategy": {"name": "scaffold"}},
    "fedddpm": _DDPM,
    "fedddpm_plus": _PLUS,
    "fedavg_dp": {"dp": True},
    # FedDDPM done well (heterogeneous regime): 30 phase-0 epochs (a usable auxiliary set),
    # the persistent server optimizer, a calibration budget of 10% of the client examples
    "fedddpm_pre30_f10": {"fedddpm": {"enabled": True, "variant": "fedddpm",
                                      "pretrain_epochs": 30, "calibration_fraction": 0.1}},
    "fedddpm_pre30_f10_fresh": {"fedddpm": {"enabled": True, "variant": "fedddpm",
                                            "pretrain_epochs": 30, "calibration_fraction": 0.1,
                                            "server_optimizer_state": "fresh"}},
    "fedddpm_plus_pre30": {"fedddpm": {"enabled": True, "variant": "fedddpm_plus",
                                       "pretrain_epochs": 30}},
    # FedDDPM+ with a detector that can fire within the hetero regime's 4 rounds: the aux-holdout
    # loss is compared over ONE round and a drop under 5% counts as slow learning (the default
    # window 2 / 2% needs a plateau the 4 rounds never reach: docs/guide.md, FedDDPM+). One-shot
    # correction of 60 server steps (c160: FedDDPM pre30_f10's whole 4 x 40 budget at once)
    "fedddpm_plus_pre30_w1": {"fedddpm": {"enabled": True, "variant": "fedddpm_plus",
                                          "pretrain_epochs": 30, "detector_window": 1,
                                          "detector_threshold": 0.05}},
    "fedddpm_plus_pre30_w1c160": {"fedddpm": {"enabled": True, "variant": "fedddpm_plus",
                                              "pretrain_epochs": 30, "detector_window": 1,
                                              "detector_threshold": 0.05,
                                              "correction_steps": 160}},
    # calibration-budget ablation (server examples per round as a fraction of the clients')
    "fedddpm_pre30_f05": {"fedddpm": {"enabled": True, "variant": "fedddpm",
                                      "pretrain_epochs": 30, "calibration_fraction": 0.05}},
    "fedddpm_pre30_f20": {"fedddpm": {"enabled": True, "variant": "fedddpm",
                                      "pretrain_epochs": 30, "calibration_fraction": 0.2}},
    # FedAvg at FedDDPM's client compute in the hetero regime: 4 x 74 local steps = the 4 x 40
    # federated steps plus fedddpm_pre30's 1,352 phase-0 steps spread over rounds (2,960 / 10)
    "fedavg_eq74": {"client": {"local_steps": 74}},
    "fedddpm_dp": {**_DDPM, "dp": True},
    # the done-well FedDDPM under record-level DP at epsilon 10 (phase 0 charged to the budget)
    "fedddpm_pre30_f10_dp": {"fedddpm": {"enabled": True, "variant": "fedddpm",
                                         "pretrain_epochs": 30, "calibration_fraction": 0.1},
                             "dp": True},
    "fedddpm_plus_dp": {**_PLUS, "dp": True},
    # under DP from a PUBLIC pre-trained start (``pretrain:``, mnist5k in the UCI layout, the
    # quickstart's 600 central steps, cached): the global model AND every phase-0 local model
    # start from the public model; fewer phase-0 epochs may suffice from that start
    "fedavg_pub_dp": {"pub": True, "dp": True},
    "fedddpm_pre30_f10_pub_dp": {"fedddpm": {"enabled": True, "variant": "fedddpm",
                                             "pretrain_epochs": 30, "calibration_fraction": 0.1},
                                 "pub": True, "dp": True},
    "fedddpm_pre10_f10_pub_dp": {"fedddpm": {"enabled": True, "variant": "fedddpm",
                                             "pretrain_epochs": 10, "calibration_fraction": 0.1},
                                 "pub": True, "dp": True},
    "fedddpm_plus_pre30_w1_pub_dp": {"fedddpm": {"enabled": True, "variant": "fedddpm_plus",
                                                 "pretrain_epochs": 30, "detector_window": 1,
                                                 "detector_threshold": 0.05},
                                     "pub": True, "dp": True},
    "fedddpm_pre3_f10_pub_dp": {"fedddpm": {"enabled": True, "variant": "fedddpm",
                                            "pretrain_epochs": 3, "calibration_fraction": 0.1},
                                "pub": True, "dp": True},
    "feddiffuse_full": {"feddiffuse": {"enabled": True, "variant": "full"}},
    "feddiffuse_usplit": {"feddiffuse": {"enabled": True, "variant": "usplit"}},
    "feddiffuse_udec": {"feddiffuse": {"enabled": True, "variant": "udec"}},
    "feddiffuse_ulatdec": {"feddiffuse": {"enabled": True, "variant": "ulatdec"}},
}
DEFAULT_METHODS = [
    m for m in METHODS if m != "fedavg_dp" and "pre30" not in m and "_pub" not in m
]

#: the public pre-training of the ``*_pub*`` methods: the quickstart's (same model, same cache
#: key), so one cached public model serves every seed and method
PUBLIC_PRETRAIN: dict[str, Any] = {
    "enabled": True,
    "data": {"name": "mnist5k", "mnist5k_layout": "uci_digits"},
    "steps": 600,
    "batch_size": 128,
    "lr": 0.002,
}

#: rounds, local steps, FID samples, FID every k rounds. ``full`` is the 90-minute grid: its
#: 102 runs measured 2026-12-01 on 2 cores with ``--jobs 2`` (docs/results.md, comparison
#: grid). At 10 x 8 the grid needed ~96 minutes (DP runs ~210-240 s, UDEC/ULATDEC ~140 s for 10
#: per-client FIDs).
SCALES: dict[str, dict[str, int]] = {
    "full": {"rounds": 8, "local_steps": 8, "fid_samples": 300, "fid_every": 4},
    "small": {"rounds": 6, "local_steps": 8, "fid_samples": 200, "fid_every": 3},
    "tiny": {"rounds": 2, "local_steps": 2, "fid_samples": 50, "fid_every": 1},
    # few rounds of many local steps (40 x 32 examples: ~9 epochs of a ~144-image client): client
    # drift, so label skew costs FedAvg (docs/results.md, heterogeneous regime)
    "hetero": {"rounds": 4, "local_steps": 40, "fid_samples": 300, "fid_every": 4},
}


def register_sweep(name: str) -> None:
    """Add a sweep method to ``METHODS``: ``fedddpm_cal<k>`` (``calibration_steps: k``) or
    ``fedddpm_pre<k>`` (``pretrain_epochs: k``)."""
    for prefix, key in (("fedddpm_cal", "calibration_steps"), ("fedddpm_pre", "pretrain_epochs")):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            METHODS[name] = {"fedddpm": {"enabled": True, "variant": "fedddpm",
                                         key: int(name[len(prefix):])}}
            return
    raise SystemExit(f"results.jsonl: unknown method {name!r} (not in METHODS, not a sweep)")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_raw(
    method: str, partition: str, seed: int, scale: str, spec: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The raw config of one cell of the grid (``spec`` overrides ``METHODS[method]``)."""
    raw = yaml.safe_load((ROOT / "experiments" / "compare_digits.yaml").read_text())
    sc = SCALES[scale]
    spec = dict(METHODS[method] if spec is None else spec)
    raw = _merge(
        raw,
        {
            "name": f"compare-{method}-{partition}-s{seed}",
            "seed": seed,
            "partition": PARTITIONS[partition],
            "federation": {"rounds": sc["rounds"]},
            "client": {"local_steps": sc["local_steps"]},
            "evaluation": {"num_fid_samples": sc["fid_samples"], "fid_every": sc["fid_every"],
                           "every": sc["fid_every"]},
        },
    )
    if spec.pop("centralized", False):
        n = raw["federation"]["num_clients"]
        raw = _merge(raw, {"partition": {"kind": "iid"}, "federation": {"num_clients": 1},
                           "client": {"local_steps": sc["local_steps"] * n}})
    if spec.pop("pub", False):
        raw = _merge(raw, {"pretrain": PUBLIC_PRETRAIN})
    if spec.pop("dp", False):
        raw = _merge(raw, yaml.safe_load((ROOT / "experiments" / "compare_dp.yaml").read_text()))
    return _merge(raw, spec)


def summarize_run(rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Final metrics, FID per round and totals of one run's metrics lines."""
    train = [r for r in rows if r["round"] > 0]
    final = train[-1]
    server = final.get("server", {})
    return {
        "fid": final.get("fid"),
        "fid_worst": final.get("fid_worst"),
        "precision": final.get("precision"),
        "recall": final.get("recall"),
        "holdout_loss": final.get("holdout_loss"),
        "fid_curve": [[r["round"], r["fid"]] for r in rows if "fid" in r],
        "server_steps": int(server.get("server_steps_total", 0)),
        "params_exchanged": int(
            sum(r["exchange"]["params_up"] + r["exchange"]["params_down"] for r in train)
        ),
        "params_up": int(sum(r["exchange"]["params_up"] for r in train)),
        "wall_seconds": round(wall, 2),
    }


def aux_quality(run_dir: Path) -> dict[str, float] | None:
    """Domain FID / precision / recall of a FedDDPM run's auxiliary set against the holdout
    (the same evaluator the run uses): how good the data the server calibrates on is."""
    npz = run_dir / "auxiliary" / "auxiliary.npz"
    if not npz.exists():
        return None
    from securefed.builders import cache_dir, prepare_data
    from securefed.metrics import SampleEvaluator

    cfg = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    data = prepare_data(cfg)
    ev = SampleEvaluator(
        data.members.images, data.members.labels, data.holdout.images, data.holdout.labels,
        data.members.num_classes, dataset_fingerprint=data.members.fingerprint(),
        cfg=cfg.evaluation, cache_dir=cache_dir() / "featnets", seed=cfg.seed,
        device=torch.device("cpu"),
    )
    with np.load(npz) as z:
        imgs = torch.from_numpy(z["images"])
    rep = ev.evaluate(imgs).as_dict()
    return {k: float(rep[k]) for k in ("fid", "precision", "recall") if rep.get(k) is not None}


def run_cell(
    method: str, partition: str, seed: int, scale: str, out: Path,
    spec: dict[str, Any] | None = None, threads: int = 1,
) -> dict[str, Any]:
    """Run one cell in a fresh run directory and summarise it (also the worker entry point
    of ``--jobs``: everything it needs comes in its arguments)."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    cfg = parse_config(build_raw(method, partition, seed, scale, spec))
    run_dir = out / partition / method / f"seed{seed}"
    if run_dir.exists():  # an interrupted attempt: start over in a fresh directory
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    res = run_experiment(cfg, run_dir, progress=False, write_report=False)
    wall = time.perf_counter() - t0
    summary = summarize_run(res.metrics, wall)
    meta = run_dir / "auxiliary" / "meta.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        summary["pretrain_steps"] = int(
            sum(c.get("pretrain_steps", 0) for c in m["clients"].values())
        )
        summary["phase0_seconds"] = m.get("seconds")
        summary["aux"] = aux_quality(run_dir)
    return {"method": method, "partition": partition, "seed": seed, "scale": scale, **summary}


def _ms(vals: list[float]) -> str:
    v = [x for x in vals if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}"


def make_table(results: list[dict[str, Any]], methods: list[str], partitions: list[str]) -> str:
    """Markdown table: one row per (partition, method)."""
    lines = [
        "| partition | method | seeds | domain FID | worst client FID | precision | recall | "
        "server steps | params exchanged (M) | vs FedAvg | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for part in partitions:
        ref = [r for r in results if r["method"] == "fedavg" and r["partition"] == part]
        ref_params = np.mean([r["params_exchanged"] for r in ref]) if ref else None
        for m in methods:
            src = "iid" if m == "centralized" else part
            rs = [r for r in results if r["method"] == m and r["partition"] == src]
            if not rs:
                continue
            params = float(np.mean([r["params_exchanged"] for r in rs]))
            rel = f"{params / ref_params:.2f}x" if ref_params and m != "centralized" else "-"
            lines.append(
                f"| {part} | {m} | {len(rs)} | {_ms([r['fid'] for r in rs])} | "
                f"{_ms([r.get('fid_worst') for r in rs])} | "
                f"{_ms([100 * r['precision'] for r in rs if r['precision'] is not None])}% | "
                f"{_ms([100 * r['recall'] for r in rs if r['recall'] is not None])}% | "
                f"{int(np.mean([r['server_steps'] for r in rs]))} | "
                f"{params / 1e6:.2f} | {rel} | {np.mean([r['wall_seconds'] for r in rs]):.0f} |"
            )
    return "\n".join(lines)


def aux_table(results: list[dict[str, Any]], out: Path) -> str:
    """FedDDPM rows, mean ± std over seeds: quality of the auxiliary set against the final
    model, and the cost of phase 0."""
    lines = [
        "| partition | method | seeds | aux-set FID | aux precision | aux recall | model FID | "
        "pretrain steps (all clients) | phase 0 s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, float]]]] = {}
    for r in results:
        if not r["method"].startswith("fedddpm"):
            continue
        aux = r.get("aux") or aux_quality(out / r["partition"] / r["method"] / f"seed{r['seed']}")
        if aux:
            groups.setdefault((r["partition"], r["method"]), []).append((r, aux))
    order = {m: i for i, m in enumerate(METHODS)}
    parts = {p: i for i, p in enumerate(PARTITIONS)}
    for (part, m) in sorted(groups, key=lambda pm: (parts[pm[0]], order[pm[1]])):
        rows = groups[(part, m)]
        lines.append(
            f"| {part} | {m} | {len(rows)} | {_ms([a['fid'] for _, a in rows])} | "
            f"{_ms([100 * a['precision'] for _, a in rows if 'precision' in a])}% | "
            f"{_ms([100 * a['recall'] for _, a in rows if 'recall' in a])}% | "
            f"{_ms([r['fid'] for r, _ in rows])} | "
            f"{np.mean([r.get('pretrain_steps', 0) for r, _ in rows]):.0f} | "
            f"{np.mean([r.get('phase0_seconds') or 0 for r, _ in rows]):.0f} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def plot_fid(results: list[dict[str, Any]], partitions: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(partitions), figsize=(5 * len(partitions), 4.2), squeeze=False)
    order = {m: i for i, m in enumerate(METHODS)}
    methods = sorted({r["method"] for r in results}, key=lambda m: order.get(m, len(order)))
    # one fixed colour + line style per method in every panel (tab20 has 20 distinct colours)
    cmap = plt.get_cmap("tab20")
    style = {m: (cmap(i % 20), "-" if i < 10 else "--") for i, m in enumerate(methods)}
    for ax, part in zip(axes[0], partitions, strict=True):
        for m in methods:
            src = "iid" if m == "centralized" else part
            curves = [r["fid_curve"] for r in results if r["method"] == m and r["partition"] == src]
            if not curves:
                continue
            rounds = sorted({c[0] for cur in curves for c in cur})
            mean = [np.mean([v for cur in curves for (k, v) in cur if k == rd]) for rd in rounds]
            ax.plot(rounds, mean, marker="o", label=m, color=style[m][0], linestyle=style[m][1])
        ax.set_title(f"{part}")
        ax.set_xlabel("round")
        if ax is axes[0][0]:
            ax.set_ylabel("domain FID (mean over seeds)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    handles, labels = [], []
    for ax in axes[0]:  # the union of the panels' lines, in METHODS order
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def update_readme(readme: Path, block: str) -> None:
    begin, end = "<!-- compare:begin -->", "<!-- compare:end -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme}: no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(readme, f"{head}{begin}\n{block}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--partitions", nargs="+", default=["iid", "dir0.5", "dir0.1"],
                    choices=list(PARTITIONS))
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    ap.add_argument("--scale", default="full", choices=list(SCALES))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    ap.add_argument("--readme", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument(
        "--jobs", type=int, default=1,
        help="runs in parallel (separate processes); --jobs 2 --threads 1 on 2 cores",
    )
    ap.add_argument(
        "--calibration-sweep", type=int, nargs="*", default=[],
        help="also run fedddpm with these calibration_steps (methods fedddpm_cal<k>)",
    )
    ap.add_argument(
        "--pretrain-sweep", type=int, nargs="*", default=[],
        help="also run fedddpm with these phase-0 pretrain_epochs (methods fedddpm_pre<k>): "
        "how much a better auxiliary set helps, at extra client cost",
    )
    ap.add_argument(
        "--table-only", action="store_true",
        help="run nothing: rebuild the table and plot from results.jsonl (every method and "
        "partition found there)",
    )
    args = ap.parse_args(argv)
    sweeps = [f"fedddpm_cal{k}" for k in args.calibration_sweep]
    sweeps += [f"fedddpm_pre{k}" for k in args.pretrain_sweep]
    for name in sweeps:
        register_sweep(name)
        args.methods.append(name)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = args.out / args.scale
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.jsonl"
    results = read_jsonl(res_path) if res_path.exists() else []
    for r in results:
        if r["method"] not in METHODS:
            register_sweep(r["method"])
    if args.table_only:
        if not results:
            raise SystemExit(f"--table-only: no results in {res_path}; run the grid first")
        args.partitions = [p for p in PARTITIONS if any(r["partition"] == p for r in results)]
        args.seeds = sorted({r["seed"] for r in results})
        args.methods = []
    done = {(r["method"], r["partition"], r["seed"]) for r in results}
    cells = []
    for seed in args.seeds:
        for part in args.partitions:
            for m in args.methods:
                key = (m, "iid" if m == "centralized" else part, seed)
                if key not in done and key not in {(c[0], c[1], c[2]) for c in cells}:
                    cells.append(key)
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit(f"--jobs {args.jobs} / --threads {args.threads}: both must be >= 1")
    t_all = time.perf_counter()

    def record(i: int, r: dict[str, Any]) -> None:
        results.append(r)
        with res_path.open("a") as fh:  # one line per finished run, written by this process only
            fh.write(json.dumps(r) + "\n")
        print(
            f"[{i}/{len(cells)}] done {r['method']} {r['partition']} seed {r['seed']}: "
            f"fid {r['fid']} worst {r.get('fid_worst')} server_steps {r['server_steps']} "
            f"params {r['params_exchanged']} wall {r['wall_seconds']} s "
            f"(elapsed {time.perf_counter() - t_all:.0f} s)",
            flush=True,
        )

    failed: list[tuple[str, str, int, str]] = []

    def failure(i: int, cell: tuple[str, str, int], exc: BaseException) -> None:
        # one broken cell must not lose the others: report it, go on, exit non-zero at the end
        failed.append((*cell, f"{type(exc).__name__}: {exc}"))
        print(f"[{i}/{len(cells)}] FAILED {cell[0]} {cell[1]} seed {cell[2]}: "
              f"{type(exc).__name__}: {exc}", flush=True)
        traceback.print_exception(exc)

    if args.jobs == 1:
        for i, (m, part, seed) in enumerate(cells, 1):
            print(f"[{i}/{len(cells)}] {m} {part} seed {seed} ...", flush=True)
            try:
                record(i, run_cell(m, part, seed, args.scale, out, METHODS[m], args.threads))
            except Exception as exc:  # reported and counted, see failure()
                failure(i, (m, part, seed), exc)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {
                pool.submit(run_cell, m, part, seed, args.scale, out, METHODS[m], args.threads):
                (m, part, seed)
                for (m, part, seed) in cells
            }
            print(f"{len(cells)} runs on {args.jobs} workers x {args.threads} threads", flush=True)
            for i, fut in enumerate(as_completed(futs), 1):
                exc = fut.exception()
                if exc is None:
                    record(i, fut.result())
                else:
                    failure(i, futs[fut], exc)
    if cells:
        print(f"grid: {len(cells)} runs in {time.perf_counter() - t_all:.0f} s wall", flush=True)
    parts = args.partitions
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    table = make_table(results, methods, parts)
    sc = SCALES[args.scale]
    note = (
        f"_Scale `{args.scale}`: digits 8x8, 10 clients, {sc['rounds']} rounds x "
        f"{sc['local_steps']} local steps (batch 32), UNet base 16 channels, FID on "
        f"{sc['fid_samples']} DDIM-25 samples vs the holdout; seeds {sorted(args.seeds)}._"
    )
    aux = aux_table(results, out)
    if aux:
        table += "\n\nAuxiliary-set quality (FedDDPM runs):\n\n" + aux
    atomic_write_text(out / "table.md", note + "\n\n" + table + "\n")
    plot_fid(results, parts, out / "fid_vs_round.png")
    print(note)
    print(table)
    if args.readme is not None:
        update_readme(args.readme, note + "\n\n" + table)
    if failed:
        print(f"{len(failed)} run(s) FAILED (not in results.jsonl; rerun to retry them):")
        for m, part, seed, why in failed:
            print(f"  {m} {part} seed {seed}: {why}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
