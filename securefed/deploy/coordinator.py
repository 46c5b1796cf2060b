"""The coordinator (ServerApp side): the round engine's deployed transport, each masking stage
a network round-trip to the sites.

There is one round loop, :class:`~securefed.federation.engine.RoundEngine`; the
:class:`Coordinator` is its :class:`~securefed.federation.engine.ClientTransport` for a Flower
deployment, as :class:`~securefed.federation.simulation.InProcessClients` is for the simulation.
The engine's ``Strategy.configure_round`` with the same ``(seed, round)`` stream selects the
sites and builds the broadcast; each selected site trains locally (on its own machine, through
the same client runtime :func:`securefed.client.runtime.local_round`, see
:mod:`securefed.deploy.node`); the masking server
(:class:`~securefed.secagg.masking.server.MaskingServer`) runs its stages, one message per
site and stage; only the SUM goes back to the engine and ``Strategy.aggregate``.

A round of several upload cohorts (FedDiffuse ``usplit``: ``front`` and ``back``) runs one
masking session per cohort in the same stage messages (:meth:`Coordinator._run_sessions`):
each message carries a site's payload per session (``secagg.<cohort>``), each session is bound
to its cohort and the round's client list (:func:`~securefed.deploy.common.cohort_session`),
and one that aborts leaves the other to complete (``cohorts_abandoned``), as in the simulation.

Every run has a fresh run id (:func:`~securefed.deploy.common.new_run_id`), sent at setup and
with every message; the masking protocol binds it into every signature, key derivation and AEAD
header, and each site refuses messages of any other run (:mod:`securefed.deploy.node`).

Resume (``CoordinatorOptions.resume``, run config ``resume=true``): a coordinator that stopped
(crash, lost machine) continues the SAME run from the run directory's latest checkpoint ``c``:
it reads the run id from ``sites.json``, restores the engine exactly as the simulation's resume
does (global model, strategy state with its EMA, ``metrics.jsonl`` truncated to ``c``, the canary
rounds after ``c`` dropped), and runs setup again proposing that run id marked as a resume. Each
site accepts only a run it accepted before, with the experiment it accepted for it, and replies
with its last trained round ``t_i``; a site never trains a round at or below it, so the run
continues at ``r0 = max(c, max_i t_i) + 1``. Rounds ``c + 1 .. r0 - 1`` are lost: recorded as
abandoned rounds (the model is ``c``'s), their charges stay on the sites' ledgers. A site's
pending private strategy state (SCAFFOLD, FedDiffuse) is committed by the first round it trains
only if its last trained round is in the checkpointed history and its update was used there
(:meth:`Coordinator._restore`); otherwise it is dropped.

Dropouts are real: a site that does not answer a stage within the stage timeout (crashed,
disconnected, or its reply failed a protocol check) is offline for the rest of the round, and
the masking protocol's recovery removes its masks (its s-key shares) if its masked input never
arrived. The round completes if the threshold is met at every stage; otherwise it is abandoned
and the global model is unchanged (fail closed), as in the simulation. A protocol error when a
stage closes (e.g. a secret that no ``t`` of the returned Shamir shares reconstruct) abandons the
round too; it never ends the run. Wrong shares that the robust reconstruction could correct are
blamed on the sites that returned them (``protocol_info.bad_share_holders``).

Audit canaries (``canaries.enabled``): the coordinator keeps the canary secret and files under
``RUN_DIR/canaries/`` exactly as the simulation; at record level it sends each site only its own
canaries and the round's sampling key (signed, :mod:`securefed.deploy.canaries`) and commits the
scores the sites return, at client level it runs the canary clients on the round's noised sum
itself (:class:`~securefed.privacy.canaries.ClientCanaryRound`, shared with the simulation).

How messages reach the sites is abstract (:class:`SiteChannel`, not to be confused with the
engine's transport, which the coordinator itself is): :mod:`securefed.deploy.server_app`
implements it over Flower's ``Grid``; tests may implement it in-process.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml

from securefed.artefacts.checkpoint import Checkpoint, CheckpointError, load_latest
from securefed.artefacts.rundir import RunDir
from securefed.builders import (
    build_model,
    build_strategy_stack,
    cache_dir,
    client_level_schedule,
    fedddpm_wrapper,
    resolve_device,
)
from securefed.config import ExperimentConfig, config_differences, dump_config, parse_config
from securefed.deploy.canaries import decode_scores, encode_assignment
from securefed.deploy.common import (
    DeployConfigError,
    check_deployable,
    client_level_layer,
    cohort_session,
    find_layer,
    new_run_id,
    round_masking_params,
    run_masking_params,
)
from securefed.deploy.common import roster_digest as _roster_digest
from securefed.deploy.wire import (
    MESSAGE_CKKS_DECRYPT,
    MESSAGE_CKKS_UPLOAD,
    MESSAGE_PHASE0,
    MESSAGE_SETUP,
    PROTOCOL_VERSION,
    WireError,
    decode_vector,
    encode_vector,
    get_bytes,
    get_int,
    get_str,
    pack_chunks,
    stage_message_type,
    unpack_chunks,
)
from securefed.diffusion import NoiseSchedule
from securefed.diffusion.params import get_flat, num_params, set_flat
from securefed.diffusion.sampling import sample
from securefed.federation.auxiliary import AuxiliarySet, load_auxiliary, save_auxiliary
from securefed.federation.engine import ClientRound, ClientTransport, RoundEngine
from securefed.federation.public_pretrain import public_pretrain
from securefed.federation.record import RoundRecord, read_records
from securefed.io import atomic_write_bytes, atomic_write_json, atomic_write_text, write_jsonl
from securefed.privacy.canaries import (
    CanaryClients,
    ClientCanaryRound,
    GradientCanaries,
    discard_rounds_after,
)
from securefed.secagg.base import AggregationAbortedError, resolve_threshold
from securefed.secagg.keys import load_roster, load_server_key
from securefed.secagg.masking.messages import ProtocolError, Stage
from securefed.secagg.masking.quantize import quantization_error_bound
from securefed.secagg.masking.server import MaskingServer
from securefed.seeds import Purpose, derive_seed
from securefed.strategies import CohortSum, Strategy, unpack_sum
from securefed.strategies.base import sample_clients
from securefed.strategies.fedddpm import allocate_proportional
from securefed.strategies.feddiffuse import FedDiffuse

__all__ = [
    "Coordinator",
    "CoordinatorOptions",
    "DeployResult",
    "SiteChannel",
    "SiteInfo",
]

log = logging.getLogger(__name__)

#: a reply: the message content, or a string saying why there is none (error reply)
Reply = Mapping[str, Any] | str


class SiteChannel(Protocol):
    """How the coordinator reaches the sites (Flower's Grid in a deployment)."""

    def node_ids(self) -> list[int]:
        """Channel ids (Flower node ids) of the sites connected now."""
        ...

    def exchange(
        self,
        message_type: str,
        contents: Mapping[int, Mapping[str, Any]],
        *,
        timeout: float,
        group: str,
    ) -> dict[int, Reply]:
        """Send ``contents[node]`` to each node; return the replies that arrived in time."""
        ...


@dataclass(frozen=True)
class CoordinatorOptions:
    """Deployment settings of the coordinator (Flower run config)."""

    run_dir: Path
    keys_dir: Path
    min_sites: int
    join_timeout: float = 300.0
    stage_timeout: float = 120.0
    train_timeout: float = 900.0
    #: carry the next round's RoundStart with this round's unmasking request (and the sites'
    #: keys with their replies): one Flower message fewer per round, see docs/deploy.md
    advertise_ahead: bool = True
    #: continue the run in ``run_dir`` from its latest checkpoint (same run id, see the module
    #: docstring) instead of starting a new run in an empty ``run_dir``
    resume: bool = False


@dataclass(frozen=True)
class SiteInfo:
    """What a site told the coordinator at setup (public facts, no data)."""

    client_id: int
    node_id: int
    num_examples: int
    image_shape: tuple[int, int, int]
    num_classes: int


@dataclass
class DeployResult:
    """What a deployed run produced: ``metrics`` holds every line of ``metrics.jsonl``
    (earlier sessions of a resumed run included); ``final_params`` is ``[D]``."""

    run_dir: Path
    rounds_completed: int
    final_params: torch.Tensor
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _ResumePoint:
    """What a resumed coordinator reads from the run directory before setup."""

    run_id: str
    checkpoint: Checkpoint
    #: client id -> #examples of every site of the run's first setup (``sites.json``)
    sites: dict[int, int]
    weight_scale: float
    image_shape: tuple[int, int, int]
    num_classes: int


def _next_round_reply(reply: Reply | None, cid: int, rnd: int) -> Mapping[str, Any]:
    """Site ``cid``'s unmasking reply as the carrier of its keys for round ``rnd`` (keys
    advertised ahead); :class:`WireError` if it is an error, a refusal or for another round."""
    if not isinstance(reply, Mapping):
        raise WireError(reply or "no reply")
    if "next_refused" in reply:
        raise WireError(f"refused: {reply['next_refused']}")
    if get_int(reply, "next_round", f"site {cid}") != rnd:
        raise WireError(f"keys for round {reply.get('next_round')}, not {rnd}")
    return reply


@dataclass
class _Ahead:
    """Round ``rnd`` started during the previous round's unmasking stage."""

    rnd: int
    clients: tuple[int, ...]
    length: int
    server: Any  # MaskingServer (imported lazily)
    outgoing: dict[int, bytes]
    sent: set[int] = field(default_factory=set)
    advertised: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)

    def receive(self, cid: int, reply: Reply | None) -> int:
        """Feed site ``cid``'s advertised keys from its unmasking reply to the next round's
        server; returns the bytes received."""
        try:
            reply = _next_round_reply(reply, cid, self.rnd)
            data = get_bytes(reply, "next_secagg", f"site {cid}")
            self.server.receive(cid, data)
        except (WireError, ProtocolError, KeyError, TypeError, ValueError) as exc:
            self.failed[cid] = f"{type(exc).__name__}: {exc}"
            return 0
        self.advertised.add(cid)
        return len(data)


