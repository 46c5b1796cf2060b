"""A whole deployment on one machine (127.0.0.1): rehearsal for a pilot, and the test harness.

:class:`LoopbackFederation` does what the pilot guide (``docs/deploy.md``) asks each party to
do, with real processes and the real credentials, only on loopback:

1. ``securefed keys tls`` (CA, SuperLink certificate for ``127.0.0.1``/``localhost``, SuperNode
   authentication keys) and ``securefed keys init`` (secure-aggregation signing keys + roster);
   each party gets only its own private keys (copied into its own folder, 0600);
2. ``flower-superlink`` with TLS and ``--enable-supernode-auth``;
3. ``flwr supernode register`` of every SuperNode's public key;
4. per site: ``securefed supernode`` (``flower-supernode`` with the flwr 1.41 poll patch,
   ``--isolation process``, TLS, its auth key, its ``--node-config``, a Runtime API auth
   secret) and ``securefed site-worker`` beside it (one warm process serving every message);
   ``worker=False`` starts the stock ``flower-supernode`` instead (a ``flwr-clientapp`` process
   per message, for comparison);
5. ``flwr run securefed/deploy/app`` with the experiment, run dir and key folder as run config.

Every process runs in its own session and is killed with its children (SuperExec, ClientApp
processes) by :meth:`LoopbackFederation.stop` or :meth:`kill_site` (SuperNode and worker).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securefed.artefacts.rundir import RunDir
from securefed.deploy.tls import write_tls_material
from securefed.io import atomic_write_bytes, atomic_write_text

__all__ = ["APP_DIR", "LoopbackFederation", "RunEndedEarly", "config_pairs", "end_session",
           "free_port", "kill_session", "wait_for_finished"]

#: the Flower App folder (``flwr run APP_DIR ...``)
APP_DIR = Path(__file__).resolve().parent / "app"
CONNECTION = "loopback"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def config_pairs(values: Mapping[str, Any]) -> str:
    """``k=v ...`` with TOML values: the form of ``--node-config`` / ``--run-config``."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


