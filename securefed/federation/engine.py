"""The one round engine: plan a round, let a transport run the clients, give the sum to the
strategy, evaluate, record, checkpoint.

There is exactly one round loop in securefed. The in-process simulation and the Flower
deployment are two :class:`ClientTransport` s of it:

- :class:`~securefed.federation.simulation.InProcessClients`: every client in this process
  (simulated dropouts), the aggregation protocol run in-process;
- :class:`~securefed.deploy.coordinator.Coordinator`: each masking (or CKKS) stage is one
  network message per site; the sites train on their own machines.

Both run every client's local step through the one client runtime
(:func:`securefed.client.runtime.local_round`: seeding, trainer, strategy hooks, DP charge
before release). The engine sees only what a server may see: the strategy's plan, the protocol's
SUM per upload cohort, and the public facts of the round; never an individual update.

A round, for both transports::

    plan    = strategy.configure_round(rnd, params, clients, fraction, min, rng(seed, SELECT, rnd))
    outcome = transport.run_clients(rnd, plan, strategy, rng)      # train + secure sum
    params  = strategy.aggregate(rnd, params, outcome.sums)         # if any cohort survived
    transport.commit(rnd, outcome.participants)                    # private state is kept
    record  = RoundRecord(... + evaluate(rnd, params))             # metrics.jsonl line
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from securefed.artefacts.checkpoint import Checkpoint, save_checkpoint
from securefed.artefacts.rundir import RunDir
from securefed.config import ExperimentConfig
from securefed.federation.record import RoundRecord
from securefed.io import atomic_write_json, write_jsonl
from securefed.seeds import Purpose, derive_seed
from securefed.strategies import CohortSum, RoundPlan, Strategy

__all__ = ["ClientRound", "ClientTransport", "Evaluation", "RoundEngine"]

log = logging.getLogger(__name__)


@dataclass
class ClientRound:
    """What a transport returns for one round: the sums and the round's public facts.

    Attributes:
        sums: upload cohort -> its :class:`~securefed.strategies.CohortSum` (the protocol's
            output only); empty when the round is abandoned.
        trained: clients that trained; participants: clients whose update is in a sum.
        dropped: selected clients that dropped out (at any stage).
        protocol / protocol_info / bytes_up / bytes_down / exchange: see :class:`RoundRecord`.
        mean_local_loss: mean local loss (None where the clients do not reveal it).
        epsilon / budget_exhausted: DP facts (None without DP).
        abandoned: the reason the round was abandoned, or None.
        transport: transport-specific facts (:data:`~securefed.federation.record.TRANSPORT_KEYS`).
        seconds: wall seconds per phase.
    """

    sums: dict[str, CohortSum]
    trained: list[int]
    participants: list[int]
    dropped: list[int]
    protocol: str
    protocol_info: Mapping[str, Any] | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    exchange: Mapping[str, int] | None = None
    mean_local_loss: float | None = None
    epsilon: Mapping[str, float] | None = None
    budget_exhausted: list[int] | None = None
    abandoned: str | None = None
    transport: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class ClientTransport(abc.ABC):
    """How a round's clients are reached: their local training and the secure sum."""

    @abc.abstractmethod
    def client_ids(self) -> list[int]:
        """The clients the strategy may select from (sorted)."""

    @abc.abstractmethod
    def run_clients(
        self, rnd: int, plan: RoundPlan, strategy: Strategy, rng: np.random.Generator
    ) -> ClientRound:
        """Train the plan's clients on ``plan.broadcast`` and return the protocol's sums.

        ``rng`` is the round's public selection stream after the strategy's draw (the
        simulation draws its dropouts from it). Nothing individual may be returned."""

    def commit(self, rnd: int, participants: list[int]) -> None:  # noqa: B027 - optional hook
        """Round ``rnd``'s update of ``participants`` was used: their private strategy state
        of that round becomes current (default: nothing to commit)."""

    def can_continue(self, next_round: int, strategy: Strategy) -> str | None:
        """None if some client can afford round ``next_round``, else why the run must stop."""
        return None

    def client_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """Private client state to checkpoint (only where it lives in this process)."""
        return {}

    def load_client_states(self, states: Mapping[int, Mapping[str, torch.Tensor]]) -> None:  # noqa: B027
        """Restore :meth:`client_states` from a checkpoint (default: none kept here)."""


#: ``(round, global params, strategy, last round?) -> (values, seconds)``: a round's evaluation
#: (holdout loss, FID, sample grid; keys of :class:`RoundRecord` or EVALUATION_KEYS)
Evaluation = Callable[[int, torch.Tensor, Strategy, bool], tuple[dict[str, Any], dict[str, float]]]


