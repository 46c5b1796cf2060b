"""The long-lived site worker: one process serves every message of a run, warm.

Flower 1.41 runs a ``flwr-clientapp`` process per message (both isolation modes, see
``flwr/supernode/runtime/run_clientapp.py``): each masking stage paid Python, torch and
securefed imports, data loading and the privacy context again. With
``flower-supernode --isolation process`` the SuperNode starts nothing itself; a process outside
it acquires tasks from its local Runtime API. :class:`SiteWorker` is that process:

1. ``AcquireTask`` (signed with the SuperExec auth secret, HMAC-SHA256 over the request with a
   timestamp and a one-time nonce; the SuperNode refuses unsigned or wrongly signed requests)
   returns a task and its one-task token;
2. with the token: ``PullTaskInput`` (context, run, FAB), ``PullMessages`` and the message's
   objects, then the securefed ClientApp (:mod:`securefed.deploy.client_app`) handles the
   message **in this process** (imports, data, node options, keys stay loaded), then
   ``PushMessages`` + objects and ``PushTaskOutput`` (which also stores ``context.state`` in
   the SuperNode); a heartbeat runs while the task is open;
3. back to 1.

What must survive a crash is still written by the site's handlers before anything leaves the
site (:mod:`securefed.deploy.node`: the ledger charge, the masking round state, the pending
strategy state); the worker keeps only caches. A worker killed mid-task loses that one reply
(the coordinator counts the site as dropped for the round, as for a crashed SuperNode); a
restarted worker continues from ``state-dir``.

The worker runs only the securefed ClientApp it imported: it never installs or executes code
from a FAB, and refuses a run whose FAB names another ClientApp.

Command line (see ``docs/deploy.md``)::

    securefed site-worker --runtime-api-address 127.0.0.1:9094 \\
        --auth-secret-file /etc/securefed/runtime.secret
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securefed.errors import SecurefedError
from securefed.io import atomic_write_bytes

__all__ = [
    "CLIENTAPP_REF",
    "SiteWorker",
    "WorkerConfigError",
    "add_site_worker_parser",
    "load_auth_secret",
]

log = logging.getLogger(__name__)

#: the only ClientApp a securefed site serves
CLIENTAPP_REF = "securefed.deploy.client_app:app"
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"


class WorkerConfigError(SecurefedError, ValueError):
    """A bad worker setting (names the flag, the value and the fix)."""


def load_auth_secret(path: Path) -> bytes:
    """Read the Runtime API's SuperExec auth secret (raw bytes, as ``flower-supernode
    --superexec-auth-secret-file`` reads it); refuse a file readable by group or others, or one
    shorter than 16 bytes."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
        secret = path.read_bytes()
    except OSError as exc:
        raise WorkerConfigError(f"--auth-secret-file {path}: cannot read it: {exc}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise WorkerConfigError(
            f"--auth-secret-file {path}: mode {stat.S_IMODE(st.st_mode):o} lets other users "
            f"read it; run `chmod 600 {path}`"
        )
    if len(secret) < 16:
        raise WorkerConfigError(
            f"--auth-secret-file {path}: {len(secret)} bytes; use at least 16 random bytes, "
            "e.g. `head -c 32 /dev/urandom > FILE && chmod 600 FILE`"
        )
    return secret