def kill_session(popen: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process's whole session (the leader may be gone while its children
    live on); wait up to 10 s, then SIGKILL the session."""
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait(timeout=10)


def end_session(popen: subprocess.Popen[bytes]) -> None:
    """SIGTERM the session, then SIGKILL whatever of it survives (SuperExec, ClientApp, Ray
    children share the session)."""
    kill_session(popen, signal.SIGTERM)
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class RunEndedEarly(RuntimeError):
    """``flwr run`` exited before the coordinator wrote ``status.json`` ``finished``."""


def _read_status(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or mid-replace
        return {}
    return dict(doc) if isinstance(doc, dict) else {}


def wait_for_finished(
    run_dir: Path,
    popen: subprocess.Popen[bytes] | None,
    timeout: float,
    on_status: Callable[[dict[str, Any]], None] | None = None,
    since: float | None = None,
) -> dict[str, Any]:
    """Poll the coordinator's ``run_dir/status.json`` until it says ``finished``; returns it.

    ``on_status`` sees every new status (progress output). ``since``: a Unix time; a status
    written before it (an earlier session of a resumed run) is ignored.

    Raises:
        RunEndedEarly: ``popen`` (``flwr run``) exited without the run finishing.
        TimeoutError: not finished within ``timeout`` seconds.
    """
    status = RunDir(Path(run_dir)).status
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    def read() -> dict[str, Any]:
        doc = _read_status(status)
        stale = since is not None and float(doc.get("time", 0.0)) < since
        return {} if stale else doc

    while time.monotonic() < deadline:
        doc = read()
        if doc.get("stage") == "finished":
            return doc
        if on_status is not None and doc and doc != last:
            last = doc
            on_status(doc)
        if popen is not None and popen.poll() is not None:
            time.sleep(1.0)  # the last status write may still be landing
            doc = read()
            if doc.get("stage") == "finished":
                return doc
            raise RunEndedEarly("flwr run ended before the coordinator finished")
        time.sleep(0.2)
    raise TimeoutError(f"the run did not finish within {timeout:g} s")


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    fh: IO[bytes]


@dataclass
class LoopbackFederation:
    """SuperLink + ``num_sites`` SuperNodes on 127.0.0.1 with TLS and node authentication.

    Args:
        work: folder for every party's files (created).
        num_sites: number of SuperNodes (site i is client i).
        node_config: ``i -> extra --node-config entries`` of site i (``partition-id`` or
            ``data-path`` ...); ``state-dir`` and ``keys-dir`` are filled in.
        worker: each site is ``securefed supernode --isolation process`` + ``securefed
            site-worker`` (default); ``False``: the stock ``flower-supernode`` in subprocess
            isolation (one ``flwr-clientapp`` process per message).
        idle_poll: the SuperNodes' first idle poll after a message, in seconds (``securefed
            supernode --idle-poll``, flwr 1.41 only; grows to Flower's 3 s while idle);
            ``None``: the stock SuperNode (always 3 s).
    """

    work: Path
    num_sites: int
    node_config: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    startup_timeout: float = 90.0
    worker: bool = True
    idle_poll: float | None = 0.1
    procs: dict[str, _Proc] = field(default_factory=dict)
    node_ids: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        self.bin = Path(sys.executable).parent
        self.link_port = free_port()
        self.site_ports = [free_port() for _ in range(self.num_sites)]
        self.tls_dir = self.work / "provision" / "tls"
        self.keys_all = self.work / "provision" / "secagg"
        self.coordinator_dir = self.work / "coordinator"
        self.cli_home = self.work / "operator" / "flwr-home"
        self._run_started: float | None = None  # Unix time of the last flwr_run

    # ------------------------------------------------------------------ helpers
    def site_dir(self, i: int) -> Path:
        return self.work / f"site_{i}"

    def runtime_secret(self, i: int) -> Path:
        return self.site_dir(i) / "runtime.secret"

    def runtime_address(self, i: int) -> str:
        return f"127.0.0.1:{self.site_ports[i]}"

    def _env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_HOME"] = str(flwr_home)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        # no phone-home from any party: Flower's telemetry and its update check are off
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        # the SuperLink's SuperExec polls for a ServerApp task every second by default, for
        # the whole run; 0.5 s: a run starts sooner, without a request every 0.1 s all along
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5")
        return env

    def _spawn(self, name: str, argv: Sequence[str], flwr_home: Path) -> _Proc:
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        flwr_home.mkdir(parents=True, exist_ok=True)
        fh = log.open("ab")
        popen = subprocess.Popen(
            list(argv), stdout=fh, stderr=subprocess.STDOUT, env=self._env(flwr_home),
            start_new_session=True, cwd=self.work,
        )
        proc = _Proc(name, popen, log, fh)
        self.procs[name] = proc
        return proc

    def _cli(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "flwr"), *args], env=self._env(self.cli_home), capture_output=True,
            text=True, timeout=timeout, cwd=self.work, check=False,
        )

    def _wait_port(self, port: int, proc: _Proc) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited early; see {proc.log}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"{proc.name} did not listen on 127.0.0.1:{port}; see {proc.log}")

    # ------------------------------------------------------------------ provisioning
    def provision(self) -> None:
        """Credentials for every party, each copied into that party's own folder."""
        # lazy: keeps securefed --help fast (the CLI parser imports this module, indirectly)
        from securefed.secagg.keys import ROSTER_FILE, SERVER_KEY_FILE, init_identity_keys

        write_tls_material(self.tls_dir, ["127.0.0.1", "localhost"], self.num_sites)
        init_identity_keys(self.keys_all, self.num_sites)
        roster = (self.keys_all / ROSTER_FILE).read_bytes()
        ck = self.coordinator_dir / "keys"
        atomic_write_bytes(ck / SERVER_KEY_FILE, (self.keys_all / SERVER_KEY_FILE).read_bytes(),
                           mode=0o600)
        atomic_write_bytes(ck / ROSTER_FILE, roster, mode=0o644)
        for i in range(self.num_sites):
            sk = self.site_dir(i) / "keys"
            name = f"client_{i}.key"
            atomic_write_bytes(sk / name, (self.keys_all / name).read_bytes(), mode=0o600)
            atomic_write_bytes(sk / ROSTER_FILE, roster, mode=0o644)
            atomic_write_bytes(self.site_dir(i) / "tls" / "ca.crt",
                               (self.tls_dir / "ca.crt").read_bytes(), mode=0o644)
            atomic_write_bytes(self.site_dir(i) / "tls" / "supernode.key",
                               (self.tls_dir / f"supernode_{i}.key").read_bytes(), mode=0o600)
            # the Runtime API's SuperExec auth secret, shared by the SuperNode and its worker
            atomic_write_bytes(self.runtime_secret(i), os.urandom(32), mode=0o600)

    # ------------------------------------------------------------------ processes
    def start_superlink(self) -> None:
        t = self.tls_dir
        proc = self._spawn(
            "superlink",
            [
                str(self.bin / "flower-superlink"),
                "--ssl-ca-certfile", str(t / "ca.crt"),
                "--ssl-certfile", str(t / "superlink.crt"),
                "--ssl-keyfile", str(t / "superlink.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1",
                "--port", str(self.link_port),
            ],
            self.work / "coordinator" / "flwr-home",
        )
        self._wait_port(self.link_port, proc)
        atomic_write_text(
            self.cli_home / "config.toml",
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.link_port}"\n'
            f'root-certificates = "{t / "ca.crt"}"\n',
        )

    def register_sites(self) -> None:
        """``flwr supernode register`` every site's public key (the SuperLink admits no other)."""
        for i in range(self.num_sites):
            pub = self.tls_dir / f"supernode_{i}.pub"
            res = self._cli(["supernode", "register", str(pub), CONNECTION, "--format", "json"],
                            timeout=self.startup_timeout)
            node_id = None
            start = res.stdout.find("{")
            if start >= 0:
                try:
                    node_id = int(json.loads(res.stdout[start:])["node-id"])
                except (ValueError, KeyError, TypeError):
                    node_id = None
            if res.returncode != 0 or node_id is None:
                raise RuntimeError(
                    f"flwr supernode register {pub} failed ({res.returncode}): "
                    f"{res.stdout[-2000:]} {res.stderr[-2000:]}"
                )
            self.node_ids[i] = node_id

    def node_config_string(self, i: int) -> str:
        values: dict[str, Any] = {
            "state-dir": str(self.site_dir(i) / "state"),
            "keys-dir": str(self.site_dir(i) / "keys"),
        }
        values.update(self.node_config.get(i, {"partition-id": i}))
        return config_pairs(values)

    def supernode_command(self, i: int) -> list[str]:
        """Site i's SuperNode command line (what a site runs, paths filled in)."""
        d = self.site_dir(i)
        if self.idle_poll is None:
            argv = [str(self.bin / "flower-supernode")]
        else:
            argv = [sys.executable, "-m", "securefed.cli", "supernode",
                    "--poll-patch", "require", "--idle-poll", repr(self.idle_poll)]
        argv += [
            "--superlink", f"127.0.0.1:{self.link_port}",
            "--root-certificates", str(d / "tls" / "ca.crt"),
            "--auth-supernode-private-key", str(d / "tls" / "supernode.key"),
            "--host", "127.0.0.1",
            "--port", str(self.site_ports[i]),
            "--node-config", self.node_config_string(i),
        ]
        if self.worker:
            argv += ["--isolation", "process",
                     "--superexec-auth-secret-file", str(self.runtime_secret(i))]
        return argv

    def worker_command(self, i: int) -> list[str]:
        """Site i's worker command line."""
        return [sys.executable, "-m", "securefed.cli", "site-worker",
                "--runtime-api-address", self.runtime_address(i),
                "--auth-secret-file", str(self.runtime_secret(i))]

    def start_site(self, i: int) -> None:
        d = self.site_dir(i)
        self._spawn(f"site_{i}", self.supernode_command(i), d / "flwr-home")
        if self.worker:
            self._spawn(f"site_{i}_worker", self.worker_command(i), d / "flwr-home")

    def start_intruder(self) -> str:
        """Start a SuperNode whose (fresh) key was never registered, claiming site 0's data:
        with ``--enable-supernode-auth`` the SuperLink must never admit it."""
        d = self.work / "intruder"
        key = ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        atomic_write_bytes(d / "supernode.key", key, mode=0o600)
        values = {"state-dir": str(d / "state"), "keys-dir": str(self.site_dir(0) / "keys"),
                  "partition-id": 0}
        self._spawn(
            "intruder",
            [
                str(self.bin / "flower-supernode"),
                "--superlink", f"127.0.0.1:{self.link_port}",
                "--root-certificates", str(self.tls_dir / "ca.crt"),
                "--auth-supernode-private-key", str(d / "supernode.key"),
                "--host", "127.0.0.1",
                "--port", str(free_port()),
                "--max-retries", "3",
                "--node-config", config_pairs(values),
            ],
            d / "flwr-home",
        )
        return "intruder"

    def start(self) -> LoopbackFederation:
        """Provision, start the SuperLink, register and start every site."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.provision()
        self.start_superlink()
        self.register_sites()
        for i in range(self.num_sites):
            self.start_site(i)
        return self

    def flwr_run(
        self,
        experiment: Path,
        run_dir: Path,
        run_config: Mapping[str, Any] | None = None,
        *,
        timeout: float = 600.0,
        wait: bool = True,
    ) -> subprocess.Popen[bytes]:
        """``flwr run APP_DIR loopback --run-config ... --stream``; waits for the run to end
        unless ``wait`` is False (then the caller polls ``run_dir/status.json``)."""
        values: dict[str, Any] = {
            "experiment": str(Path(experiment).resolve()),
            "run-dir": str(Path(run_dir).resolve()),
            "keys-dir": str(self.coordinator_dir / "keys"),
        }
        values.update(run_config or {})
        self._run_started = time.time()  # a resumed run dir holds an earlier session's status
        log = self.work / "logs" / "flwr-run.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = log.open("ab")
        popen = subprocess.Popen(
            [str(self.bin / "flwr"), "run", str(APP_DIR), CONNECTION,
             "--run-config", config_pairs(values), "--stream"],
            stdout=fh, stderr=subprocess.STDOUT, env=self._env(self.cli_home),
            start_new_session=True, cwd=self.work,
        )
        self.procs["flwr-run"] = _Proc("flwr-run", popen, log, fh)
        if wait:
            self.wait_finished(run_dir, timeout)
        return popen

    def wait_finished(self, run_dir: Path, timeout: float) -> dict[str, Any]:
        """Wait for the coordinator's ``status.json`` to say ``finished``."""
        run = self.procs.get("flwr-run")
        try:
            return wait_for_finished(run_dir, None if run is None else run.popen, timeout,
                                     since=self._run_started)
        except RunEndedEarly:  # only a watched process (run is not None) ends early
            log = "" if run is None else run.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"flwr run ended before the coordinator finished: {log}") from None
        except TimeoutError:
            raise TimeoutError(f"the deployed run did not finish within {timeout:g} s; logs in "
                               f"{self.work / 'logs'}") from None

    def kill_site(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill site i's SuperNode, its worker and their children (a crash, not a goodbye)."""
        for name in (f"site_{i}", f"site_{i}_worker"):
            proc = self.procs.get(name)
            if proc is not None:
                self._kill(proc, sig)

    @staticmethod
    def _kill(proc: _Proc, sig: int) -> None:
        kill_session(proc.popen, sig)
        proc.fh.close()

    def stop(self) -> None:
        """Stop every process this federation started (sessions killed with children)."""
        for name in list(self.procs)[::-1]:
            proc = self.procs.pop(name)
            end_session(proc.popen)
            proc.fh.close()

    def __enter__(self) -> LoopbackFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self, tail: int = 4000) -> str:
        """The tail of every log (for failure messages)."""
        out = []
        for p in sorted((self.work / "logs").glob("*.log")):
            out.append(f"==== {p.name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def clean(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
