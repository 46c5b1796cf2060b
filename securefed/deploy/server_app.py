"""The Flower ServerApp: runs :class:`~securefed.deploy.coordinator.Coordinator` over the Grid.

Run config (``[tool.flwr.app.config]`` of ``securefed/deploy/app/pyproject.toml``, overridden
with ``flwr run ... --run-config 'key=value ...'``):

=================  =========================================================================
key                meaning
=================  =========================================================================
``experiment``     path (on the coordinator's machine) of the experiment YAML (with ``resume``:
                   optional, default the run's own ``config.yaml``; another one is refused)
``run-dir``        the run directory to create (metrics.jsonl, checkpoints/, status.json)
``resume``         ``false`` (default); ``true``: continue the interrupted run in ``run-dir``
                   from its latest checkpoint, with the same run id (docs/deploy.md, Resume)
``keys-dir``       folder with ``server.key`` (0600) and ``roster.json``
``min-sites``      sites that must join before round 1 (0: ``federation.num_clients``)
``join-timeout``   seconds to wait for them
``stage-timeout``  seconds a site has to answer a masking stage before it counts as dropped
``train-timeout``  the same for the stage in which a site trains
``poll-interval``  seconds between two polls of the SuperLink for replies
``advertise-``     ``true`` (default): the next round's start rides on this round's unmasking
``ahead``          request (one message fewer per round); ``false``: five stages every round
=================  =========================================================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from securefed.artefacts.rundir import RunDir
from securefed.config import load_config
from securefed.deploy.coordinator import Coordinator, CoordinatorOptions, Reply
from securefed.deploy.polling import apply_grid_pull_patch

__all__ = ["FlowerChannel", "app", "experiment_path", "options_from_run_config"]

log = logging.getLogger(__name__)

RECORD = "securefed"

app = ServerApp()


class FlowerChannel:
    """:class:`~securefed.deploy.coordinator.SiteChannel` over a Flower ``Grid``.

    Replies are pulled every ``poll_interval`` seconds (``Grid.send_and_receive`` sleeps 3 s
    between pulls, which would add up to 3 s to every masking stage).
    """

    def __init__(self, grid: Grid, poll_interval: float = 0.05) -> None:
        self.grid = grid
        self.poll_interval = poll_interval

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def exchange(
        self,
        message_type: str,
        contents: Mapping[int, Mapping[str, Any]],
        *,
        timeout: float,
        group: str,
    ) -> dict[int, Reply]:
        if not contents:
            return {}
        nodes = list(contents)
        messages = [
            Message(
                RecordDict({RECORD: ConfigRecord(dict(contents[n]))}),
                dst_node_id=n,
                message_type=message_type,
                group_id=group,
            )
            for n in nodes
        ]
        ids = list(self.grid.push_messages(messages))
        pending = {mid: n for mid, n in zip(ids, nodes, strict=True) if mid}
        out: dict[int, Reply] = {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                out[node] = _reply_content(reply)
            if pending:
                time.sleep(self.poll_interval)
        return out


def _reply_content(reply: Message) -> Reply:
    if reply.has_error():
        err = reply.error
        return f"Flower error {err.code}: {err.reason}"
    rec = reply.content.config_records.get(RECORD)
    if rec is None:
        return f"reply has no {RECORD!r} record"
    content = dict(rec)
    if "error" in content:
        what = content["error"]
        return f"site error: {what if isinstance(what, str) else repr(what)}"
    return content


def _num(cfg: Mapping[str, Any], key: str, default: float, minimum: float) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or v < minimum:
        raise ValueError(f"run config {key}={v!r}: must be a number >= {minimum}")
    return float(v)


def options_from_run_config(cfg: Mapping[str, Any], num_clients: int) -> CoordinatorOptions:
    """Validate the run config into :class:`CoordinatorOptions` (errors name key and fix)."""
    for key in ("run-dir", "keys-dir"):
        if not str(cfg.get(key, "")).strip():
            raise ValueError(
                f"run config {key}: required; pass flwr run --run-config '{key}=\"/abs/path\"'"
            )
    min_sites = int(_num(cfg, "min-sites", 0, 0)) or num_clients
    return CoordinatorOptions(
        run_dir=Path(str(cfg["run-dir"])).expanduser(),
        keys_dir=Path(str(cfg["keys-dir"])).expanduser(),
        min_sites=min_sites,
        join_timeout=_num(cfg, "join-timeout", 300, 1),
        stage_timeout=_num(cfg, "stage-timeout", 120, 1),
        train_timeout=_num(cfg, "train-timeout", 900, 1),
        advertise_ahead=_flag(cfg, "advertise-ahead", True),
        resume=_flag(cfg, "resume", False),
    )


def experiment_path(cfg: Mapping[str, Any]) -> Path:
    """The run config's experiment YAML: ``experiment``; with ``resume=true`` and no
    ``experiment``, the run directory's own ``config.yaml`` (a resumed run keeps its
    experiment)."""
    experiment = str(cfg.get("experiment", "")).strip()
    if not experiment and _flag(cfg, "resume", False) and str(cfg.get("run-dir", "")).strip():
        return RunDir(Path(str(cfg["run-dir"])).expanduser()).config
    if not experiment:
        raise ValueError(
            "run config experiment: required; pass flwr run --run-config "
            "'experiment=\"/abs/path/experiment.yaml\"' (optional with resume=true)"
        )
    return Path(experiment).expanduser()


def _flag(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    v = cfg.get(key, default)
    if isinstance(v, bool):
        return v
    if str(v).strip().lower() in ("true", "1", "yes"):
        return True
    if str(v).strip().lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"run config {key}={v!r}: expected true or false")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Load the experiment named in the run config and run it over the SuperLink."""
    rc = dict(context.run_config)
    cfg = load_config(experiment_path(rc))
    options = options_from_run_config(rc, cfg.federation.num_clients)

    why = apply_grid_pull_patch()  # flwr 1.41: reply objects pulled with a 10 ms backoff
    if why is not None:
        log.warning("coordinator: flwr pull backoff not shortened (%s): replies whose objects "
                    "arrive late wait 1 s or more", why)
    options.run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(options.run_dir / "coordinator.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("securefed")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    poll = _num(rc, "poll-interval", 0.05, 0.01)
    try:
        result = Coordinator(cfg, options, FlowerChannel(grid, poll)).run()
        log.info("deployment run %s: %d rounds", result.run_dir, result.rounds_completed)
    finally:
        root.removeHandler(handler)
        handler.close()