def _layout_length(layout: Any) -> int:
    """The packed vector length of a layout (a ``ClientUpdate``): its vectors and the weight."""
    return int(sum(v.numel() for v in layout.vectors.values())) + 1


@dataclass
class _Session:
    """One masking session of a multi-cohort round (FedDiffuse ``usplit``: ``front``,
    ``back``): its members, the layout they send, its server and its live sites."""

    name: str
    members: list[int]
    layout: Any  # ClientUpdate: the cohort's vector names and sizes
    keys: list[str]
    length: int
    server: Any  # MaskingServer
    outgoing: dict[int, bytes]
    live: set[int]
    aborted: str | None = None
    #: site -> the stage at which it left this session
    dropped: dict[int, str] = field(default_factory=dict)

    def drop(self, cid: int, stage: str) -> None:
        """Site ``cid`` is out of this session from ``stage`` on."""
        if cid in self.live:
            self.live.discard(cid)
            self.dropped.setdefault(cid, stage)


@dataclass
class _AheadSessions:
    """Round ``rnd``'s sessions (FedDiffuse ``usplit``), started during the previous round's
    unmasking stage: their RoundStarts ride on its request (``next_secagg.<cohort>``)."""

    rnd: int
    clients: tuple[int, ...]
    sessions: dict[str, _Session]
    sent: set[int] = field(default_factory=set)
    #: sites whose keys arrived in every session they are in
    advertised: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)

    def outgoing(self, cid: int) -> dict[str, bytes]:
        """Site ``cid``'s RoundStart per session of the next round (empty: not in it)."""
        return {n: s.outgoing[cid] for n, s in self.sessions.items() if cid in s.outgoing}

    def receive(self, cid: int, reply: Reply | None) -> int:
        """Feed site ``cid``'s advertised keys (``next_secagg.<cohort>``) from its unmasking
        reply to each next-round session it is in; returns the bytes received. A site whose
        keys miss or fail in any of its sessions is failed (dropped from the next round)."""
        total = 0
        try:
            reply = _next_round_reply(reply, cid, self.rnd)
            for name, s in self.sessions.items():
                if cid in s.members:
                    data = get_bytes(reply, f"next_secagg.{name}", f"site {cid}")
                    s.server.receive(cid, data)
                    total += len(data)
        except (WireError, ProtocolError, KeyError, TypeError, ValueError) as exc:
            self.failed[cid] = f"{type(exc).__name__}: {exc}"
            return total
        self.advertised.add(cid)
        return total


