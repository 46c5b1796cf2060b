"""The deployment's ServerApp/ClientApp under Flower's Simulation Runtime (Ray backend).

The same Flower App that a pilot runs over SuperLink + SuperNodes (:mod:`securefed.deploy`) runs
here against *virtual* SuperNodes that Flower's Simulation Runtime hosts in Ray actors: the way
to simulate hundreds of sites across all cores, GPUs or a Ray cluster with exactly the deployed
code path (coordinator, masking protocol, site handlers, ledgers).

What differs from a deployment, and why it is not a security boundary:

- Virtual SuperNodes have no ``--node-config`` of their own (Flower gives them only
  ``partition-id`` / ``num-partitions``). A site process takes its state and key folders from
  the run config (``sim-state-root``, ``sim-keys-dir``) **only** when its own environment says
  it is a simulation (``SECUREFED_SIMULATION_RUNTIME=1``, set by :class:`FlowerSimulation` for
  the processes it starts). A real SuperNode never reads them, so a coordinator cannot choose
  where a real site keeps its ledger.
- All virtual sites share one machine (or one Ray cluster) and one key folder; the SuperLink
  runs without TLS on 127.0.0.1. Use it to simulate, never to protect real data.

Use :class:`FlowerSimulation` (also ``securefed flower-sim``) or, by hand::

    SECUREFED_SIMULATION_RUNTIME=1 flower-superlink --insecure --simulation ...
    flwr run securefed/deploy/app <connection> --federation-config "num-supernodes=N" \\
        --run-config 'experiment="..." run-dir="..." keys-dir="K" sim-keys-dir="K" \\
                      sim-state-root="S"'

To use a Ray cluster, start it (``ray start --head`` / ``ray start --address ...``), set
``RAY_ADDRESS`` in the environment of the SuperLink, and give each virtual site its resources
with ``--federation-config "client-resources-num-cpus=1 client-resources-num-gpus=0.25"``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from securefed.artefacts.rundir import RunDir
from securefed.deploy.loopback import (
    APP_DIR,
    RunEndedEarly,
    config_pairs,
    end_session,
    free_port,
    wait_for_finished,
)
from securefed.errors import SecurefedError
from securefed.io import atomic_write_text

__all__ = [
    "SIMULATION_ENV",
    "SITE_CONFIG_ENV",
    "FlowerSimulation",
    "SimulationRuntimeError",
    "site_node_config",
]

#: set to ``1`` in a site process's own environment to let a virtual SuperNode take its folders
#: from the run config (see the module docstring)
SIMULATION_ENV = "SECUREFED_SIMULATION_RUNTIME"
#: JSON object of extra ``--node-config`` entries (policy knobs such as ``min-cohort``) for every
#: virtual site, from the site processes' own environment, never from the coordinator
SITE_CONFIG_ENV = "SECUREFED_SIMULATION_SITE_CONFIG"
_CONNECTION = "securefed-sim"


class SimulationRuntimeError(SecurefedError, RuntimeError):
    """The Simulation Runtime could not run the federation (the message says where to look)."""


def site_node_config(
    node_config: Mapping[str, Any], run_config: Mapping[str, Any]
) -> dict[str, Any]:
    """The site's ``--node-config``, filled in for a virtual SuperNode of the Simulation Runtime.

    A SuperNode with its own ``state-dir`` (every real site) gets its node config unchanged. A
    virtual SuperNode (Flower gives it ``partition-id`` and ``num-partitions`` only) gets
    ``state-dir = <sim-state-root>/site_<partition-id>``, ``keys-dir = <sim-keys-dir>`` and
    ``partition-id``, and only when its process environment has ``SECUREFED_SIMULATION_RUNTIME=1``.

    Raises:
        ValueError: a virtual SuperNode outside a simulation, or a missing run-config key.
    """
    nc = dict(node_config)
    if "state-dir" in nc or "num-partitions" not in nc:
        return nc
    if os.environ.get(SIMULATION_ENV) != "1":
        raise ValueError(
            "--node-config state-dir: required; this SuperNode has only Flower's simulation "
            f"keys {sorted(nc)}. Give the site its own --node-config (docs/deploy.md), or run "
            f"the Simulation Runtime with {SIMULATION_ENV}=1 (securefed flower-sim)"
        )
    root, keys = run_config.get("sim-state-root"), run_config.get("sim-keys-dir")
    for key, value in (("sim-state-root", root), ("sim-keys-dir", keys)):
        if not str(value or "").strip():
            raise ValueError(
                f"run config {key}: required under the Simulation Runtime; pass flwr run "
                f"--run-config '{key}=\"/abs/path\"' (securefed flower-sim sets it)"
            )
    pid = int(nc["partition-id"])
    try:
        extra = json.loads(os.environ.get(SITE_CONFIG_ENV) or "{}")
    except ValueError:
        extra = None
    if not isinstance(extra, dict):
        raise ValueError(f"{SITE_CONFIG_ENV}: expected a JSON object of --node-config entries, "
                         f"e.g. '{{\"min-cohort\": 2}}'")
    bad = sorted({"state-dir", "keys-dir", "partition-id", "client-id"} & set(extra))
    if bad:
        raise ValueError(f"{SITE_CONFIG_ENV}: {bad} are set per virtual site; remove them")
    out = {k: v for k, v in nc.items() if k not in ("partition-id", "num-partitions")}
    out.update(extra)
    out.update({
        "state-dir": str(Path(str(root)) / f"site_{pid}"),
        "keys-dir": str(keys),
        "partition-id": pid,
    })
    return out


@dataclass
class FlowerSimulation:
    """One experiment through the deployed ServerApp/ClientApp on ``num_sites`` virtual
    SuperNodes of Flower's Simulation Runtime (Ray), all on this machine.

    Args:
        work: folder for the SuperLink, keys, site states and logs (created).
        num_sites: virtual SuperNodes (site i trains on partition i, as the simulation does).
        cpus_per_site: Ray resources per virtual site (``client-resources-num-cpus``); sites
            beyond ``cores / cpus_per_site`` wait for a free actor.
        gpus_per_site: Ray GPU share per virtual site.
        ray_cpus: CPUs Ray may use in all (default: every core).
        site_config: extra ``--node-config`` entries of every virtual site (its policy knobs,
            e.g. ``{"min-cohort": 2}``), passed in the sites' own environment.
        keep_keys: keep the key folder of an earlier session in ``work`` (a resumed run: the
            same roster at every party); default False: fresh keys every start.
    """

    work: Path
    num_sites: int
    cpus_per_site: int = 1
    gpus_per_site: float = 0.0
    ray_cpus: int | None = None
    site_config: Mapping[str, Any] = field(default_factory=dict)
    startup_timeout: float = 60.0
    keep_keys: bool = False
    _procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        self.bin = Path(sys.executable).parent
        self.keys_dir = self.work / "keys"
        self.state_root = self.work / "sites"
        self.flwr_home = self.work / "flwr-home"
        self.logs = self.work / "logs"

    def site_state_dir(self, i: int) -> Path:
        return self.state_root / f"site_{i}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_HOME"] = str(self.flwr_home)
        env[SIMULATION_ENV] = "1"
        env[SITE_CONFIG_ENV] = json.dumps(dict(self.site_config))
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
        env.setdefault("RAY_DEDUP_LOGS", "0")
        return env

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        fh = (self.logs / f"{name}.log").open("ab")
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=self._env(),
                                 start_new_session=True, cwd=self.work)
        self._procs.append((popen, fh))
        return popen

    def log_tail(self, tail: int = 4000) -> str:
        out = []
        for p in sorted(self.logs.glob("*.log")) + sorted(self.flwr_home.rglob("*.log")):
            out.append(f"==== {p.name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def federation_config(self) -> str:
        """``flwr run --federation-config``: the virtual SuperNodes and their Ray resources."""
        values: dict[str, Any] = {
            "num-supernodes": int(self.num_sites),
            "client-resources-num-cpus": int(self.cpus_per_site),
            "client-resources-num-gpus": float(self.gpus_per_site),
        }
        if self.ray_cpus is not None:
            values["init-args-num-cpus"] = int(self.ray_cpus)
        return config_pairs(values)

    def start(self) -> FlowerSimulation:
        """Keys for every virtual site, and a simulation-mode SuperLink on free local ports."""
        # lazy: keeps securefed --help fast (the CLI parser imports this module)
        from securefed.secagg.keys import ROSTER_FILE, init_identity_keys

        self.work.mkdir(parents=True, exist_ok=True)
        if not (self.keep_keys and (self.keys_dir / ROSTER_FILE).is_file()):
            init_identity_keys(self.keys_dir, self.num_sites, overwrite=True)
        port = free_port()
        link = self._spawn("superlink", [
            str(self.bin / "flower-superlink"), "--insecure", "--simulation",
            "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
            "--health-server-address", f"127.0.0.1:{free_port()}",
            "--disable-runtime-dependency-installation",
        ])
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if link.poll() is not None:
                raise SimulationRuntimeError(f"flower-superlink exited early\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SimulationRuntimeError(
                        f"flower-superlink did not listen within {self.startup_timeout:g} s\n"
                        f"{self.log_tail()}"
                    ) from None
                time.sleep(0.2)
        atomic_write_text(
            self.flwr_home / "config.toml",
            f'[superlink]\ndefault = "{_CONNECTION}"\n\n[superlink.{_CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n',
        )
        return self

    def run(self, experiment: Path, run_dir: Path, run_config: Mapping[str, Any] | None = None,
            *, timeout: float = 1800.0, progress: bool = False) -> dict[str, Any]:
        """``flwr run`` the deployment App on the virtual sites; returns the coordinator's final
        ``status.json`` once it says ``finished``.

        Raises:
            SimulationRuntimeError: the run ended early or did not finish in ``timeout``.
        """
        run_dir = Path(run_dir).resolve()
        values: dict[str, Any] = {
            "experiment": str(Path(experiment).resolve()),
            "run-dir": str(run_dir),
            "keys-dir": str(self.keys_dir),
            "sim-keys-dir": str(self.keys_dir),
            "sim-state-root": str(self.state_root),
        }
        values.update(run_config or {})
        since = time.time()  # a resumed run dir holds an earlier session's status
        popen = self._spawn("flwr-run", [
            str(self.bin / "flwr"), "run", str(APP_DIR), _CONNECTION,
            "--run-config", config_pairs(values), "--federation-config", self.federation_config(),
            "--stream",
        ])
        def show(doc: dict[str, Any]) -> None:
            print(f"[flower-sim] {doc}", flush=True)

        try:
            return wait_for_finished(run_dir, popen, timeout, show if progress else None,
                                     since=since)
        except RunEndedEarly:
            raise SimulationRuntimeError(
                f"flwr run ended before the coordinator finished\n{self.log_tail()}"
            ) from None
        except TimeoutError:
            raise SimulationRuntimeError(f"the run did not finish within {timeout:g} s; logs in "
                                         f"{self.logs}\n{self.log_tail()}") from None

    def stop(self) -> None:
        """Stop the SuperLink, ``flwr run`` and every child (Ray included)."""
        for popen, fh in reversed(self._procs):
            end_session(popen)
            fh.close()
        self._procs.clear()

    def __enter__(self) -> FlowerSimulation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_flower_sim_parser(subparsers: Any) -> None:
    """``securefed flower-sim``: an experiment through the deployed App on virtual SuperNodes."""
    p = subparsers.add_parser(
        "flower-sim",
        help="run an experiment through the Flower deployment App on virtual SuperNodes "
        "(Flower's Simulation Runtime, Ray): the deployed code path at simulation scale",
    )
    p.add_argument("config", help="experiment YAML (one virtual site per federation.num_clients)")
    p.add_argument("--out", help="run directory (default runs/<name>-flower-sim)")
    p.add_argument("--work", help="SuperLink, keys, site states and logs (default <out>.flower)")
    p.add_argument("--cpus-per-site", type=int, default=1,
                   help="Ray CPUs per virtual site (default 1)")
    p.add_argument("--gpus-per-site", type=float, default=0.0,
                   help="Ray GPU share per virtual site, e.g. 0.25 (default 0)")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="CPUs Ray may use in all (default: every core; omit with RAY_ADDRESS)")
    p.add_argument("--site-config", action="append", default=[], metavar="KEY=VALUE",
                   help="a --node-config entry of every virtual site, e.g. min-cohort=2 "
                   "(repeatable; the site policy knobs of docs/deploy.md)")
    p.add_argument("--timeout", type=float, default=6 * 3600.0,
                   help="seconds before giving up (default 6 h)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its latest checkpoint, with "
                   "the same --work (sites' states and keys); run config resume=true")
    p.set_defaults(func=cli_flower_sim)


def cli_flower_sim(args: Any) -> int:
    # lazy: keeps securefed --help fast (the CLI parser imports this module)
    from securefed.config import load_config

    cfg = load_config(args.config)
    out = Path(args.out or Path("runs") / f"{cfg.name}-flower-sim")
    work = Path(args.work) if args.work else out.parent / f"{out.name}.flower"
    if args.resume:
        if RunDir(out).is_new() or not (work / "sites").is_dir():
            raise SimulationRuntimeError(
                f"--resume: --out {out} (with --work {work}) holds no interrupted run to "
                "continue; give the --out and --work of that run, or drop --resume"
            )
    elif not RunDir(out).is_new():
        raise FileExistsError(f"--out {out}: exists and is not empty; choose a new run "
                              "directory, or --resume to continue the run in it")
    n = cfg.federation.num_clients
    site_config: dict[str, Any] = {}
    for item in args.site_config:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SimulationRuntimeError(f"--site-config {item!r}: expected KEY=VALUE, e.g. "
                                         "min-cohort=2")
        site_config[key.strip()] = value.strip()
    print(f"[flower-sim] {n} virtual sites, Ray resources {args.cpus_per_site} CPU / "
          f"{args.gpus_per_site} GPU each; logs in {work / 'logs'}", flush=True)
    t0 = time.monotonic()
    with FlowerSimulation(work, n, cpus_per_site=args.cpus_per_site,
                          gpus_per_site=args.gpus_per_site, ray_cpus=args.ray_cpus,
                          site_config=site_config, keep_keys=args.resume) as fed:
        status = fed.run(Path(args.config), out, {"resume": True} if args.resume else None,
                         timeout=args.timeout, progress=True)
    print(f"[flower-sim] finished round {status.get('round')} in "
          f"{time.monotonic() - t0:.1f} s: {out}")
    return 0
