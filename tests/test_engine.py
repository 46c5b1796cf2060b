"""The one round engine: both transports run through it; the typed round record."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from securefed.artefacts.checkpoint import load_latest
from securefed.federation.engine import ClientRound, ClientTransport, RoundEngine
from securefed.federation.record import EVALUATION_KEYS, RoundRecord, read_records
from securefed.strategies import CohortSum, RoundPlan, Strategy, build_strategy
from tests.helpers import tiny_config

D = 6


class _Transport(ClientTransport):
    """Clients whose update is a fixed delta; the sum is formed here (an honest protocol).

    ``abandon`` rounds return no sum; ``budget`` is how many rounds each client can afford."""

    def __init__(self, abandon: set[int] = frozenset(), budget: int = 100) -> None:
        self.abandon = set(abandon)
        self.budget = budget
        self.commits: list[tuple[int, list[int]]] = []
        self.trained_rounds = 0
        self.state = {0: {"c": torch.zeros(1)}, 1: {}, 2: {}}

    def client_ids(self) -> list[int]:
        return [0, 1, 2]

    def run_clients(
        self, rnd: int, plan: RoundPlan, strategy: Strategy, rng: np.random.Generator
    ) -> ClientRound:
        self.trained_rounds += 1
        if rnd in self.abandon:
            return ClientRound(sums={}, trained=list(plan.clients), participants=[],
                               dropped=list(plan.clients), protocol="plain",
                               abandoned="test: protocol aborted")
        delta = torch.full((D,), 0.1 * rnd, dtype=torch.float64)
        n = len(plan.clients)
        sums = {"delta": delta * n, "weight": torch.tensor([float(n)], dtype=torch.float64)}
        return ClientRound(
            sums={"all": CohortSum({"delta": sums["delta"]}, float(n), n)},
            trained=list(plan.clients), participants=list(plan.clients), dropped=[],
            protocol="plain", protocol_info={"test": True}, bytes_up=10 * n,
            transport={"dropped_at": {}}, seconds={"train": 0.01},
        )

    def commit(self, rnd: int, participants: list[int]) -> None:
        self.commits.append((rnd, participants))

    def can_continue(self, next_round: int, strategy: Strategy) -> str | None:
        return None if next_round <= self.budget else "test: every budget is exhausted"

    def client_states(self) -> dict[int, dict[str, torch.Tensor]]:
        return self.state


def _engine(transport: ClientTransport, **over: Any) -> RoundEngine:
    cfg = tiny_config(**over)
    strategy = build_strategy(cfg.strategy, 3, weight_scale=3.0)
    return RoundEngine(cfg, strategy, transport, torch.zeros(D))


def test_engine_aggregates_only_the_sum_and_commits_survivors(tmp_path: Path) -> None:
    t = _Transport(abandon={2})
    eng = _engine(t, federation__rounds=3)
    rows: list[RoundRecord] = []
    assert eng.run(tmp_path, rows, {"name": "t"}) is None
    assert [r.round for r in rows] == [1, 2, 3]
    # FedAvg, server lr 1: params += mean delta (0.1 r) of each completed round; round 2 is
    # abandoned, leaves the model unchanged, and commits nobody's private state
    assert torch.allclose(eng.global_params, torch.full((D,), 0.1 + 0.3), atol=1e-6)
    assert t.commits == [(1, [0, 1, 2]), (3, [0, 1, 2])]
    assert rows[1].abandoned == "test: protocol aborted" and rows[1].participants == []
    assert rows[0].abandoned is None and rows[0].protocol_info == {"test": True}
    assert {"train", "server_update", "round_total"} <= set(rows[0].seconds)
    assert "server_update" not in rows[1].seconds
    # metrics.jsonl holds exactly the records, readable back as typed records
    assert [r.to_json() for r in read_records(tmp_path / "metrics.jsonl")] == [
        r.to_json() for r in rows
    ]


def test_engine_checkpoints_every_k_and_restores(tmp_path: Path) -> None:
    eng = _engine(_Transport(), federation__rounds=5, checkpoint__every=2)
    rows: list[RoundRecord] = []
    eng.run(tmp_path, rows, {"name": "t"}, last=3)
    ck = load_latest(tmp_path / "checkpoints")
    assert ck.round == 3  # every 2 rounds and at the last round of the session
    assert "checkpoint" in rows[1].seconds and "checkpoint" not in rows[0].seconds
    assert set(ck.clients) == {0}  # only non-empty private state is kept
    again = _engine(_Transport(), federation__rounds=5, checkpoint__every=2)
    again.restore(ck)
    assert again.round == 3 and torch.equal(again.global_params, eng.global_params)
    again.run(tmp_path, rows, {"name": "t"})
    assert [r.round for r in rows] == [1, 2, 3, 4, 5]


def test_engine_stops_when_no_client_can_afford_a_round(tmp_path: Path) -> None:
    t = _Transport(budget=2)
    eng = _engine(t, federation__rounds=4)
    rows: list[RoundRecord] = []
    assert eng.run(tmp_path, rows, {"name": "t"}) == "test: every budget is exhausted"
    assert [r.round for r in rows] == [1, 2] and t.trained_rounds == 2
    assert json.loads((tmp_path / "stopped.json").read_text())["round"] == 2
    assert load_latest(tmp_path / "checkpoints").round == 2


def test_both_transports_are_client_transports_of_the_one_engine() -> None:
    """The simulation and the deployment have no round loop of their own."""
    from securefed.deploy.coordinator import Coordinator
    from securefed.federation.simulation import InProcessClients

    for cls in (InProcessClients, Coordinator):
        assert issubclass(cls, ClientTransport)
        src = inspect.getsource(cls)
        assert "configure_round(" not in src and "strategy.aggregate(" not in src, cls
    import securefed.run as run

    assert "RoundEngine(" in inspect.getsource(run.run_experiment)
    assert "self.engine.run(" in inspect.getsource(Coordinator.run)


def test_round_record_json_round_trip_and_refusals() -> None:
    rec = RoundRecord(
        round=2, selected=[0, 1], trained=[0, 1], participants=[1], dropped=[0],
        protocol="masking", epsilon={"0": 1.5}, holdout_loss=0.3,
        evaluation={"fid": 12.0, "precision": 0.5}, transport={"dropped_at": {"0": "x"}},
        seconds={"train": 1.0},
    )
    line = rec.to_json()
    assert line["fid"] == 12.0 and line["dropped_at"] == {"0": "x"} and "abandoned" not in line
    assert RoundRecord.from_json(json.loads(json.dumps(line))) == rec
    assert rec.fid == 12.0 and rec.total_seconds == 1.0
    with pytest.raises(ValueError, match="unknown fields \\['mystery'\\]"):
        RoundRecord.from_json({**line, "mystery": 1})
    with pytest.raises(ValueError, match="evaluation: unknown keys"):
        RoundRecord(round=1, evaluation={"bogus": 1})
    with pytest.raises(ValueError, match="round"):
        RoundRecord(round=-1)


def test_evaluation_keys_cover_the_quality_report() -> None:
    from securefed.metrics.evaluator import QualityReport

    assert {f.name for f in dataclasses.fields(QualityReport)} <= EVALUATION_KEYS
