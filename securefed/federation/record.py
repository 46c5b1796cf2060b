"""The typed round record: one line of ``metrics.jsonl``, written by the round engine and read
by the report.

Both transports of :class:`~securefed.federation.engine.RoundEngine` (the in-process simulation
and the Flower deployment) produce a :class:`RoundRecord`; :meth:`RoundRecord.to_json` is the
line on disk (the same keys the run directory has always had) and :meth:`RoundRecord.from_json`
reads it back, so a reader (``report/run_report.py``, ``securefed compare``) names its fields
instead of guessing dict keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from securefed.io import read_jsonl

__all__ = ["EVALUATION_KEYS", "TRANSPORT_KEYS", "RoundRecord", "read_records"]

#: what the evaluation of a round may add (``holdout_loss`` has its own field): every field of
#: :class:`~securefed.metrics.evaluator.QualityReport` (a test checks this), the per-client
#: values of a personalised strategy, and the round-0 marker of a public-only model
EVALUATION_KEYS = frozenset(
    {
        "fid",
        "precision",
        "recall",
        "class_histogram",
        "class_coverage",
        "feature_net_accuracy",
        "inception_fid",
        "fid_worst",
        "fid_clients",
        "holdout_loss_clients",
        "public_only",
    }
)

#: transport-specific facts a line may carry (everything else unknown is refused on reading)
TRANSPORT_KEYS = frozenset(
    {
        "dropped_at",
        "dropout_reasons",
        "bytes_up_clients",
        "bytes_down_clients",
        "cohorts_abandoned",
        "client_dp",
    }
)


@dataclass(frozen=True)
class RoundRecord:
    """One round of a run (``round`` 0: the model before federated training).

    Attributes:
        round: 1-based round (0 for the start-of-run evaluation line).
        selected: the clients the strategy's plan selected (None on the round-0 line).
        trained: the selected clients that trained (not dropped before training, budget left).
        participants: the clients whose update is in the aggregated sum (the survivors).
        dropped: the selected clients that dropped out at some stage (simulated or real).
        protocol: the aggregation protocol's name; protocol_info: its per-round facts
            (threshold, recovered dropouts, quantisation or CKKS error bound, ...).
        bytes_up / bytes_down: protocol and broadcast bytes of the round, all clients.
        exchange: ``{"params_up", "params_down"}`` element counts (FedDiffuse's saving).
        mean_local_loss: mean local training loss of the trained clients (simulation only: a
            deployed site never reveals its loss).
        epsilon: client id (str) -> epsilon spent so far (DP runs).
        budget_exhausted: clients that could not afford this round (DP runs).
        abandoned: why the round was abandoned (the global model is unchanged), or None.
        server: the strategy's server-side facts (``Strategy.round_metrics``).
        holdout_loss: denoising loss on the holdout slice, when evaluated this round.
        evaluation: further evaluation results (keys in :data:`EVALUATION_KEYS`).
        transport: transport-specific facts (keys in :data:`TRANSPORT_KEYS`).
        seconds: wall seconds per phase (``train``, ``aggregate``, each masking stage,
            ``server_update``, ``eval_loss``, ``fid``, ``round_total``, ``checkpoint``).
    """

    round: int
    selected: list[int] | None = None
    trained: list[int] | None = None
    participants: list[int] | None = None
    dropped: list[int] | None = None
    protocol: str | None = None
    protocol_info: Mapping[str, Any] | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    exchange: Mapping[str, int] | None = None
    mean_local_loss: float | None = None
    epsilon: Mapping[str, float] | None = None
    budget_exhausted: list[int] | None = None
    abandoned: str | None = None
    server: Mapping[str, Any] | None = None
    holdout_loss: float | None = None
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    transport: Mapping[str, Any] = field(default_factory=dict)
    seconds: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.round, int) or isinstance(self.round, bool) or self.round < 0:
            raise ValueError(f"RoundRecord.round: expected an integer >= 0, got {self.round!r}")
        bad = set(self.evaluation) - EVALUATION_KEYS
        if bad:
            raise ValueError(
                f"RoundRecord.evaluation: unknown keys {sorted(bad)}; add them to EVALUATION_KEYS"
            )
        bad = set(self.transport) - TRANSPORT_KEYS
        if bad:
            raise ValueError(
                f"RoundRecord.transport: unknown keys {sorted(bad)}; add them to TRANSPORT_KEYS"
            )

    # ------------------------------------------------------------------ reading
    @property
    def fid(self) -> float | None:
        """The round's FID (mean over clients for a personalised strategy), if measured."""
        v = self.evaluation.get("fid")
        return None if v is None else float(v)

    @property
    def total_seconds(self) -> float:
        """``seconds.round_total`` when written, else the sum of the phases."""
        s = self.seconds
        return float(s["round_total"]) if "round_total" in s else float(sum(s.values()))

    def with_seconds(self, **values: float) -> RoundRecord:
        """A copy with ``values`` added to :attr:`seconds` (rounded to 0.1 ms)."""
        return replace(
            self, seconds={**self.seconds, **{k: round(v, 4) for k, v in values.items()}}
        )

    # ------------------------------------------------------------------ the line on disk
    def to_json(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` line: every set field under its own name, the evaluation and
        transport facts flattened into it (the run directory's format), None fields left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("evaluation", "transport"):
                out.update(v)
            elif v is not None:
                out[f.name] = dict(v) if isinstance(v, Mapping) else v
        return out

    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> RoundRecord:
        """Read one ``metrics.jsonl`` line back; an unknown key is an error naming it (a line
        written by another version of securefed is not silently misread)."""
        names = {f.name for f in fields(cls)} - {"evaluation", "transport"}
        kwargs: dict[str, Any] = {k: v for k, v in line.items() if k in names}
        kwargs["evaluation"] = {k: v for k, v in line.items() if k in EVALUATION_KEYS}
        kwargs["transport"] = {k: v for k, v in line.items() if k in TRANSPORT_KEYS}
        unknown = set(line) - names - EVALUATION_KEYS - TRANSPORT_KEYS
        if unknown:
            raise ValueError(
                f"metrics.jsonl, round {line.get('round')!r}: unknown fields {sorted(unknown)} "
                "(written by another securefed version?)"
            )
        if "round" not in line:
            raise ValueError(f"metrics.jsonl: a line without a round: {dict(line)!r:.200}")
        return cls(**kwargs)


def read_records(path: Any) -> list[RoundRecord]:
    """Every line of a run directory's ``metrics.jsonl`` as :class:`RoundRecord`."""
    return [RoundRecord.from_json(r) for r in read_jsonl(path)]