def write_auth_secret(path: Path) -> Path:
    """A fresh 32-byte secret at ``path`` (0600); refuses to overwrite."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite a runtime auth secret")
    atomic_write_bytes(path, os.urandom(32), mode=0o600)
    return path


def fab_clientapp(fab_content: bytes) -> str:
    """The ClientApp reference a FAB names (``[tool.flwr.app.components] clientapp``)."""
    from flwr.common.config import get_fab_config  # lazy: flwr is optional

    conf = get_fab_config(fab_content)
    return str(conf["tool"]["flwr"]["app"]["components"].get("clientapp", ""))


@dataclass
class WorkerStats:
    """What the worker did (for logs and tests)."""

    tasks: int = 0
    failed: int = 0
    last_task_seconds: float = 0.0


class SiteWorker:
    """Acquire ClientApp tasks from one SuperNode's Runtime API and serve them in-process.

    Args:
        runtime_api_address: the SuperNode's Runtime API (``flower-supernode --host/--port``).
        auth_secret: the SuperNode's ``--superexec-auth-secret-file`` content.
        root_certificates: CA (PEM path) of the Runtime API's certificate when the SuperNode
            serves it with ``--ssl-certfile``; ``None``: plain HTTP (the API must then listen on
            127.0.0.1 only, on a host the site controls).
        poll_interval: seconds between two ``AcquireTask`` calls within 10 s of the last task;
            after that each further empty call waits 25% longer, up to ``max_poll_interval``.
    """

    def __init__(
        self,
        runtime_api_address: str,
        auth_secret: bytes,
        *,
        root_certificates: str | None = None,
        poll_interval: float = 0.05,
        max_poll_interval: float = 0.5,
    ) -> None:
        if not auth_secret:
            raise WorkerConfigError(
                "the Runtime API auth secret is required: start flower-supernode with "
                "--superexec-auth-secret-file FILE and give the worker the same FILE"
            )
        if not 0.001 <= poll_interval <= 10:
            raise WorkerConfigError(f"--poll-interval {poll_interval}: between 0.001 and 10 s")
        self.address = runtime_api_address
        self.auth_secret = auth_secret
        self.root_certificates = root_certificates
        self.poll_interval = poll_interval
        self.max_poll_interval = max(poll_interval, max_poll_interval)
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._acquire_client: Any = None

    # ------------------------------------------------------------------ HTTP clients
    def _client(self, interceptors: list[Any]) -> Any:
        from flwr.supercore.runtime import RuntimeHttpClient  # lazy: flwr is optional

        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.root_certificates is None,
            root_certificates=self.root_certificates,
            interceptors=interceptors,
            retry_invoker=_retry_invoker(),
        )

    def _acquirer(self) -> Any:
        if self._acquire_client is None:
            from flwr.supercore.interceptors import (  # lazy: flwr is optional
                RuntimeVersionHttpInterceptor,
                SuperExecAuthHttpInterceptor,
            )

            self._acquire_client = self._client([
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=self.auth_secret,
                    protected_methods=frozenset({ACQUIRE_METHOD}),
                ),
            ])
        return self._acquire_client

    # ------------------------------------------------------------------ one task
    def acquire(self) -> tuple[str, Any] | None:
        """Claim the oldest pending ClientApp task: ``(token, task)`` or ``None``."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # lazy: flwr is optional
        from flwr.supercore.constant import TaskType  # lazy: flwr is optional

        res = self._acquirer().AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        )
        if res.HasField("task") and res.token:
            return str(res.token), res.task
        return None

    def serve_task(self, token: str, task: Any) -> bool:
        """Run one acquired task to its end; ``True`` if the ClientApp produced a reply."""
        from flwr.app import Message  # lazy: flwr is optional
        from flwr.app.error import Error  # lazy: flwr is optional
        from flwr.common.constant import ErrorCode, SubStatus  # lazy: flwr is optional
        from flwr.supercore.interceptors import (  # lazy: flwr is optional
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supernode.runtime.run_clientapp import (  # lazy: flwr is optional
            push_message,
            push_task_output,
        )

        # lazy: flwr (optional) and the site handlers; the CLI parser imports this module
        from securefed.deploy.client_app import app

        t0 = time.perf_counter()
        log.info("task %s acquired", task.task_id)
        client = self._client([
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ])
        heartbeat = _Heartbeat(_heartbeat_fn(client, task.task_id))
        message = context = reply = None
        status, details = SubStatus.FAILED, "securefed site worker: task failed"
        marks = [t0]
        try:
            message, context, run, fab = pull_task_input(client)
            marks.append(time.perf_counter())
            ref = fab_clientapp(fab.content)
            if ref != CLIENTAPP_REF:
                raise WorkerConfigError(
                    f"run {run.run_id}: its FAB names clientapp {ref!r}; this securefed site "
                    f"serves only {CLIENTAPP_REF!r} (the code it installed)"
                )
            reply = app(message=message, context=context)
            marks.append(time.perf_counter())
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # the worker stays up; the coordinator sees an error reply
            log.exception("task %s failed", task.task_id)
            details = f"{type(exc).__name__}: {exc}"
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                    reply_to=message,
                )
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:
                log.exception("task %s: pushing the reply failed", task.task_id)
                status = SubStatus.FAILED
            marks.append(time.perf_counter())
            push_task_output(client, context, status, details)
            marks.append(time.perf_counter())
            heartbeat.stop()
            client.close()
        self.stats.tasks += 1
        self.stats.failed += int(status != SubStatus.COMPLETED)
        self.stats.last_task_seconds = time.perf_counter() - t0
        log.info(
            "task %s (%s) %s in %.3f s (steps %s)", task.task_id,
            message.metadata.message_type if message is not None else "?", status,
            self.stats.last_task_seconds,
            " ".join(f"{b - a:.3f}" for a, b in itertools.pairwise(marks)),
        )
        return status == SubStatus.COMPLETED

    # ------------------------------------------------------------------ loop
    def warm_up(self) -> None:
        """Import what every message needs before the first task arrives: torch, flwr's message
        types and the site handlers (``deploy/node.py`` with the builders, data loaders, DP
        trainer and masking protocol), so the run's first message pays only for building its
        experiment (data, model, privacy context). TenSEAL stays unimported until a CKKS run
        asks for it."""
        # lazy: importing the handlers before the first task is the warm-up's purpose
        from securefed.deploy import client_app  # noqa: F401

    def serve_forever(self, max_tasks: int | None = None) -> None:
        """Acquire and serve tasks until :meth:`stop` (or ``max_tasks`` served)."""
        import httpx  # lazy: httpx comes with flwr

        backoff, empty, last_task = self.poll_interval, 0, time.monotonic()
        while not self._stop.is_set():
            try:
                got = self.acquire()
                if got is not None:
                    empty, last_task = 0, time.monotonic()
                elif time.monotonic() - last_task > 10.0:
                    empty += 1
                backoff = min(self.max_poll_interval,
                              self.poll_interval * 1.25 ** min(empty, 64))
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code in (401, 403):
                    raise WorkerConfigError(
                        f"the SuperNode at {self.address} refused AcquireTask "
                        f"({exc.response.status_code}): the worker's --auth-secret-file differs "
                        "from the SuperNode's --superexec-auth-secret-file"
                    ) from None
                log.warning("AcquireTask failed: %s", exc)
                got, backoff = None, min(1.0, backoff * 2)
            except httpx.TransportError as exc:  # SuperNode restarting: keep trying
                log.warning("Runtime API %s unreachable: %s", self.address, exc)
                got, backoff = None, min(1.0, backoff * 2)
            if got is None:
                self._stop.wait(backoff)
                continue
            try:
                self.serve_task(*got)
            except Exception:  # the worker stays up for the next message
                log.exception("task %s could not be served", got[1].task_id)
            if max_tasks is not None and self.stats.tasks >= max_tasks:
                return

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self._acquire_client is not None:
            self._acquire_client.close()
            self._acquire_client = None