class RoundEngine:
    """The round loop of every securefed run (simulation and deployment alike).

    Args:
        cfg: the experiment.
        strategy: the server rule (with its wrappers: client-level DP, FedDiffuse, FedDDPM).
        transport: how the clients are reached.
        global_params: ``[D]`` initial global model.
        evaluate: optional per-round evaluation (:data:`Evaluation`); the deployment has none
            (the coordinator holds no data).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        strategy: Strategy,
        transport: ClientTransport,
        global_params: torch.Tensor,
        *,
        evaluate: Evaluation | None = None,
    ) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.transport = transport
        self.global_params = global_params.detach().to(torch.float32).clone()
        self.evaluate = evaluate
        self.round = 0

    # ------------------------------------------------------------------ one round
    def run_round(self, rnd: int) -> RoundRecord:
        """Run round ``rnd`` (1-based) and return its record."""
        cfg = self.cfg
        t_round = time.perf_counter()
        rng = np.random.default_rng(derive_seed(cfg.seed, Purpose.SELECT, rnd))
        plan = self.strategy.configure_round(
            rnd,
            self.global_params,
            self.transport.client_ids(),
            cfg.federation.fraction_fit,
            cfg.federation.min_fit_clients,
            rng,
        )
        out = self.transport.run_clients(rnd, plan, self.strategy, rng)
        seconds = dict(out.seconds)
        server = None
        abandoned = None
        if out.sums:
            t0 = time.perf_counter()
            self.global_params = self.strategy.aggregate(
                rnd, self.global_params, out.sums
            ).to(torch.float32)
            seconds["server_update"] = time.perf_counter() - t0
            self.transport.commit(rnd, out.participants)
            server = self.strategy.round_metrics() or None
        else:
            abandoned = out.abandoned or "every selected client dropped out"
            log.warning("round %d abandoned: %s; the global model is unchanged", rnd, abandoned)
        self.round = rnd
        values: dict[str, Any] = {}
        if self.evaluate is not None:
            values, eval_seconds = self.evaluate(
                rnd, self.global_params, self.strategy, rnd == cfg.federation.rounds
            )
            seconds.update(eval_seconds)
        holdout = values.pop("holdout_loss", None)
        record = RoundRecord(
            round=rnd,
            selected=list(plan.clients),
            trained=list(out.trained),
            participants=list(out.participants),
            dropped=list(out.dropped),
            protocol=out.protocol,
            protocol_info=out.protocol_info,
            bytes_up=int(out.bytes_up),
            bytes_down=int(out.bytes_down),
            exchange=out.exchange,
            mean_local_loss=out.mean_local_loss,
            epsilon=out.epsilon,
            budget_exhausted=out.budget_exhausted,
            abandoned=abandoned,
            server=server,
            holdout_loss=holdout,
            evaluation=values,
            transport=out.transport,
        )
        return record.with_seconds(**seconds, round_total=time.perf_counter() - t_round)

    # ------------------------------------------------------------------ state
    def checkpoint(self, meta: Mapping[str, Any]) -> Checkpoint:
        return Checkpoint(
            round=self.round,
            global_params=self.global_params.clone(),
            strategy=self.strategy.state_dict(),
            clients={c: dict(s) for c, s in self.transport.client_states().items() if s},
            meta=dict(meta),
            released=self.strategy.eval_params(self.global_params).clone(),
        )

    def restore(self, ckpt: Checkpoint) -> None:
        if ckpt.global_params.shape != self.global_params.shape:
            raise ValueError(
                f"checkpoint has {ckpt.global_params.numel()} parameters, the configured model "
                f"has {self.global_params.numel()}: the config changed since the checkpoint"
            )
        self.round = ckpt.round
        self.global_params = ckpt.global_params.clone()
        self.strategy.load_state_dict(ckpt.strategy)
        self.transport.load_client_states(ckpt.clients)

    def save(self, ckpt_dir: Path, meta: Mapping[str, Any]) -> None:
        save_checkpoint(ckpt_dir, self.checkpoint(meta), self.cfg.checkpoint.keep_last)

    # ------------------------------------------------------------------ the run
    def run(
        self,
        run_dir: Path,
        rows: list[RoundRecord],
        meta: Mapping[str, Any],
        *,
        last: int | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> str | None:
        """Rounds ``self.round + 1 .. last`` (default: every configured round).

        After each round its record is appended to ``rows`` and ``metrics.jsonl`` rewritten
        (atomically), then, every ``checkpoint.every`` rounds and at ``last``, the checkpoint
        is saved: a crash between the two replays that round on resume. When the transport
        says no client can afford another round, ``stopped.json`` says why, the final state is
        checkpointed and the reason is returned (else None)."""
        cfg = self.cfg
        last = cfg.federation.rounds if last is None else min(last, cfg.federation.rounds)
        rd = RunDir(run_dir)
        metrics_path, ckpt_dir = rd.metrics, rd.checkpoints
        for rnd in range(self.round + 1, last + 1):
            stop = self.transport.can_continue(rnd, self.strategy)
            if stop is not None:
                log.warning(stop)
                atomic_write_json(rd.stopped, {"round": self.round, "reason": stop})
                if self.round > 0:
                    self.save(ckpt_dir, meta)
                return stop
            record = self.run_round(rnd)
            rows.append(record)
            write_jsonl(metrics_path, [r.to_json() for r in rows])
            if rnd % cfg.checkpoint.every == 0 or rnd == last:
                t0 = time.perf_counter()
                self.save(ckpt_dir, meta)
                rows[-1] = record = record.with_seconds(checkpoint=time.perf_counter() - t0)
                write_jsonl(metrics_path, [r.to_json() for r in rows])
            if on_round is not None:
                on_round(record)
        return None
