"""Cost of a deployed round against the in-process simulation of the same config (benchmark).

Three sites on loopback, exactly as ``docs/deploy.md`` deploys them: ``flower-superlink`` with
TLS and ``--enable-supernode-auth``, registered SuperNode keys, per site ``securefed supernode
--isolation process`` (Runtime API auth secret) + ``securefed site-worker``; masking secure
aggregation and record-level DP-SGD (``secure_noise: true``). The same experiment then runs in
the in-process simulation (``securefed.run.run_experiment``), in the same process, after the
deployment (not at the same time: the two do not share the CPUs). Prints each round's wall
(``seconds.round_total`` of both ``metrics.jsonl``), the medians and, as its last line,
``ratio X.XX`` = median deployed round / median simulated round. It also prints the CPU time
all deployment processes (SuperLink, ServerApp, SuperNodes, workers) used per round, read from
``/proc`` (Linux): on an idle machine with C cores a round cannot take less than that / C;
and where a training stage's wall goes (:func:`stage_timeline`, from the site workers' logs):
the worker's task (pull, handle, push, report) and the gap between the last site's reply and
the next stage's first task, the transport's fixed cost per stage.

    python experiments/benchmarks/deploy_round_cost.py [--rounds 3] [--scale tiny|pilot]
        [--server-threat malicious|honest_but_curious] [--no-ahead] [--stock] [--keep DIR]

``--scale pilot`` runs the quickstart's round instead of the tiny one; ``--server-threat
honest_but_curious`` drops the consistency check (the sites opt in); ``--no-ahead`` sends every
round's start in its own message (five messages a round, the previous protocol).

``--stock``: Flower's defaults for comparison (``flower-supernode`` in subprocess isolation, a
``flwr-clientapp`` process per message, 3 s idle poll).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

from securefed.config import dump_config, parse_config
from securefed.deploy.loopback import LoopbackFederation
from securefed.run import run_experiment

#: the configuration of the issue's measurement (tests/test_deploy.py): 3 sites with 100
#: digits each, a UNet of 10,593 parameters, 2 local DP-SGD steps a round, 32-bit masking
EXPERIMENT: dict[str, Any] = {
    "name": "deploy-round-cost",
    "seed": 3,
    "device": "cpu",
    "data": {"name": "digits", "max_examples": 400, "holdout_fraction": 0.25},
    "partition": {"kind": "iid"},
    "model": {"base_channels": 8, "channel_mults": [1], "norm_groups": 4,
              "attention_levels": []},
    "diffusion": {"timesteps": 50},
    "federation": {"num_clients": 3, "rounds": 3, "fraction_fit": 1.0},
    "client": {"local_steps": 2, "batch_size": 16, "lr": 0.002},
    "strategy": {"name": "fedavg"},
    "secure_aggregation": {"protocol": "masking", "threshold": 0.7, "neighbours": "all",
                           "bits": 32, "clip_range": 1.0},
    "dp": {"level": "record", "target_epsilon": 8.0, "max_grad_norm": 1.0,
           "accountant": "rdp", "secure_noise": True},
    "evaluation": {"every": 100, "fid": False, "grid_samples": 4, "sampling_steps": 5,
                   "holdout_loss_examples": 32},
    "checkpoint": {"every": 1, "keep_last": 5},
}

#: ``--scale pilot``: the quickstart's round (its UNet of 16 channels x (1, 2), 12 local DP-SGD
#: steps of batch 64 on about 480 digits per site) with everything else as above: what a round
#: of a real pilot costs, where ``tiny`` measures the protocol's fixed cost per round
PILOT: dict[str, Any] = {
    "data": {"name": "digits", "holdout_fraction": 0.2},
    "model": {"base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
              "attention_levels": []},
    "diffusion": {"timesteps": 1000},
    "client": {"local_steps": 12, "batch_size": 64, "lr": 0.002, "optimizer": "adam"},
}


class CpuSampler:
    """CPU seconds used by every process in the given sessions (each LoopbackFederation process
    leads its own session), sampled every 0.2 s, and the total at each round's start."""

    def __init__(self, sessions: set[int], status: Path) -> None:
        self.sessions, self.status = sessions, status
        self.per_pid: dict[int, float] = {}
        self.session_of: dict[int, int] = {}
        self.marks: dict[Any, float] = {}
        self.session_marks: dict[Any, dict[int, float]] = {}
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def total(self) -> float:
        return sum(self.per_pid.values())

    def _sample(self) -> None:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(f[3]) in self.sessions:  # field 6 of stat: session id
                self.per_pid[int(d.name)] = (int(f[11]) + int(f[12])) / self._tick
                self.session_of[int(d.name)] = int(f[3])
        try:
            doc = json.loads(self.status.read_text())
        except (OSError, ValueError):
            return
        key = doc.get("round") if doc.get("stage") != "finished" else "finished"
        if key is not None and key not in self.marks:
            self.marks[key] = self.total()
            self.session_marks[key] = self.by_session()

    def by_session(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for pid, cpu in self.per_pid.items():
            out[self.session_of[pid]] = out.get(self.session_of[pid], 0.0) + cpu
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def stop(self) -> list[float]:
        """CPU seconds per round (from one round's start to the next's, or to the end)."""
        self._stop.set()
        self._thread.join()
        self._sample()
        starts = [self.marks[k] for k in sorted(k for k in self.marks if isinstance(k, int))]
        ends = [*starts[1:], self.marks.get("finished", self.total())]
        return [b - a for a, b in zip(starts, ends, strict=True)]


_TASK = re.compile(
    r"^(\S+ \S+) INFO securefed\.deploy\.worker: task (\d+) "
    r"(?:acquired|\((\S+)\) \S+ in ([\d.]+) s \(steps ([\d. ]+)\))$"
)


def stage_timeline(logs: Path) -> dict[str, float]:
    """Where a stage's wall goes, from the site workers' logs (``securefed site-worker`` logs
    each task's acquisition and its completion with the time of its steps: pull the message
    from the SuperNode, run the handler, push the reply, report the task's end).

    The k-th training task of every site is one stage. Returns medians over the training
    stages: ``task`` (acquired -> completed, per site), its ``pull``, ``handle``, ``push`` and
    ``report`` steps, and ``gap``: from the LAST site's completion of a stage to the FIRST
    site's acquisition of the next one, i.e. the SuperNode pushing the replies, the coordinator
    pulling them, deciding and pushing the next messages, and a SuperNode pulling one and its
    worker acquiring it: the transport's fixed cost per stage, whatever the computation."""
    per_site: list[list[dict[str, Any]]] = []
    for log in sorted(logs.glob("site_*_worker.log")):
        tasks: dict[str, dict[str, Any]] = {}
        for line in log.read_text().splitlines():
            m = _TASK.match(line)
            if m is None:
                continue
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            task = tasks.setdefault(m.group(2), {})
            if m.group(3) is None:
                task["acquired"] = t
            else:
                steps = [float(x) for x in m.group(5).split()]
                task.update(kind=m.group(3), completed=t, seconds=float(m.group(4)),
                            steps=steps)
        per_site.append([v for v in tasks.values()
                         if "acquired" in v and str(v.get("kind", "")).startswith("train.")])
    if not per_site or min(len(x) for x in per_site) < 2:
        return {}
    n = min(len(x) for x in per_site)
    stages = [[site[k] for site in per_site] for k in range(n)]
    out = {"stages": float(n), "task": statistics.median(
        t["seconds"] for st in stages for t in st)}
    for i, name in enumerate(("pull", "handle", "push", "report")):
        out[name] = statistics.median(t["steps"][i] for st in stages for t in st
                                      if len(t["steps"]) > i)
    out["gap"] = statistics.median(
        min(t["acquired"] for t in b) - max(t["completed"] for t in a)
        for a, b in itertools.pairwise(stages)
    )
    return out


def _rounds(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [float(r["seconds"]["round_total"]) for r in rows if "seconds" in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stock", action="store_true",
                    help="stock Flower: a flwr-clientapp process per message, 3 s idle poll")
    ap.add_argument("--idle-poll", type=float, default=0.1,
                    help="securefed supernode --idle-poll (seconds)")
    ap.add_argument("--keep", type=Path, help="keep every file under this folder")
    ap.add_argument("--server-threat", choices=["malicious", "honest_but_curious"],
                    default="malicious",
                    help="secure_aggregation.server_threat (honest_but_curious: no consistency "
                    "check; the sites opt in with allow-honest-but-curious-server)")
    ap.add_argument("--scale", choices=["tiny", "pilot"], default="tiny",
                    help="tiny: the issue's 10k-parameter round (2 steps); pilot: the "
                    "quickstart's round (12 steps of batch 64)")
    ap.add_argument("--no-ahead", action="store_true",
                    help="run config advertise-ahead=false: five messages every round")
    args = ap.parse_args()

    raw = json.loads(json.dumps(EXPERIMENT))
    raw["federation"]["rounds"] = args.rounds
    raw["secure_aggregation"]["server_threat"] = args.server_threat
    if args.scale == "pilot":
        raw.update(json.loads(json.dumps(PILOT)))
    cfg = parse_config(raw)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="deploy-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    exp = work / "experiment.yaml"
    exp.write_text(dump_config(cfg))
    print(f"config ({args.scale}): 3 sites, {args.rounds} rounds, masking + "
          "record-level DP (secure noise); TLS + SuperNode auth"
          + (", stock Flower" if args.stock else ", site worker + poll patch")
          + f"; server_threat {args.server_threat}, advertise-ahead {not args.no_ahead}",
          flush=True)

    opt_in = {"allow-honest-but-curious-server": True} if (
        args.server_threat == "honest_but_curious") else {}
    fed = LoopbackFederation(work / "fed", 3, worker=not args.stock,
                             idle_poll=None if args.stock else args.idle_poll,
                             node_config={i: {"partition-id": i, **opt_in} for i in range(3)})
    run_dir = work / "deployed"
    t0 = time.monotonic()
    try:
        fed.start()
        started = time.monotonic() - t0
        t1 = time.monotonic()
        sampler = CpuSampler(set(), run_dir / "status.json")
        popen = fed.flwr_run(exp, run_dir, {"stage-timeout": 120.0, "train-timeout": 300.0,
                                            "advertise-ahead": not args.no_ahead}, wait=False)
        sampler.sessions = {p.popen.pid for p in fed.procs.values()} | {popen.pid}
        fed.wait_finished(run_dir, timeout=600.0 + 300.0 * args.rounds)
        deployed_total = time.monotonic() - t1
        cpu = sampler.stop()
        names = {p.popen.pid: n for n, p in fed.procs.items()}
        first, last = sampler.session_marks.get(1, {}), sampler.by_session()
        if "finished" in sampler.session_marks:
            last = sampler.session_marks["finished"]
        n = max(1, len(cpu))
        print("CPU seconds per round, by process (and its children): " + ", ".join(
            f"{names.get(k, k)} {(v - first.get(k, 0.0)) / n:.2f}" for k, v in sorted(
                last.items(), key=lambda kv: -kv[1] + first.get(kv[0], 0.0))
        ))
    except BaseException:
        print(fed.logs(), file=sys.stderr)
        raise
    finally:
        fed.stop()
    timeline = stage_timeline(work / "fed" / "logs")
    t2, c2 = time.monotonic(), time.process_time()
    run_experiment(cfg, work / "simulated", progress=False, write_report=False)
    simulated_total, simulated_cpu = time.monotonic() - t2, time.process_time() - c2

    dep, sim = _rounds(run_dir), _rounds(work / "simulated")
    print(f"federation start (SuperLink, register, 3 sites): {started:.1f} s")
    print(f"end to end: deployed {deployed_total:.1f} s (flwr run, incl. setup), "
          f"simulated {simulated_total:.1f} s wall / {simulated_cpu:.1f} s CPU (run_experiment)")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"CPU cores: {os.cpu_count()}, load average now {load:.1f}")
    print("round  deployed_s  deployed_cpu_s  simulated_s")
    for i in range(max(len(dep), len(sim))):
        d = f"{dep[i]:.3f}" if i < len(dep) else "-"
        c = f"{cpu[i]:.2f}" if i < len(cpu) else "-"
        s = f"{sim[i]:.3f}" if i < len(sim) else "-"
        print(f"{i + 1:5d}  {d:>10}  {c:>14}  {s:>11}")
    md, ms = statistics.median(dep), statistics.median(sim)
    mc = statistics.median(cpu) if cpu else float("nan")
    print(f"median {md:10.3f}  {mc:14.2f}  {ms:11.3f}")
    # the next round's key advertisement is part of the previous round's unmasking, so the
    # sum over rounds is the honest total (the median is a steady-state round)
    print(f"sum    {sum(dep):10.3f}  {sum(cpu):14.2f}  {sum(sim):11.3f}  "
          f"(ratio of sums {sum(dep) / sum(sim):.2f})")
    if timeline:
        print(f"a training stage (medians over {timeline['stages']:.0f} stages, from the site "
              f"workers' logs): worker task {timeline['task']:.3f} s (pull "
              f"{timeline['pull']:.3f}, handle {timeline['handle']:.3f}, push "
              f"{timeline['push']:.3f}, report {timeline['report']:.3f}); gap from the last "
              f"site's reply to the next stage's first task {timeline['gap']:.3f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"ratio {md / ms:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