def pull_task_input(client: Any, backoff: float = 0.01, backoff_cap: float = 0.02) -> Any:
    """``flwr.supernode.runtime.run_clientapp.pull_task_input`` with a short backoff.

    The SuperNode creates the task before it has pulled the message's objects from the
    SuperLink, so a warm worker usually asks for them too early; flwr's pull then backs off
    1 s, 2 s, ... (``PULL_INITIAL_BACKOFF``). Here it retries every 10-20 ms (a local request).
    """
    from flwr.app import Message  # lazy: flwr is optional
    from flwr.common.serde import (  # lazy: flwr is optional
        context_from_proto,
        fab_from_proto,
        run_from_proto,
    )
    from flwr.proto.node_pb2 import Node  # lazy: flwr is optional
    from flwr.proto.runtime_pb2 import (  # lazy: flwr is optional
        PullAppMessagesRequest,
        PullTaskInputRequest,
    )
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (  # lazy: flwr is optional
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (  # lazy: flwr is optional
        pull_and_inflate_object_from_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity  # lazy: flwr is optional

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message received from the Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message,
        initial_backoff=backoff,
        backoff_cap=backoff_cap,
    )
    # the deflated message does not carry its own id (its object id)
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def _retry_invoker(max_time: float = 30.0) -> Any:
    """Retry what a restarting SuperNode causes (connection errors, 502/503/504) for up to
    ``max_time`` s; raise every other HTTP error. (flwr's own invoker answers a 401 by sending
    SIGINT to its process: right for a one-message ``flwr-clientapp``, not for this worker.)"""
    import httpx  # lazy: httpx comes with flwr
    from flwr.supercore.retry import RetryInvoker, exponential  # lazy: flwr is optional

    def giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in (502, 503, 504)
        return False

    return RetryInvoker(
        lambda: exponential(base_delay=0.05, max_delay=2),
        (httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time,
        should_giveup=giveup,
    )


class _Heartbeat:
    """Task heartbeats from a thread, the first after ``first`` seconds: a claimed task lives
    30 s without one (``HEARTBEAT_DEFAULT_INTERVAL``), and a masking stage takes well under a
    second, so short tasks send none (flwr's sender sends one at once: a request per message).
    """

    def __init__(self, beat: Callable[[], bool], first: float = 10.0, every: float = 15.0):
        self._beat, self._first, self._every = beat, first, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="task-heartbeat")
        self._thread.start()

    def _run(self) -> None:
        wait = self._first
        while not self._stop.wait(wait):
            ok = False
            try:
                ok = self._beat()
            except Exception:
                log.exception("task heartbeat failed")
            wait = self._every if ok else 1.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _heartbeat_fn(client: Any, task_id: int) -> Callable[[], bool]:
    """flwr's task heartbeat, except that a task the SuperNode no longer knows is logged
    (flwr's own raises SIGINT, which would end this long-lived worker)."""
    import httpx  # lazy: httpx comes with flwr
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # lazy: flwr is optional

    def fn() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (503, 504):
                return False
            log.warning("task %s: heartbeat refused (%s)", task_id, err)
            return True
        if not res.success:
            log.warning("task %s: the SuperNode no longer accepts its heartbeat", task_id)
        return True

    return fn


# ---------------------------------------------------------------------- command line


def add_site_worker_parser(sub: Any) -> None:
    """``securefed site-worker``."""
    w = sub.add_parser(
        "site-worker",
        help="serve a SuperNode's (--isolation process) messages in one warm process",
        description="Acquire ClientApp tasks from flower-supernode's Runtime API (started "
        "with --isolation process --superexec-auth-secret-file FILE) and run the securefed "
        "ClientApp for every message of every run in this process.",
    )
    w.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                   help="the SuperNode's Runtime API, HOST:PORT (flower-supernode --host/--port)")
    w.add_argument("--auth-secret-file", required=False,
                   help="the SuperNode's --superexec-auth-secret-file (0600)")
    w.add_argument("--init-auth-secret", metavar="FILE",
                   help="write a fresh 32-byte secret to FILE (0600) and exit")
    w.add_argument("--root-certificates",
                   help="CA (PEM) of the Runtime API's certificate, if the SuperNode serves it "
                   "with --ssl-certfile")
    w.add_argument("--poll-interval", type=float, default=0.05,
                   help="seconds between two AcquireTask calls within 10 s of a task; then 25%% "
                   "longer after each empty one (default 0.05)")
    w.add_argument("--max-poll-interval", type=float, default=0.5,
                   help="the longest wait between two AcquireTask calls (default 0.5)")
    w.set_defaults(func=_cmd_site_worker)


def _cmd_site_worker(args: argparse.Namespace) -> int:
    try:
        return _site_worker(args)
    except WorkerConfigError as exc:
        print(f"securefed site-worker: error: {exc}", file=sys.stderr)
        return 2


def _site_worker(args: argparse.Namespace) -> int:
    if args.init_auth_secret:
        print(write_auth_secret(Path(args.init_auth_secret)))
        return 0
    if not args.auth_secret_file:
        raise WorkerConfigError(
            "--auth-secret-file: required (the file given to flower-supernode "
            "--superexec-auth-secret-file); create one with --init-auth-secret FILE"
        )
    worker = SiteWorker(
        args.runtime_api_address, load_auth_secret(Path(args.auth_secret_file)),
        root_certificates=args.root_certificates, poll_interval=args.poll_interval,
        max_poll_interval=args.max_poll_interval,
    )
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request
    t0 = time.perf_counter()
    worker.warm_up()
    log.info("securefed site worker: warm in %.1f s; serving %s", time.perf_counter() - t0,
             args.runtime_api_address)
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()
    return 0
