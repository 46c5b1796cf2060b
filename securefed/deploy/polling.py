"""Flower 1.41's fixed polling delays, shortened (version-guarded); ``securefed supernode``.

**SuperNode** (``securefed supernode``, :func:`apply_poll_patch`).

Flower 1.41's SuperNode (``flwr/supernode/start_client_internal.py``) pulls one message from
the SuperLink, waits for the reply, pushes it, and pulls again; when a pull finds nothing it
sleeps a hard-coded ``time.sleep(3)``, and while it waits for the ClientApp's reply it polls with
``time.sleep(0.5)``. Neither has a flag. When the message's objects are not yet on the
SuperLink as it pulls them (the coordinator pushes a message, then its objects), it backs off
1 s, 2 s, ... (``pull_objects``' ``PULL_INITIAL_BACKOFF``). A masking round is five messages
per site, and the site that answers last makes every other site's next pull come back empty:
each stage costs up to 3 s of idling at every site, whatever the computation.

This wrapper runs the stock ``flower-supernode`` entry point in this process after replacing,
**only in that module**, ``time`` by a shim (every call but ``sleep`` is the real ``time``) and
its ``pull_objects`` by one that retries after 10 ms, doubling to 50 ms. The shim's
``sleep(3)`` (a pull found nothing) is *adaptive*: ``idle_poll`` seconds for ``grace`` seconds
(10) after a message was served (the next masking stage usually arrives within a second or
two), then 25% longer after each further empty pull, up to ``idle_max`` (default 3 s, Flower's
own): an idle site goes back to Flower's rate within about half a minute. ``sleep(0.5)``
(waiting for the ClientApp's reply; it also marks a message being served) sleeps
``reply_poll`` seconds. Nothing else changes: the same arguments, TLS, SuperNode
authentication, Runtime API and auth secret. The cost is more pulls to the SuperLink while a
run is active.

**Coordinator** (:func:`apply_grid_pull_patch`, applied by the ServerApp): the same 1 s
backoff hits the coordinator, which often sees a site's reply before the SuperNode has pushed
its objects; ``flwr.superlink.grid.http_grid.pull_objects`` gets the same short backoff.

Each patch is version-guarded: it is applied only when the installed flwr is 1.41.x **and** the
two functions still contain exactly the sleeps it replaces (checked on their source). Otherwise
``--poll-patch auto`` (default) logs a warning and runs the stock SuperNode unchanged (slower,
still correct), and ``--poll-patch require`` refuses to start (exit 2).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = [
    "SUPPORTED_FLWR",
    "PatchError",
    "PollingTime",
    "apply_grid_pull_patch",
    "apply_poll_patch",
    "main",
    "poll_patch_applicable",
]

log = logging.getLogger(__name__)

#: flwr versions whose SuperNode loop this patch was written against (and tested with)
SUPPORTED_FLWR = "1.41."
IDLE_SLEEP = 3
REPLY_SLEEP = 0.5
#: object pulls: first retry after 10 ms, doubling up to 50 ms (flwr: 1 s doubling to 10 s)
PULL_BACKOFF = 0.01
PULL_BACKOFF_CAP = 0.05


class PatchError(RuntimeError):
    """The installed flwr is not the one the poll patch was written for."""


class PollingTime:
    """``time`` for ``start_client_internal``: ``sleep(3)`` -> the adaptive idle poll,
    ``sleep(0.5)`` -> ``reply``; everything else is the real ``time`` module.

    Idle poll: ``idle`` within ``grace`` seconds of the last served message, then
    ``min(idle_max, idle * growth**k)`` after ``k`` further empty pulls."""

    def __init__(self, idle: float, reply: float, idle_max: float = IDLE_SLEEP,
                 growth: float = 1.25, grace: float = 10.0) -> None:
        self.idle, self.reply = float(idle), float(reply)
        self.idle_max, self.growth, self.grace = float(idle_max), float(growth), float(grace)
        self.empty = 0
        self.last_message = time.monotonic()

    def next_idle(self) -> float:
        if time.monotonic() - self.last_message < self.grace:
            return self.idle
        wait = min(self.idle_max, self.idle * self.growth ** min(self.empty, 64))
        self.empty += 1
        return wait

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_SLEEP:
            seconds = self.next_idle()
        elif seconds == REPLY_SLEEP:
            self.empty = 0  # a message is being served: the next stage is near
            self.last_message = time.monotonic()
            seconds = self.reply
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _target() -> ModuleType:
    from flwr.supernode import start_client_internal as sci  # lazy: flwr is optional

    return sci


def _version_problem() -> str | None:
    try:
        import flwr  # lazy: flwr is optional

        version = str(getattr(flwr, "__version__", ""))
    except Exception as exc:
        return f"flwr not importable: {exc}"
    if not version.startswith(SUPPORTED_FLWR):
        return f"flwr {version} is not {SUPPORTED_FLWR}x (the version this patch was written for)"
    return None


def _short_pull(module: ModuleType) -> str | None:
    """Give ``module.pull_objects`` the short backoff (``None``) or say why not."""
    from flwr.supercore.inflatable import inflatable_utils  # lazy: flwr is optional

    current = getattr(module, "pull_objects", None)
    if isinstance(current, functools.partial) and current.func is inflatable_utils.pull_objects:
        return None  # already applied
    if current is not inflatable_utils.pull_objects:
        return f"{module.__name__}.pull_objects is not flwr's pull_objects"
    params = inspect.signature(current).parameters
    if "initial_backoff" not in params or "backoff_cap" not in params:
        return "flwr's pull_objects has no initial_backoff / backoff_cap"
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        current, initial_backoff=PULL_BACKOFF, backoff_cap=PULL_BACKOFF_CAP
    )
    return None


def apply_grid_pull_patch() -> str | None:
    """Coordinator side: the ServerApp's Grid pulls reply objects with the short backoff.
    Returns ``None`` when applied, else why not (then nothing was changed)."""
    why = _version_problem()
    if why is not None:
        return why
    try:
        from flwr.superlink.grid import http_grid  # lazy: flwr is optional
    except Exception as exc:
        return f"flwr.superlink.grid.http_grid not importable: {exc}"
    return _short_pull(http_grid)


def poll_patch_applicable() -> str | None:
    """``None`` if the patch applies to the installed flwr, else why not."""
    why = _version_problem()
    if why is not None:
        return why
    try:
        sci = _target()
    except Exception as exc:
        return f"flwr.supernode.start_client_internal not importable: {exc}"
    if getattr(sci, "time", None) is not time and not isinstance(sci.time, PollingTime):
        return "flwr.supernode.start_client_internal does not use the time module"
    try:
        main_src = inspect.getsource(sci.start_client_internal)
        push_src = inspect.getsource(sci._push_messages)
    except (AttributeError, OSError, TypeError) as exc:
        return f"cannot read the SuperNode loop's source: {exc}"
    if main_src.count(f"time.sleep({IDLE_SLEEP})") != 1:
        return "start_client_internal no longer contains exactly one time.sleep(3)"
    if push_src.count(f"time.sleep({REPLY_SLEEP})") < 1:
        return "_push_messages no longer contains time.sleep(0.5)"
    return None


def apply_poll_patch(idle: float, reply: float, idle_max: float = IDLE_SLEEP) -> PollingTime:
    """Shorten the SuperNode's idle and reply polls (flwr 1.41.x only).

    Raises:
        PatchError: naming why the installed flwr is not patched.
    """
    if not 0.01 <= idle <= IDLE_SLEEP:
        raise ValueError(f"--idle-poll {idle}: between 0.01 and {IDLE_SLEEP} seconds")
    if not idle <= idle_max <= 60:
        raise ValueError(f"--idle-poll-max {idle_max}: between --idle-poll ({idle}) and 60 s")
    if not 0.005 <= reply <= REPLY_SLEEP:
        raise ValueError(f"--reply-poll {reply}: between 0.005 and {REPLY_SLEEP} seconds")
    why = poll_patch_applicable()
    if why is not None:
        raise PatchError(why)
    shim = PollingTime(idle, reply, idle_max)
    sci = _target()
    why = _short_pull(sci)
    if why is not None:
        raise PatchError(why)
    sci.time = shim  # type: ignore[attr-defined]
    return shim


def _split(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Our flags (``--idle-poll``, ``--idle-poll-max``, ``--reply-poll``, ``--poll-patch``) out
    of argv; the
    rest goes to flower-supernode untouched."""
    ours: dict[str, str] = {}
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        name, eq, value = a.partition("=")
        if name in ("--idle-poll", "--idle-poll-max", "--reply-poll", "--poll-patch"):
            if not eq:
                value = next(it, "")
            ours[name[2:]] = value
        else:
            rest.append(a)
    return ours, rest