class Coordinator(ClientTransport):
    """Runs an experiment over a :class:`SiteChannel`: the round engine's deployed
    :class:`~securefed.federation.engine.ClientTransport`.

    Args:
        cfg: the experiment (sent to every site at setup; the sites validate it themselves).
        options: run directory, key folder (``server.key`` + ``roster.json``), timeouts.
        channel: how messages reach the sites (the network).
        on_event: optional ``(event dict) -> None`` called at every stage boundary (tests and
            operators watch progress; the same events go to ``<run_dir>/status.json``).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        options: CoordinatorOptions,
        channel: SiteChannel,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        check_deployable(cfg)
        if options.min_sites < 2:
            raise DeployConfigError(
                f"min-sites: {options.min_sites}; secure aggregation needs at least 2 sites"
            )
        self.cfg = cfg
        self.options = options
        self.channel = channel
        self.on_event = on_event
        self.sites: dict[int, SiteInfo] = {}
        self.run_id = new_run_id()  # fresh per run; every site must accept it at setup
        self._resume: _ResumePoint | None = None  # options.resume: read by start()
        self._resumed_last: dict[int, int] = {}  # resume: client -> its last trained round
        self.rows: list[RoundRecord] = []  # metrics.jsonl (a resumed run's earlier rounds too)
        self._last_trained: dict[int, int] = {}  # client -> last round it trained in
        self._survivors: dict[int, set[int]] = {}  # round -> clients whose update was used
        # the next round, started with this round's unmask (one session, or usplit's sessions)
        self._ahead: _Ahead | _AheadSessions | None = None
        self._exhausted: set[int] = set()  # sites that reported an exhausted budget
        #: audit (canaries.enabled): the run's gradient canaries (record level) or canary
        #: clients (client level), their folder, and the round being scored
        self._canaries: GradientCanaries | CanaryClients | None = None
        self._canary_scores: np.ndarray | None = None
        self._canary_round: ClientCanaryRound | None = None
        self._canary_eps_cache: dict[tuple[float, ...], float] = {}
        self.engine: RoundEngine  # built by start()

    # ------------------------------------------------------------------ helpers
    def _event(self, **values: Any) -> None:
        values["time"] = time.time()
        atomic_write_json(RunDir(self.options.run_dir).status, values)
        if self.on_event is not None:
            self.on_event(values)

    def _wait_for_sites(self) -> list[int]:
        deadline = time.monotonic() + self.options.join_timeout
        while True:
            nodes = sorted(self.channel.node_ids())
            if len(nodes) >= self.options.min_sites:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} SuperNode(s) connected within join-timeout="
                    f"{self.options.join_timeout:g} s, min-sites={self.options.min_sites}; start "
                    "more SuperNodes or lower min-sites"
                )
            time.sleep(0.5)

    def setup(self) -> None:
        """Send the experiment to every connected site and collect their public facts."""
        self._server_key = load_server_key(self.options.keys_dir)
        self._roster = load_roster(self.options.keys_dir)
        digest = _roster_digest(self.options.keys_dir)
        nodes = self._wait_for_sites()
        self._event(stage="setup", nodes=len(nodes))
        content: dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "run_id": self.run_id,
            "experiment": dump_config(self.cfg),
        }
        resume = self._resume
        if resume is not None:  # the same run id, continued: each site checks it knows it
            content["resume"] = 1
        # setup loads the site's data and calibrates its noise: as slow as training
        replies = self.channel.exchange(
            MESSAGE_SETUP, dict.fromkeys(nodes, content),
            timeout=self.options.train_timeout, group="setup",
        )
        refused: dict[int, str] = {}
        for node in nodes:
            r = replies.get(node)
            who = f"SuperNode {node}"
            last = 0  # resume: the site's last trained round of the run
            if r is None:
                refused[node] = "no reply to setup"
                continue
            if isinstance(r, str):
                refused[node] = r
                continue
            try:
                if get_str(r, "version", who) != PROTOCOL_VERSION:
                    raise WireError(f"{who}: protocol version {r.get('version')!r}")
                if get_str(r, "run_id", who) != self.run_id:
                    raise WireError(f"{who}: accepted run {r.get('run_id')!r}, not this run")
                cid = get_int(r, "client_id", who, minimum=0)
                if get_str(r, "roster_sha256", who) != digest:
                    raise WireError(
                        f"{who} (client {cid}): its roster.json differs from the coordinator's; "
                        "distribute the same roster to every party"
                    )
                shape = r.get("image_shape")
                if not (isinstance(shape, list) and len(shape) == 3):
                    raise WireError(f"{who}: image_shape: expected 3 integers")
                info = SiteInfo(
                    client_id=cid,
                    node_id=node,
                    num_examples=get_int(r, "num_examples", who, minimum=1),
                    image_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
                    num_classes=get_int(r, "num_classes", who, minimum=1),
                )
                if resume is not None:
                    last = self._check_resumed_site(r, info, resume, who)
            except WireError as exc:
                refused[node] = str(exc)
                continue
            if cid in self.sites:
                raise DeployConfigError(
                    f"client id {cid} is claimed by SuperNodes {self.sites[cid].node_id} and "
                    f"{node}; give every site its own client-id in --node-config"
                )
            if self._roster.client(cid) is None:
                refused[node] = f"client id {cid} is not in the roster"
                continue
            self.sites[cid] = info
            if resume is not None:
                self._resumed_last[cid] = last
        for node, reason in refused.items():
            log.warning("SuperNode %d refused or failed setup: %s", node, reason)
        if len(self.sites) < self.options.min_sites:
            raise DeployConfigError(
                f"only {len(self.sites)} site(s) accepted the experiment, min-sites="
                f"{self.options.min_sites}; refusals: {refused}"
            )
        shapes = {s.image_shape for s in self.sites.values()}
        if len(shapes) != 1:
            raise DeployConfigError(
                f"sites report different image shapes {sorted(shapes)}; set data.image_size "
                "and data.channels in the experiment"
            )
        self.image_shape = next(iter(shapes))
        self.num_classes = max(s.num_classes for s in self.sites.values())
        self._refused = refused
        if resume is not None:  # the model of the run: its shape does not follow who rejoined
            self.num_classes = resume.num_classes

    def _check_resumed_site(
        self, reply: Mapping[str, Any], info: SiteInfo, resume: _ResumePoint, who: str
    ) -> int:
        """A site's resume reply: a site of the run's first setup with the same data facts;
        returns its last trained round of the run.

        Raises:
            WireError: naming the field (the site is then left out of the resumed run).
        """
        cid = info.client_id
        rounds = self.cfg.federation.rounds
        last = get_int(reply, "last_trained_round", who, minimum=0)
        if last > rounds:
            raise WireError(f"{who}: last_trained_round: {last} is above federation.rounds "
                            f"{rounds}")
        if cid not in resume.sites:
            raise WireError(
                f"{who}: client {cid} was not a site of run {self.run_id} at its first setup "
                f"(sites.json: {sorted(resume.sites)}); a site joins a run at its setup only"
            )
        if info.num_examples != resume.sites[cid]:
            raise WireError(
                f"{who}: num_examples: {info.num_examples}, the run was set up with "
                f"{resume.sites[cid]} for client {cid}; its data changed since (its ledger and "
                "the aggregation weights were planned for the first)"
            )
        if info.image_shape != resume.image_shape or info.num_classes > resume.num_classes:
            raise WireError(
                f"{who}: image_shape {list(info.image_shape)} / num_classes {info.num_classes}: "
                f"the run's model is for {list(resume.image_shape)} with {resume.num_classes} "
                "classes (model.json, label_histogram.json)"
            )
        return last

    # ------------------------------------------------------------------ the run
    def run(self, *, stop_after_round: int | None = None) -> DeployResult:
        """Setup, then every configured round through the round engine (the simulation's loop:
        metrics, checkpoints every ``checkpoint.every`` rounds, the budget stop rule); with
        ``options.resume`` the rounds after the run's latest checkpoint (:meth:`start`).

        Args:
            stop_after_round: stop after this round (checkpointed), as if the coordinator were
                killed there: resume tests (status ``interrupted``, not ``finished``).
        """
        meta = self.start()
        stop = self.engine.run(self.options.run_dir, self.rows, meta, last=stop_after_round)
        done = stop is not None or self.engine.round >= self.cfg.federation.rounds
        self._event(stage="finished" if done else "interrupted", round=self.engine.round)
        return DeployResult(
            self.options.run_dir, self.engine.round, self.global_params.clone(),
            [r.to_json() for r in self.rows],
        )

    @property
    def strategy(self) -> Strategy:
        """The server rule (owned by the engine)."""
        return self.engine.strategy

    @property
    def global_params(self) -> torch.Tensor:
        """``[D]`` the current global model (owned by the engine)."""
        return self.engine.global_params

    def start(self) -> dict[str, Any]:
        """Create the run directory, run setup, build the model and strategy; returns the
        checkpoint metadata. :meth:`run_round` may be called after it. With
        ``options.resume``: read the run (:meth:`_read_resume_point`), run setup as a resume,
        and restore the engine (:meth:`_restore`)."""
        run_dir = self.options.run_dir
        if self.options.resume:
            self._resume = self._read_resume_point()
            self.run_id = self._resume.run_id  # the run continues under its own id
        else:
            # written by the ServerApp before the run
            own = {RunDir(run_dir).status.name, "coordinator.log"}
            if run_dir.exists() and any(p.name not in own for p in run_dir.iterdir()):
                raise FileExistsError(
                    f"run directory {run_dir} already exists and is not empty; give a new "
                    "run-dir, or resume=true to continue the run in it"
                )
        run_dir.mkdir(parents=True, exist_ok=True)
        self.setup()
        cfg = self.cfg
        resume = self._resume
        model = build_model(cfg, self.image_shape, self.num_classes)
        if cfg.pretrain.enabled and resume is None:  # on resume the checkpoint holds the model
            self._public_pretrain(model)
        # the aggregation weights' scale is the run's (a site missing at a resume keeps it)
        self.weight_scale = (
            resume.weight_scale if resume is not None
            else float(sum(s.num_examples for s in self.sites.values()))
        )
        self.engine = RoundEngine(
            cfg, build_strategy_stack(cfg, model, self.weight_scale), self, get_flat(model)
        )
        self._numel = int(self.global_params.numel())
        self.params = run_masking_params(cfg, self.run_id)
        if cfg.canaries.enabled:  # audit-only secrets under canaries/ (0600), as the simulation
            canary_dir = RunDir(run_dir).canaries
            if cfg.dp.level == "record":
                self._canaries = GradientCanaries.create_or_load(
                    canary_dir, model, cfg.canaries.m, cfg.federation.num_clients,
                    cfg.dp.max_grad_norm,
                )
            else:
                self._canaries = CanaryClients.create_or_load(canary_dir, model, cfg.canaries.m)
        if cfg.secure_aggregation.protocol == "ckks":
            self._ckks = self._ckks_server()
        if cfg.fedddpm.enabled:
            self.engine.strategy = (
                self._fedddpm_phase0(model) if resume is None
                else self._fedddpm_reload(model, resume)
            )
        meta = {"name": cfg.name, "parameters": num_params(model), "deployment": "flower"}
        if resume is not None:
            self._restore(resume, meta)
            return meta
        atomic_write_text(RunDir(run_dir).config, dump_config(cfg))
        atomic_write_json(
            RunDir(run_dir).model_info,
            {
                "parameters": num_params(model),
                "groups": {k: len(v) for k, v in model.parameter_groups().items()},
                "image_shape": list(self.image_shape),
            },
        )
        # what `securefed sample RUN_DIR` needs; the label counts themselves stay at the sites
        atomic_write_json(
            RunDir(run_dir).label_histogram,
            {"num_classes": self.num_classes, "class_names": [], "counts": [],
             "members": int(self.weight_scale), "holdout": 0},
        )
        atomic_write_json(
            RunDir(run_dir).sites,
            {
                "sites": {
                    str(c): {"node_id": s.node_id, "num_examples": s.num_examples}
                    for c, s in sorted(self.sites.items())
                },
                "refused": {str(n): r for n, r in self._refused.items()},
                "run_id": self.run_id,
                "weight_scale": self.weight_scale,
            },
        )
        return meta

    def _read_resume_point(self) -> _ResumePoint:
        """``resume=true``: the run's config (must equal the experiment given), run id, sites
        and latest checkpoint, before anything is sent.

        Raises:
            DeployConfigError: naming the file or field, and the fix.
        """
        rd, cfg = RunDir(self.options.run_dir), self.cfg
        where = f"resume=true: run-dir {self.options.run_dir}"
        for path in (rd.config, rd.sites, rd.model_info, rd.label_histogram):
            if not path.is_file():
                raise DeployConfigError(
                    f"{where} has no {path.name}: not a deployed run that finished its setup; "
                    "start a new run (a new run-dir, without resume=true)"
                )
        saved = parse_config(yaml.safe_load(rd.config.read_text(encoding="utf-8")))
        diffs = config_differences(saved, cfg)
        if diffs:
            raise DeployConfigError(
                f"{where}: the experiment differs from the run's config.yaml in {diffs}; a "
                "resumed run keeps its experiment (the sites refuse another one): resume with "
                f"experiment=\"{rd.config}\" (or leave experiment empty)"
            )
        facts = json.loads(rd.sites.read_text(encoding="utf-8"))
        run_id = facts.get("run_id")
        if not (isinstance(run_id, str) and re.fullmatch(r"[0-9a-f]{32}", run_id)):
            raise DeployConfigError(f"{where}: {rd.sites.name}: run_id: {run_id!r} is not a run id")
        try:
            ckpt = load_latest(rd.checkpoints)
        except CheckpointError as exc:
            raise DeployConfigError(
                f"{where}: {exc}. Without a checkpoint there is nothing to continue: start a new "
                "run (the sites' ledgers keep the charges of this one)"
            ) from None
        if ckpt.meta.get("deployment") != "flower":
            raise DeployConfigError(
                f"{where}: its checkpoint is not a deployed run's (meta {ckpt.meta}); resume a "
                "simulated run with `securefed run --resume RUN_DIR`"
            )
        if ckpt.round >= cfg.federation.rounds:
            raise DeployConfigError(
                f"{where}: run {run_id} finished: its latest checkpoint is round {ckpt.round} "
                f"of federation.rounds={cfg.federation.rounds}; nothing to resume"
            )
        if rd.stopped.exists():
            why = json.loads(rd.stopped.read_text(encoding="utf-8")).get("reason")
            raise DeployConfigError(
                f"{where}: run {run_id} stopped by the budget rule ({rd.stopped.name}: {why}); "
                "nothing to resume"
            )
        sites = {int(c): int(v["num_examples"]) for c, v in facts.get("sites", {}).items()}
        info = json.loads(rd.model_info.read_text(encoding="utf-8"))
        hist = json.loads(rd.label_histogram.read_text(encoding="utf-8"))
        shape = [int(v) for v in info["image_shape"]]
        return _ResumePoint(
            run_id=run_id,
            checkpoint=ckpt,
            sites=sites,
            weight_scale=float(facts.get("weight_scale", sum(sites.values()))),
            image_shape=(shape[0], shape[1], shape[2]),
            num_classes=int(hist["num_classes"]),
        )

    def _restore(self, resume: _ResumePoint, meta: Mapping[str, Any]) -> None:
        """Restore the engine from checkpoint ``c`` and continue above every site's last
        trained round: ``r0 = max(c, max_i t_i) + 1``.

        - ``metrics.jsonl`` keeps the rounds up to ``c``; rounds ``c + 1 .. r0 - 1`` are
          written as abandoned (lost) rounds, the model unchanged, and checkpointed so; the
          sites keep their charges of them. The canary rounds after ``c`` are deleted.
        - Private strategy state: the first round a site trains commits its pending state iff
          its last trained round ``t_i <= c`` and its update is in that round's sum (the
          ``participants`` of line ``t_i``): for ``t_i == c`` exactly "checkpoint ``c`` holds
          its round-``c`` update", and for ``t_i < c`` what the uninterrupted run would have
          sent; otherwise (``t_i > c``: a lost round's state) the pending state is dropped."""
        rd, cfg = RunDir(self.options.run_dir), self.cfg
        ckpt = resume.checkpoint
        self.engine.restore(ckpt)
        c = ckpt.round
        rows = [r for r in read_records(rd.metrics) if r.round <= c] if rd.metrics.exists() else []
        used = {r.round: set(r.participants or ()) for r in rows}
        last = dict(sorted(self._resumed_last.items()))
        for cid, t in last.items():
            if t > 0:
                self._last_trained[cid] = t
                if t <= c:
                    self._survivors[t] = used.get(t, set())
        r0 = max([c, *last.values()]) + 1
        lost = list(range(c + 1, r0))
        why = (
            f"lost: the coordinator stopped after checkpointing round {c} and resumed; the sites "
            f"had trained up to round {r0 - 1} (last trained rounds {last}) and train no round "
            "twice: this round's sum was never checkpointed, the model is round "
            f"{c}'s, and the sites' charges for it stand"
        )
        for rnd in lost:
            rows.append(RoundRecord(round=rnd, participants=[], abandoned=why))
        self.engine.round = r0 - 1
        write_jsonl(rd.metrics, [r.to_json() for r in rows])
        dropped = discard_rounds_after(rd.canaries, c) if cfg.canaries.enabled else []
        if lost:  # the model after the lost rounds is c's: checkpointed as their round
            self.engine.save(rd.checkpoints, meta)
            log.warning("resume: rounds %s are lost (%s)", lost, why)
        self.rows = rows
        facts = json.loads(rd.sites.read_text(encoding="utf-8"))
        facts.setdefault("resumes", []).append({
            "time": time.time(),
            "checkpoint": c,
            "first_round": r0,
            "lost_rounds": lost,
            "sites": {
                str(cid): {"node_id": s.node_id, "last_trained_round": last[cid]}
                for cid, s in sorted(self.sites.items())
            },
            "refused": {str(n): r for n, r in self._refused.items()},
            "canary_rounds_deleted": dropped,
        })
        atomic_write_json(rd.sites, facts)
        log.info("resumed run %s after checkpoint %d at round %d", self.run_id, c, r0)
        self._event(stage="resumed", checkpoint=c, first_round=r0, lost_rounds=lost,
                    last_trained={str(k): v for k, v in last.items()})

    def _fedddpm_reload(self, model: torch.nn.Module, resume: _ResumePoint) -> Any:
        """Resume with ``fedddpm.enabled``: the run's stored auxiliary set (SHA-256 verified;
        phase 0 ran once, the sites refuse a second) around the strategy, as the simulation's
        resume reloads it."""
        cfg = self.cfg
        aux, _ = load_auxiliary(self.options.run_dir)
        dev = resolve_device(cfg.device)
        return fedddpm_wrapper(
            cfg, self.strategy, model.to(dev), NoiseSchedule.from_config(cfg.diffusion), dev,
            aux, [n for _, n in sorted(resume.sites.items())],
        )

    def run_round(self, rnd: int) -> dict[str, Any]:
        """One round of the engine over the network (after :meth:`start`); returns its
        ``metrics.jsonl`` line. :meth:`run` runs every round through the same engine."""
        return self.engine.run_round(rnd).to_json()

    # ------------------------------------------------------------------ ClientTransport
    def client_ids(self) -> list[int]:
        return sorted(self.sites)

    def commit(self, rnd: int, participants: list[int]) -> None:
        """The sites learn it with their next round's training message (``commit``)."""
        self._survivors[rnd] = set(participants)

    def can_continue(self, next_round: int, strategy: Any) -> str | None:
        if self._exhausted and self._exhausted >= set(self.sites):
            return f"every site's privacy budget is exhausted after round {next_round - 1}"
        return None

    def run_clients(
        self, rnd: int, plan: Any, strategy: Any, rng: np.random.Generator
    ) -> ClientRound:
        """Round ``rnd``'s stages over the network: every selected site trains at its training
        stage (on its own machine) and the masking (or CKKS) protocol returns only the sum.

        Audit canaries (``canaries.enabled``) are scored and committed under ``canaries/`` for
        every round, as the simulation commits them: gradient canaries from the scores each
        trained site returns with its training reply, placed at their global indices (a site
        that trained but sent no valid scores is dropped and its canaries score 0 that round);
        canary clients from the round's noised sum (:class:`ClientCanaryRound`)."""
        canaries, canary_dir = self._canaries, RunDir(self.options.run_dir).canaries
        self._canary_scores = self._canary_round = None
        if isinstance(canaries, GradientCanaries):
            self._canary_scores = np.zeros(len(canaries), dtype=np.float64)
        elif isinstance(canaries, CanaryClients):
            self._canary_round = ClientCanaryRound.for_round(
                canaries, canary_dir, rnd, len(plan.clients), self.cfg.federation.num_clients,
                client_level_layer(strategy), self.cfg.dp.target_epsilon,
                client_level_schedule(self.cfg)[1], self.cfg.dp.accountant,
                self._canary_eps_cache,
            )
        out = self._run_clients(rnd, plan, strategy)
        if isinstance(canaries, GradientCanaries) and self._canary_scores is not None:
            canaries.commit(canary_dir, rnd, self._canary_scores)  # audit-only, 0600
        if self._canary_round is not None:
            self._canary_round.commit()  # a round that released nothing: no participation
        return out

    def _canary_content(self, rnd: int, cid: int) -> dict[str, Any]:
        """Site ``cid``'s gradient canaries of round ``rnd`` (its own only, with the round's
        sampling key), signed for this run; empty without gradient canaries."""
        c = self._canaries
        if not isinstance(c, GradientCanaries):
            return {}
        sel = c.owned_by(cid)
        blob = encode_assignment(
            self._server_key, bytes.fromhex(self.run_id), rnd, cid, c.sampling_key(rnd, cid),
            c.param_index[sel], c.offset[sel], c.signs[sel], c.included[sel],
        )
        return {"canaries": blob}

    def _receive_canary_scores(self, rnd: int, cid: int, reply: Mapping[str, Any]) -> int:
        """Add a trained site's signed canary scores at its canaries' global indices; returns
        the bytes received (0 without gradient canaries).

        Raises:
            WireError: no scores, or scores that do not verify under the site's roster key."""
        c, acc = self._canaries, self._canary_scores
        if not isinstance(c, GradientCanaries) or acc is None:
            return 0
        key = self._roster.client(cid)
        if key is None:  # pragma: no cover - setup admits roster sites only
            raise WireError(f"site {cid}: not in the roster")
        sel = c.owned_by(cid)
        data = reply.get("canary_scores")
        acc[sel] += decode_scores(
            data, key, bytes.fromhex(self.run_id), rnd, cid, int(sel.size)
        )
        return len(data) if isinstance(data, bytes) else 0

    def _run_clients(self, rnd: int, plan: Any, strategy: Any) -> ClientRound:
        """:meth:`run_clients` without the canaries' bookkeeping."""
        cfg = self.cfg
        cohorts = self._cohort_layouts(rnd, plan, strategy)
        if len(cohorts) != 1:
            if cfg.secure_aggregation.protocol != "masking":  # pragma: no cover - refused
                raise DeployConfigError(  # by check_deployable
                    f"secure_aggregation.protocol: {cfg.secure_aggregation.protocol!r}: a round "
                    f"of {len(cohorts)} upload cohorts runs on masking only"
                )
            return self._run_sessions(rnd, plan, cohorts)
        ((cohort, (_, layout)),) = cohorts.items()
        self._layout = layout
        keys = sorted(layout.vectors)
        length = int(sum(layout.vectors[k].numel() for k in keys)) + 1
        names = sorted(plan.broadcast)
        broadcast = {f"broadcast.{n}": encode_vector(plan.broadcast[n]) for n in names}
        bcast_bytes = sum(len(b) for b in broadcast.values())
        if cfg.secure_aggregation.protocol == "ckks":
            return self._run_round_ckks(rnd, plan.clients, keys, length, broadcast, names,
                                        bcast_bytes, cohort)

        seconds: dict[str, float] = {}
        dropped_at: dict[int, str] = {}
        reasons: dict[int, str] = {}
        exhausted: list[int] = []
        trained: list[int] = []
        epsilon: dict[str, float] = {}
        up = dict.fromkeys(plan.clients, 0)
        down = dict.fromkeys(plan.clients, 0)
        ahead, self._ahead = self._ahead, None
        train_stage = dict.fromkeys(plan.clients, Stage.ADVERTISE_KEYS)
        if (
            isinstance(ahead, _Ahead)
            and ahead.rnd == rnd
            and ahead.clients == tuple(plan.clients)
            and ahead.length == length
        ):
            # this round's keys were advertised with the last round's unmasking replies: the
            # sites that advertised train when the key broadcast (with the model) reaches them
            server, outgoing = ahead.server, ahead.outgoing
            for cid in ahead.advertised:
                train_stage[cid] = Stage.SHARE_KEYS
            skip = set(ahead.sent)  # sent their RoundStart already
            failed_ahead = {
                c: ahead.failed.get(c, "no keys for this round with the last unmasking reply")
                for c in ahead.sent - ahead.advertised
            }
        else:
            try:
                server = MaskingServer(
                    rnd, plan.clients, length, self._round_params(len(plan.clients), length),
                    self._roster, self._server_key, record_view=False,
                )
            except ValueError as exc:
                return self._abandon(f"round {rnd} cannot run: {exc}", "masking")
            outgoing = server.start()
            skip, failed_ahead = set(), {}
        live = set(plan.clients)
        aborted: str | None = None
        for stage in Stage.path(self.params.consistency_check):
            t0 = time.perf_counter()
            if stage == Stage.ADVERTISE_KEYS:
                for cid, why in sorted(failed_ahead.items()):
                    live.discard(cid)
                    dropped_at.setdefault(cid, stage)
                    reasons.setdefault(cid, why)
            for cid in sorted(live - set(outgoing)):  # pruned or rejected by the server
                live.discard(cid)
                dropped_at.setdefault(cid, stage)
            ahead_next = self._start_ahead(rnd, length, live) if (
                stage == Stage.UNMASKING
            ) else None
            contents: dict[int, dict[str, Any]] = {}
            for cid in sorted(live):
                if stage == Stage.ADVERTISE_KEYS and cid in skip:
                    continue  # advertised with the last round's unmasking reply
                c: dict[str, Any] = {
                    "round": rnd, "stage": stage, "run_id": self.run_id, "secagg": outgoing[cid]
                }
                if stage == train_stage[cid]:
                    c.update(self._training_content(rnd, cid, broadcast, names))
                    down[cid] += bcast_bytes + len(c.get("canaries", b""))
                if ahead_next is not None and cid in ahead_next.outgoing:
                    c.update(next_round=rnd + 1, next_secagg=ahead_next.outgoing[cid])
                    ahead_next.sent.add(cid)
                    down[cid] += len(ahead_next.outgoing[cid])
                down[cid] += len(outgoing[cid])
                contents[self.sites[cid].node_id] = c
            self._event(round=rnd, stage=stage, state="sent", clients=sorted(live))
            trains = any(train_stage[c] == stage for c in live)
            timeout = self.options.train_timeout if trains else self.options.stage_timeout
            replies = (
                self.channel.exchange(
                    stage_message_type(stage), contents, timeout=timeout, group=str(rnd)
                )
                if contents
                else {}
            )
            for cid in sorted(live):
                if self.sites[cid].node_id not in contents:
                    continue
                r = replies.get(self.sites[cid].node_id)
                who = f"site {cid}"
                reason = _missing_reply(r, timeout)
                if r is not None and not isinstance(r, str):
                    try:
                        reason = self._check_reply(
                            r, rnd, cid, stage == train_stage[cid], keys,
                            "the strategy expects", epsilon, trained, exhausted, up,
                        )
                        if reason is None:
                            data = get_bytes(r, "secagg", who)
                            up[cid] += len(data)
                            server.receive(cid, data)
                    except (WireError, ProtocolError, KeyError, TypeError, ValueError) as exc:
                        # the server changed no state: the offender is treated as dropped
                        reason = f"{type(exc).__name__}: {exc}"
                    if ahead_next is not None and cid in ahead_next.sent:
                        up[cid] += ahead_next.receive(cid, r)
                if reason is not None:
                    live.discard(cid)
                    dropped_at.setdefault(cid, stage)
                    reasons[cid] = reason
                    log.warning("round %d, stage %s: site %d dropped: %s", rnd, stage, cid, reason)
            try:
                outgoing = server.close_stage()
            except (AggregationAbortedError, ProtocolError, ValueError) as exc:
                # fail closed: the round is abandoned, the run goes on
                aborted = f"{type(exc).__name__}: {exc}"
            seconds[stage] = round(time.perf_counter() - t0, 4)
            self._event(round=rnd, stage=stage, state="closed", clients=sorted(live))
            if ahead_next is not None:
                self._ahead = ahead_next
            if aborted is not None:
                break

        out = self._masking_round(trained, dropped_at, reasons, up, down, epsilon, exhausted,
                                  seconds)
        result = server.output
        if aborted is not None or result is None:
            out.abandoned = aborted or "secure aggregation ended without a result"
            return out
        if self._canary_round is not None:  # canary clients' S u_i join the clipped-delta sum
            sums, total_weight = self._canary_round.release(
                result.total, keys, {plan.clients[0]: layout}
            )
        else:
            sums, total_weight = unpack_sum(result.total, keys, {plan.clients[0]: layout})
        out.sums = {cohort: CohortSum(sums, total_weight, len(result.survivors))}
        out.participants = sorted(result.survivors)
        if result.bad_share_holders:
            log.warning(
                "round %d: sites %s returned wrong Shamir shares (corrected from the others')",
                rnd, list(result.bad_share_holders),
            )
        out.protocol_info = self._masking_info(server, result, dropped_at, total_weight)
        out.exchange = {
            "params_up": len(result.survivors) * length,
            "params_down": len(plan.clients) * len(names) * int(
                plan.broadcast[names[0]].numel()),
        }
        return out

    def _check_reply(
        self, r: Mapping[str, Any], rnd: int, cid: int, trains: bool, keys: list[str],
        expects: str, epsilon: dict[str, float], trained: list[int], exhausted: list[int],
        up: dict[int, int],
    ) -> str | None:
        """A site's reply to a masking stage, before its protocol payload: for round ``rnd``;
        its epsilon recorded; at its training stage either "budget exhausted" (the returned
        reason to drop it) or the round's vectors ``keys`` (else :class:`WireError`, naming
        what was ``expects``-ed), then counted as trained, with its canary scores."""
        who = f"site {cid}"
        if get_int(r, "round", who) != rnd:
            raise WireError(f"{who}: reply for round {r.get('round')}")
        if "epsilon" in r:
            epsilon[str(cid)] = round(float(r["epsilon"]), 6)
        if not trains:
            return None
        if r.get("status") == "budget_exhausted":
            exhausted.append(cid)
            return "privacy budget exhausted (did not train)"
        if list(r.get("vector_keys", [])) != keys:
            raise WireError(f"{who}: sends vectors {r.get('vector_keys')}, {expects} {keys}")
        trained.append(cid)
        self._last_trained[cid] = rnd
        up[cid] += self._receive_canary_scores(rnd, cid, r)
        return None

    def _masking_round(
        self, trained: list[int], dropped_at: Mapping[int, str], reasons: Mapping[int, str],
        up: Mapping[int, int], down: Mapping[int, int], epsilon: dict[str, float],
        exhausted: list[int], seconds: dict[str, float],
    ) -> ClientRound:
        """A masking round's :class:`ClientRound` before its sums: who trained, dropped or ran
        out of budget (remembered: an exhausted site is not asked again), bytes, epsilons."""
        self._exhausted.update(exhausted)
        dp = self.cfg.dp.level in ("record", "client")
        return ClientRound(
            sums={}, trained=trained, participants=[], dropped=sorted(dropped_at),
            protocol="masking", bytes_up=int(sum(up.values())),
            bytes_down=int(sum(down.values())),
            epsilon=epsilon if dp else None, budget_exhausted=exhausted if dp else None,
            transport=_site_facts(dropped_at, reasons, up, down), seconds=seconds,
        )

    def _masking_info(
        self, server: Any, result: Any, dropped: Mapping[int, Any], total_weight: float
    ) -> dict[str, Any]:
        """``protocol_info`` of one masking session (its plan, recoveries and grid bound)."""
        splan = server.state.plan
        return {
            "dropouts_recovered": len(result.recovered),
            "recovered_clients": list(result.recovered),
            "threshold": splan.threshold,
            "neighbours": "all" if splan.graph.complete else splan.graph.degree,
            "pruned": list(result.pruned),
            "late_dropouts": sorted(c for c in result.survivors if c in dropped),
            "bad_share_holders": list(result.bad_share_holders),
            "bits": self.params.bits,
            "quantization_error_bound": quantization_error_bound(
                splan.quant, len(result.survivors)
            ),
            "total_weight": total_weight,
        }

    def _cohort_layouts(
        self, rnd: int, plan: Any, strategy: Any
    ) -> dict[str, tuple[list[int], Any]]:
        """The round's upload cohorts: cohort -> (its members, the vector layout each member
        sends). The layout is the strategy's client hook applied to the broadcast itself (no
        client data; only the names and sizes are used), per selected client, since a
        strategy may assign clients different segments (FedDiffuse ``usplit``: ``front`` /
        ``back`` from the plan's pairing); only one layout per cohort is kept."""
        out: dict[str, tuple[list[int], Any]] = {}
        params = plan.broadcast["params"]
        zeros = torch.zeros_like(params)
        for cid in plan.clients:
            layout = strategy.client.client_update(
                cid, plan.broadcast, params, 1, 1, self.cfg.client.lr, {}, mean_grad=zeros,
            )
            for name, members in strategy.upload_cohorts(rnd, {cid: layout}).items():
                entry = out.setdefault(name, ([], members[cid]))
                entry[0].append(int(cid))
        return {name: (sorted(m), lay) for name, (m, lay) in sorted(out.items())}

    def _run_sessions(
        self, rnd: int, plan: Any, cohorts: Mapping[str, tuple[list[int], Any]]
    ) -> ClientRound:
        """A round of several upload cohorts (FedDiffuse ``usplit``: ``front`` and ``back``):
        one masking session per cohort, all in the SAME stage messages. Each stage message to
        a site carries ``secagg.<cohort>`` for every session it is live in (the odd site of
        the pairing: both); the training stage also carries the round's client list
        (``round_clients``, bound into each session with the cohort's name,
        :func:`~securefed.deploy.common.cohort_session`), from which each site recomputes its
        own segments. Each session has its own participants, vector length, threshold and
        grid (resolved per session as the simulation's ``protocol.aggregate`` resolves them),
        its own consistency check and survivor set; a session that aborts is listed in
        ``transport.cohorts_abandoned`` and the others still complete, as in the simulation.

        The next round's sessions start with this round's unmasking request, as in a
        one-session round (:meth:`_start_ahead_sessions`): a site that advertised its keys in
        every session of the next round trains at that round's key broadcast."""
        ahead, self._ahead = self._ahead, None
        clients = [int(c) for c in plan.clients]
        names = sorted(plan.broadcast)
        broadcast = {f"broadcast.{n}": encode_vector(plan.broadcast[n]) for n in names}
        bcast_bytes = sum(len(b) for b in broadcast.values())
        seconds: dict[str, float] = {}
        dropped_at: dict[int, str] = {}
        reasons: dict[int, str] = {}
        exhausted: list[int] = []
        trained: list[int] = []
        epsilon: dict[str, float] = {}
        up = dict.fromkeys(clients, 0)
        down = dict.fromkeys(clients, 0)
        sizes = {name: _layout_length(layout) for name, (_, layout) in cohorts.items()}
        train_stage = dict.fromkeys(clients, Stage.ADVERTISE_KEYS)
        skip: set[int] = set()
        failed_ahead: dict[int, str] = {}
        aborted: list[str] = []
        sessions: dict[str, _Session]
        if (
            isinstance(ahead, _AheadSessions)
            and ahead.rnd == rnd
            and ahead.clients == tuple(clients)
            and {n: (s.members, s.length) for n, s in ahead.sessions.items()}
            == {n: (m, sizes[n]) for n, (m, _) in cohorts.items()}
        ):
            # this round's keys were advertised with the last round's unmasking replies: the
            # sites that advertised in every session they are in train at the key broadcast
            sessions = ahead.sessions
            for name, s in sessions.items():
                s.layout = cohorts[name][1]
                s.keys = sorted(s.layout.vectors)
            for cid in ahead.advertised:
                train_stage[cid] = Stage.SHARE_KEYS
            skip = set(ahead.sent)
            failed_ahead = {
                c: ahead.failed.get(c, "no keys for this round with the last unmasking reply")
                for c in ahead.sent - ahead.advertised
            }
        else:
            sessions, aborted = self._new_sessions(rnd, clients, cohorts, sizes)
        planned = {c: sorted(n for n, s in sessions.items() if c in s.members) for c in clients}
        for stage in Stage.path(self.params.consistency_check):
            t0 = time.perf_counter()
            active = [s for s in sessions.values() if s.aborted is None]
            if stage == Stage.ADVERTISE_KEYS:
                for cid, why in sorted(failed_ahead.items()):
                    for s in active:
                        s.drop(cid, stage)
                    dropped_at.setdefault(cid, stage)
                    reasons.setdefault(cid, why)
            for s in active:
                for cid in sorted(s.live - set(s.outgoing)):  # pruned or rejected by the server
                    s.drop(cid, stage)
                    dropped_at.setdefault(cid, stage)
            live = sorted({c for s in active for c in s.live})
            ahead_next = self._start_ahead_sessions(rnd, cohorts, sizes, set(live)) if (
                stage == Stage.UNMASKING
            ) else None
            contents: dict[int, dict[str, Any]] = {}
            for cid in live:
                if stage == Stage.ADVERTISE_KEYS and cid in skip:
                    continue  # advertised with the last round's unmasking reply
                c: dict[str, Any] = {"round": rnd, "stage": stage, "run_id": self.run_id}
                for s in active:
                    if cid in s.live:
                        c[f"secagg.{s.name}"] = s.outgoing[cid]
                        down[cid] += len(s.outgoing[cid])
                if stage == train_stage[cid]:
                    c.update(self._training_content(rnd, cid, broadcast, names))
                    c["round_clients"] = clients
                    down[cid] += bcast_bytes + len(c.get("canaries", b""))
                if ahead_next is not None:
                    nxt = ahead_next.outgoing(cid)
                    if nxt:
                        c.update(next_round=rnd + 1, next_round_clients=list(ahead_next.clients))
                        for name, data in nxt.items():
                            c[f"next_secagg.{name}"] = data
                            down[cid] += len(data)
                        ahead_next.sent.add(cid)
                contents[self.sites[cid].node_id] = c
            self._event(round=rnd, stage=stage, state="sent", clients=live)
            trains = any(train_stage[c] == stage for c in live)
            timeout = self.options.train_timeout if trains else self.options.stage_timeout
            replies = self.channel.exchange(
                stage_message_type(stage), contents, timeout=timeout, group=str(rnd)
            ) if contents else {}
            for cid in live:
                if self.sites[cid].node_id not in contents:
                    continue
                r = replies.get(self.sites[cid].node_id)
                who = f"site {cid}"
                reason = _missing_reply(r, timeout)
                if r is not None and not isinstance(r, str):
                    try:
                        want = sorted(k for n in planned[cid] for k in sessions[n].keys)
                        reason = self._check_reply(
                            r, rnd, cid, stage == train_stage[cid], want,
                            "its segments this round are", epsilon, trained, exhausted, up,
                        )
                    except (WireError, KeyError, TypeError, ValueError) as exc:
                        reason = f"{type(exc).__name__}: {exc}"
                    for s in active:
                        if reason is not None or cid not in s.live:
                            continue
                        try:
                            if f"refused.{s.name}" in r:
                                raise WireError(f"refused: {r[f'refused.{s.name}']}")
                            data = get_bytes(r, f"secagg.{s.name}", who)
                            up[cid] += len(data)
                            s.server.receive(cid, data)
                        except (WireError, ProtocolError, KeyError, TypeError,
                                ValueError) as exc:  # out of this session only
                            s.drop(cid, stage)
                            dropped_at.setdefault(cid, stage)
                            reasons[cid] = f"{s.name}: {type(exc).__name__}: {exc}"
                if ahead_next is not None and cid in ahead_next.sent:
                    up[cid] += ahead_next.receive(cid, r)
                if reason is not None:
                    for s in active:
                        s.drop(cid, stage)
                    dropped_at.setdefault(cid, stage)
                    reasons[cid] = reason
                    log.warning("round %d, stage %s: site %d dropped: %s", rnd, stage, cid, reason)
            for s in active:
                try:
                    s.outgoing = s.server.close_stage()
                except (AggregationAbortedError, ProtocolError, ValueError) as exc:
                    # fail closed for this session; the round's other session goes on
                    s.aborted = f"{type(exc).__name__}: {exc}"
                    aborted.append(f"{s.name}: {s.aborted}")
            seconds[stage] = round(time.perf_counter() - t0, 4)
            self._event(round=rnd, stage=stage, state="closed",
                        clients=sorted({c for s in active for c in s.live}))
            if ahead_next is not None:
                self._ahead = ahead_next
            if all(s.aborted is not None for s in sessions.values()):
                break

        out = self._masking_round(trained, dropped_at, reasons, up, down, epsilon, exhausted,
                                  seconds)
        survivors: set[int] = set()
        infos: dict[str, Any] = {}
        params_up = 0
        for s in sessions.values():
            result = s.server.output if s.aborted is None else None
            if s.aborted is None and result is None:
                aborted.append(f"{s.name}: secure aggregation ended without a result")
            if result is None or not result.survivors:
                continue
            sums, total_weight = unpack_sum(result.total, s.keys, {s.members[0]: s.layout})
            out.sums[s.name] = CohortSum(sums, total_weight, len(result.survivors))
            survivors.update(result.survivors)
            params_up += len(result.survivors) * s.length
            infos[s.name] = {
                "participants": list(s.members),
                "survivors": list(result.survivors),
                **self._masking_info(s.server, result, s.dropped, total_weight),
            }
        if not out.sums:
            out.abandoned = "; ".join(aborted) or "secure aggregation ended without a result"
            return out
        out.participants = sorted(survivors)
        out.protocol_info = infos
        if aborted:
            out.transport["cohorts_abandoned"] = aborted
        out.exchange = {
            "params_up": params_up,
            "params_down": len(clients) * len(names) * int(plan.broadcast[names[0]].numel()),
        }
        return out

    def _new_sessions(
        self, rnd: int, clients: list[int], cohorts: Mapping[str, tuple[list[int], Any]],
        sizes: Mapping[str, int],
    ) -> tuple[dict[str, _Session], list[str]]:
        """Start one masking server per cohort of round ``rnd`` (its own session,
        :func:`~securefed.deploy.common.cohort_session`); returns the sessions and why the
        cohorts that cannot run were abandoned (``"<cohort>: ..."``). ``cohorts``: cohort ->
        (members, layout, or None before the round's layout is known)."""
        sessions: dict[str, _Session] = {}
        aborted: list[str] = []
        for name, (members, layout) in cohorts.items():
            length = sizes[name]
            try:
                params = dataclasses.replace(
                    self._round_params(len(members), length),
                    session=cohort_session(self.run_id, name, clients),
                )
                server = MaskingServer(rnd, members, length, params, self._roster,
                                       self._server_key, record_view=False)
            except ValueError as exc:  # e.g. a cohort of one: that session cannot run
                aborted.append(f"{name}: round {rnd} cannot run: {exc}")
                continue
            keys = sorted(layout.vectors) if layout is not None else []
            sessions[name] = _Session(name, list(members), layout, keys, length, server,
                                      server.start(), set(members))
        return sessions, aborted

    def _start_ahead_sessions(
        self, rnd: int, cohorts: Mapping[str, tuple[list[int], Any]],
        sizes: Mapping[str, int], live: set[int],
    ) -> _AheadSessions | None:
        """Start round ``rnd + 1``'s sessions now (FedDiffuse ``usplit``), so that their
        RoundStarts travel with round ``rnd``'s unmasking request, as :meth:`_start_ahead`
        does for one session. The next round's clients come from the same ``(seed, round)``
        selection stream and their pairing from the ``(seed, USPLIT, round)`` stream
        (:meth:`~securefed.strategies.feddiffuse.FedDiffuse.pairing`, which changes no
        strategy state), so the rounds are those of the simulation; a different cohort when
        the round starts just starts it afresh. None when nothing is started ahead (last
        round, ``advertise-ahead`` off, no next site live now, a session that cannot run)."""
        cfg = self.cfg
        if not self.options.advertise_ahead or rnd >= cfg.federation.rounds:
            return None
        layer = find_layer(self.strategy, FedDiffuse)
        if layer is None:  # pragma: no cover - only usplit runs several cohorts
            return None
        rng = np.random.default_rng(derive_seed(cfg.seed, Purpose.SELECT, rnd + 1))
        nxt = [int(c) for c in sample_clients(
            sorted(self.sites), cfg.federation.fraction_fit, cfg.federation.min_fit_clients, rng
        )]
        if not set(nxt) & live:
            return None
        pairing = layer.pairing(rnd + 1, nxt)
        spec = {
            name: (sorted(c for c, segs in pairing.items() if name in segs), None)
            for name in cohorts
        }
        if any(not members for members, _ in spec.values()):
            return None
        sessions, aborted = self._new_sessions(rnd + 1, nxt, spec, sizes)
        if aborted:
            log.warning("round %d cannot start ahead: %s", rnd + 1, "; ".join(aborted))
            return None
        return _AheadSessions(rnd + 1, tuple(nxt), sessions)

    def _public_pretrain(self, model: Any) -> None:
        """``pretrain.enabled``: the public model (trained here on the public set, or from the
        cache) becomes the initial global model, as in the simulation. The coordinator holds
        no private data: every site checked at setup that no image of its own is in the
        public set (:func:`~securefed.federation.public_pretrain.check_disjoint`)."""
        cfg = self.cfg
        dev = resolve_device(cfg.device)
        res = public_pretrain(
            cfg, model, NoiseSchedule.from_config(cfg.diffusion), [], dev,
            cache_dir() / "pretrain", shape=self.image_shape, num_classes=self.num_classes,
        )
        model.to("cpu")
        atomic_write_json(RunDir(self.options.run_dir).public_pretrain, {
            **res.meta,
            "private_dataset": cfg.data.name,
            "relation": (
                f"public {cfg.pretrain.data.name!r}; each site checked at setup that none of its "
                "images is in the public set (bit for bit at the model's shape); the public model "
                "is trained on public data only and charged to no privacy ledger"
            ),
        })

    def _fedddpm_phase0(self, model: torch.nn.Module) -> Any:
        """FedDDPM phase 0 over the network: every site pre-trains under DP (charged to its own
        ledger) and uploads its share of ``aux_total`` synthetic images (``aux_total`` split in
        proportion to the sites' sizes, as the simulation splits it). Each upload is kept
        under ``received/`` (0600) as it arrived; together they are the auxiliary set
        (``auxiliary/``) the server calibrates on. Returns the FedDDPM / FedDDPM+ strategy."""
        cfg, fd, run_dir = self.cfg, self.cfg.fedddpm, self.options.run_dir
        cids = sorted(self.sites)
        alloc = allocate_proportional([self.sites[c].num_examples for c in cids], fd.aux_total)
        init = encode_vector(self.global_params)
        contents = {
            self.sites[c].node_id: {
                "round": 0, "run_id": self.run_id, "aux_images": int(n), "broadcast.params": init,
                "image_shape": list(self.image_shape), "num_classes": self.num_classes,
            }
            for c, n in zip(cids, alloc, strict=True)
        }
        self._event(stage="fedddpm_phase0", state="sent", clients=cids)
        t0 = time.perf_counter()
        replies = self.channel.exchange(
            MESSAGE_PHASE0, contents, timeout=self.options.train_timeout, group="phase0"
        )
        images, labels, owners = [], [], []
        per_site: dict[str, Any] = {}
        shape = tuple(self.image_shape)
        dev = resolve_device(cfg.device)
        schedule = NoiseSchedule.from_config(cfg.diffusion)
        for c, n in zip(cids, alloc, strict=True):
            r = replies.get(self.sites[c].node_id)
            who = f"site {c}"
            try:
                if r is None:
                    raise WireError(f"no reply within {self.options.train_timeout:g} s")
                if isinstance(r, str):
                    raise WireError(r)
                raw = get_bytes(r, "upload", who)
                meta = r.get("meta", "{}")
                facts = json.loads(meta) if isinstance(meta, str) else {}
                if fd.upload == "model":
                    x, y = self._sample_upload(model, schedule, dev, c, int(n), raw, facts)
                else:
                    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                        x = np.asarray(z["images"], dtype=np.float32)
                        y = np.asarray(z["labels"], dtype=np.int64)
                if x.shape != (int(n), *shape) or y.shape != (int(n),):
                    raise WireError(f"{who}: upload of shape {x.shape}, expected {(n, *shape)}")
                if not np.all(np.isfinite(x)) or np.abs(x).max(initial=0.0) > 1.0:
                    raise WireError(f"{who}: upload has values outside [-1, 1]")
                if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                    raise WireError(f"{who}: upload has labels outside [0, {self.num_classes})")
            except (WireError, KeyError, ValueError, OSError) as exc:
                per_site[str(c)] = {"failed": f"{type(exc).__name__}: {exc}"}
                log.warning("FedDDPM phase 0: site %d sent no usable upload: %s", c, exc)
                continue
            # exactly what the server received individually: the audit's `received` evidence
            if fd.upload == "model":  # the audit attacks received/*.pt models
                buf = io.BytesIO()
                torch.save({"params": decode_vector(raw, self._numel, who, "upload"),
                            "client": c, "phase": "fedddpm upload"}, buf)
                atomic_write_bytes(RunDir(run_dir).received_upload(c), buf.getvalue(),
                                   mode=0o600)
            else:
                atomic_write_bytes(RunDir(run_dir).received / f"client_{c}_samples.npz", raw,
                                   mode=0o600)
            images.append(torch.from_numpy(x))
            labels.append(torch.from_numpy(y))
            owners.append(torch.full((int(n),), c, dtype=torch.int64))
            per_site[str(c)] = {
                **facts,
                "upload_bytes": len(raw),
                **({"epsilon_after_phase0": float(r["epsilon"])} if "epsilon" in r else {}),
            }
        if not images:
            raise DeployConfigError(f"FedDDPM phase 0: no site uploaded samples: {per_site}")
        aux = AuxiliarySet(torch.cat(images), torch.cat(labels), torch.cat(owners))
        save_auxiliary(run_dir, aux, {
            "upload": fd.upload, "aux_total": fd.aux_total, "dp": self.cfg.dp.level == "record",
            "sampler": fd.aux_sampler, "sampling_steps": fd.aux_sampling_steps,
            "deployment": True, "seconds": round(time.perf_counter() - t0, 3),
            "clients": per_site,
        })
        self._event(stage="fedddpm_phase0", state="closed", clients=sorted(
            int(k) for k, v in per_site.items() if "failed" not in v))
        return fedddpm_wrapper(
            cfg, self.strategy, model.to(dev), schedule, dev, aux,
            [self.sites[c].num_examples for c in cids],
        )

    def _sample_upload(
        self, model: Any, schedule: Any, dev: Any, cid: int, n: int, raw: bytes,
        facts: Mapping[str, Any],
    ) -> tuple[np.ndarray, np.ndarray]:
        """``fedddpm.upload: model``: ``n`` images from site ``cid``'s uploaded DP model, drawn
        as the simulation draws them (the ``(seed, AUX_SAMPLE, 0, cid)`` stream; class-conditional:
        the site's DP class counts); the model is restored to the initial one afterwards."""
        cfg, fd = self.cfg, self.cfg.fedddpm
        params = decode_vector(raw, self._numel, f"site {cid}", "upload")
        y = None
        if cfg.model.class_conditional:
            counts = facts.get("class_counts")
            if not (isinstance(counts, list) and len(counts) == self.num_classes
                    and all(isinstance(v, int) and v >= 0 for v in counts) and sum(counts) == n):
                raise WireError(f"site {cid}: class_counts: expected {self.num_classes} counts "
                                f"summing to {n}, got {counts!r}")
            y = torch.repeat_interleave(torch.arange(self.num_classes), torch.as_tensor(counts))
        init = get_flat(model)
        set_flat(model, params.to(dev))
        gen = torch.Generator(device=dev).manual_seed(
            derive_seed(cfg.seed, Purpose.AUX_SAMPLE, 0, cid)
        )
        try:
            x = sample(
                model, schedule.to(dev), n, self.image_shape, sampler=fd.aux_sampler,
                steps=fd.aux_sampling_steps, y=None if y is None else y.to(dev), generator=gen,
                device=dev,
            ).cpu().clamp(-1, 1).to(torch.float32)
        finally:
            set_flat(model, init)
        labels = y if y is not None else torch.zeros(n, dtype=torch.int64)
        return x.numpy(), labels.numpy().astype(np.int64)

    def _start_ahead(self, rnd: int, length: int, live: set[int]) -> _Ahead | None:
        """Start round ``rnd + 1`` now, so that its RoundStart travels with round ``rnd``'s
        unmasking request. The cohort comes from the same ``(seed, round)`` selection stream as
        always (it does not depend on the model), so the rounds are those of the simulation."""
        cfg = self.cfg
        if not self.options.advertise_ahead or rnd >= cfg.federation.rounds:
            return None
        if cfg.dp.level == "client" and cfg.dp.adaptive_clipping:
            return None  # the next round's clip norm (and noise) follows this round's sum
        # the selection every strategy's configure_round makes (it runs again, unchanged, when
        # the round starts; a different cohort then just starts the round afresh)
        rng = np.random.default_rng(derive_seed(cfg.seed, Purpose.SELECT, rnd + 1))
        nxt = sample_clients(
            sorted(self.sites), cfg.federation.fraction_fit, cfg.federation.min_fit_clients, rng
        )
        if not set(nxt) & live:
            return None
        try:
            server = MaskingServer(
                rnd + 1, nxt, length, self._round_params(len(nxt), length), self._roster,
                self._server_key, record_view=False,
            )
        except ValueError as exc:
            log.warning("round %d cannot start ahead: %s", rnd + 1, exc)
            return None
        return _Ahead(rnd + 1, tuple(nxt), length, server, server.start())

    def _round_params(self, participants: int, length: int) -> Any:
        """The round's masking parameters (with client-level DP, its noise std; with adaptive
        clipping at the clip norm this round broadcasts)."""
        clip = None
        if self.cfg.dp.level == "client" and self.cfg.dp.adaptive_clipping:
            # as the sites read it off the wire (float32): the same noise plan, the same grid
            clip = float(np.float32(client_level_layer(self.strategy).clip))
        return round_masking_params(self.cfg, self.run_id, participants, length, clip)

    def _ckks_server(self) -> Any:
        """The CKKS aggregator: the public-only context from the coordinator's key folder
        (``ckks_public.ctx``; a secret key there is refused), the sites' roster keys, and the
        coordinator's own signing key (the key holder pins it through the roster)."""
        # lazy: CKKS imports TenSEAL (optional heavy extension); only CKKS runs load it
        from securefed.secagg.ckks import PUBLIC_CONTEXT_FILE, CKKSServer, context_params

        path = self.options.keys_dir / PUBLIC_CONTEXT_FILE
        if not path.is_file():
            raise DeployConfigError(
                f"keys-dir: {self.options.keys_dir} has no {PUBLIC_CONTEXT_FILE}; copy the public "
                "context written by `securefed keys init --ckks` there (the secret one goes to "
                "the sites only)"
            )
        keys = {c: self._roster.client(c) for c in self.sites}
        server = CKKSServer(path.read_bytes(), {c: k for c, k in keys.items() if k is not None},
                            self._server_key, session=bytes.fromhex(self.run_id))
        sa = self.cfg.secure_aggregation
        want = (sa.ckks_poly_modulus_degree, tuple(sa.ckks_coeff_mod_bit_sizes),
                sa.ckks_scale_bits)
        got = context_params(server.context)
        if (got.poly_modulus_degree, tuple(got.coeff_mod_bit_sizes), got.scale_bits) != want:
            raise DeployConfigError(
                f"keys-dir: {PUBLIC_CONTEXT_FILE} holds CKKS parameters {got}, the experiment "
                f"asks for {want}; provision matching keys or change the ckks_* fields"
            )
        return server

    def _training_content(
        self, rnd: int, cid: int, broadcast: Mapping[str, bytes], names: list[str]
    ) -> dict[str, Any]:
        """What site ``cid`` needs to train: the broadcast and the public facts (and its audit
        canaries of round ``rnd``, when the run has gradient canaries)."""
        last = self._last_trained.get(cid)
        return {
            **broadcast,
            **self._canary_content(rnd, cid),
            "broadcast_keys": names,
            "weight_scale": self.weight_scale,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "commit": int(last is not None and cid in self._survivors.get(last, ())),
        }

    def _run_round_ckks(
        self, rnd: int, clients: Any, keys: list[str], length: int,
        broadcast: Mapping[str, bytes], names: list[str], bcast_bytes: int,
        cohort: str,
    ) -> ClientRound:
        """One CKKS round (``server_threat: honest_but_curious``; every site opted in): two
        messages. Each site trains and uploads its signed ciphertexts; the coordinator checks
        and adds them (public context only); the lowest surviving site decrypts the signed
        aggregate and returns the rounded sum (:mod:`securefed.secagg.ckks`)."""
        # lazy: CKKS imports TenSEAL (optional heavy extension); only CKKS runs load it
        from securefed.secagg.ckks import CKKSMessageError, ckks_error_bound

        cfg, seconds = self.cfg, {}
        dropped_at: dict[int, str] = {}
        reasons: dict[int, str] = {}
        trained: list[int] = []
        exhausted: list[int] = []
        epsilon: dict[str, float] = {}
        up = dict.fromkeys(clients, 0)
        down = dict.fromkeys(clients, 0)
        server = self._ckks
        server.begin_round(rnd, length)
        t0 = time.perf_counter()
        contents = {
            self.sites[c].node_id: {
                "round": rnd, "run_id": self.run_id, "participants": list(clients),
                **self._training_content(rnd, c, broadcast, names),
            }
            for c in clients
        }
        for c in clients:
            down[c] += bcast_bytes + len(contents[self.sites[c].node_id].get("canaries", b""))
        replies = self.channel.exchange(
            MESSAGE_CKKS_UPLOAD, contents, timeout=self.options.train_timeout, group=str(rnd)
        )
        for cid in clients:
            r, who, reason = replies.get(self.sites[cid].node_id), f"site {cid}", None
            try:
                if r is None:
                    raise WireError(f"no reply within {self.options.train_timeout:g} s")
                if isinstance(r, str):
                    raise WireError(r)
                if get_int(r, "round", who) != rnd:
                    raise WireError(f"{who}: reply for round {r.get('round')}")
                if "epsilon" in r:
                    epsilon[str(cid)] = round(float(r["epsilon"]), 6)
                if r.get("status") == "budget_exhausted":
                    exhausted.append(cid)
                    raise WireError("privacy budget exhausted (did not train)")
                if list(r.get("vector_keys", [])) != keys:
                    raise WireError(f"{who}: sends vectors {r.get('vector_keys')}, expected {keys}")
                trained.append(cid)
                self._last_trained[cid] = rnd
                up[cid] += self._receive_canary_scores(rnd, cid, r)
                data = get_bytes(r, "ckks", who)
                up[cid] += len(data)
                server.receive(cid, unpack_chunks(data, who, "ckks"))
            except (WireError, CKKSMessageError, KeyError, TypeError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if reason is not None:
                dropped_at[cid], reasons[cid] = "upload", reason
                log.warning("round %d: site %d dropped: %s", rnd, cid, reason)
        seconds["upload"] = round(time.perf_counter() - t0, 4)
        self._exhausted.update(exhausted)
        out = ClientRound(
            sums={}, trained=trained, participants=[], dropped=sorted(dropped_at),
            protocol="ckks", epsilon=epsilon, budget_exhausted=exhausted, seconds=seconds,
        )

        def finish(abandoned: str | None = None) -> ClientRound:
            out.bytes_up, out.bytes_down = int(sum(up.values())), int(sum(down.values()))
            out.transport = _site_facts(dropped_at, reasons, up, down)
            out.abandoned = abandoned
            return out

        survivors = sorted(server.contributors)
        try:
            need = resolve_threshold(float(cfg.secure_aggregation.threshold), len(clients))
        except ValueError as exc:  # a count above this round's sites: fail closed
            return finish(str(exc))
        if len(survivors) < need:
            return finish(f"{len(survivors)} sites uploaded, the threshold is {need}")
        t0 = time.perf_counter()
        aggregate = server.finish()
        holder = survivors[0]
        blob = pack_chunks(aggregate)
        down[holder] += len(blob)
        reply = self.channel.exchange(
            MESSAGE_CKKS_DECRYPT,
            {self.sites[holder].node_id: {"round": rnd, "run_id": self.run_id, "aggregate": blob,
                                          "length": length, "contributors": survivors}},
            timeout=self.options.stage_timeout, group=str(rnd),
        ).get(self.sites[holder].node_id)
        try:
            if reply is None or isinstance(reply, str):
                raise WireError(reply or "no reply from the key holder")
            raw = get_bytes(reply, "sum", f"site {holder}")
            if len(raw) != 8 * length:
                raise WireError(f"key holder {holder}: sum of {len(raw)} bytes, expected "
                                f"{8 * length}")
            total = np.frombuffer(raw, dtype="<f8").astype(np.float64)
            if not np.all(np.isfinite(total)):
                raise WireError(f"key holder {holder}: the sum is not finite")
        except WireError as exc:
            return finish(f"decryption by site {holder} failed: {exc}")
        up[holder] += len(raw)
        seconds["decrypt"] = round(time.perf_counter() - t0, 4)
        if self._canary_round is not None:  # canary clients' S u_i join the clipped-delta sum
            sums, total_weight = self._canary_round.release(
                total, keys, {clients[0]: self._layout}
            )
        else:
            sums, total_weight = unpack_sum(total, keys, {clients[0]: self._layout})
        out.sums = {cohort: CohortSum(sums, total_weight, len(survivors))}
        out.participants = survivors
        params = server.params
        out.protocol_info = {
            "key_holder": holder,
            "chunks": len(aggregate),
            "threshold": need,
            "error_bound": ckks_error_bound(
                len(survivors), float(cfg.secure_aggregation.clip_range),
                poly_modulus_degree=params.poly_modulus_degree,
                scale_bits=params.scale_bits, release_quantum=params.release_quantum,
            ),
            "total_weight": total_weight,
        }
        out.exchange = {"params_up": len(survivors) * length,
                        "params_down": len(clients) * len(names) * self._numel}
        return finish()

    def _abandon(self, reason: str, protocol: str) -> ClientRound:
        """A round that could not start: nothing was sent."""
        return ClientRound(sums={}, trained=[], participants=[], dropped=[], protocol=protocol,
                           abandoned=reason)


def _missing_reply(r: Reply | None, timeout: float) -> str | None:
    """Why a site's reply is no reply: none within ``timeout``, or its error text."""
    if r is None:
        return f"no reply within {timeout:g} s"
    return r if isinstance(r, str) else None


def _site_facts(
    dropped_at: Mapping[int, str], reasons: Mapping[int, str], up: Mapping[int, int],
    down: Mapping[int, int],
) -> dict[str, Any]:
    """The deployment's per-site facts of a round (``RoundRecord.transport``)."""
    out: dict[str, Any] = {
        "dropped_at": {str(c): st for c, st in sorted(dropped_at.items())},
        "bytes_up_clients": {str(c): int(v) for c, v in up.items()},
        "bytes_down_clients": {str(c): int(v) for c, v in down.items()},
    }
    if reasons:
        out["dropout_reasons"] = {str(c): r for c, r in reasons.items()}
    return out


def quantization_tolerance(
    bound: float, total_weight: float, mean_delta_abs: float, server_lr: float = 1.0
) -> float:
    """Per-coordinate bound on how far a FedAvg round's new global model can be moved by the
    masking grid: with the summed delta and the summed weight each off by at most ``bound``
    (``protocol_info.quantization_error_bound``), ``|S'/W' - S/W| <= bound * (1 + |S/W|) /
    (W - bound)``; times ``server_lr``."""
    if total_weight <= bound:
        return math.inf
    return server_lr * bound * (1.0 + mean_delta_abs) / (total_weight - bound)