def main(argv: Sequence[str] | None = None) -> int:
    """``securefed supernode [--idle-poll S] [--idle-poll-max S] [--reply-poll S]
    [--poll-patch auto|require|off] FLOWER-SUPERNODE-ARGS...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = _split(argv)
    mode = ours.get("poll-patch", "auto")
    if mode not in ("auto", "require", "off"):
        print(f"securefed supernode: --poll-patch {mode!r}: one of auto, require, off",
              file=sys.stderr)
        return 2
    try:
        idle = float(ours.get("idle-poll", "0.1"))
        idle_max = float(ours.get("idle-poll-max", str(IDLE_SLEEP)))
        reply = float(ours.get("reply-poll", "0.02"))
    except ValueError as exc:
        print(f"securefed supernode: {exc}", file=sys.stderr)
        return 2
    if mode != "off":
        try:
            apply_poll_patch(idle, reply, idle_max)
            log.warning("securefed supernode: idle poll %.3g s growing to %.3g s, reply poll "
                        "%.3g s (flwr 1.41 poll patch)", idle, idle_max, reply)
        except ValueError as exc:
            print(f"securefed supernode: {exc}", file=sys.stderr)
            return 2
        except PatchError as exc:
            if mode == "require":
                print(f"securefed supernode: --poll-patch require: not applied: {exc}",
                      file=sys.stderr)
                return 2
            log.warning("securefed supernode: poll patch NOT applied (%s); running the stock "
                        "SuperNode (3 s idle poll: each masking stage may wait up to 3 s)", exc)
    from flwr.supernode.cli.flower_supernode import flower_supernode  # lazy: flwr is optional

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per idle pull
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m securefed.deploy.polling`
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
