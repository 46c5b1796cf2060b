"""Per-client privacy ledger: plans, charges and enforces each client's DP-SGD budget.

The ledger is the run's record of how much privacy every client has spent
(``runs/<name>/privacy_ledger.json``). For each client it holds the calibrated plan
(target epsilon, delta, noise multiplier, Poisson sample rate, planned steps, accountant) and
one entry per charged phase (``phase``, ``round``, ``steps``, ``noise_multiplier``,
``sample_rate``, ``epsilon_after`` and ``update_sha256``, the SHA-256 of the released update).
A client's accountant history is exactly its entries' ``(noise_multiplier, sample_rate, steps)``;
epsilon is recomputed from it with
:func:`securefed.privacy.accountant.epsilon_of` (PRV, Gopi et al. 2021; RDP fallback, Mironov
2017), so it equals what an Opacus accountant stepped through the same steps reports.

Protocol (a client's DP-SGD training in one round):

1. before training, ``would_exceed(cid, steps)``: if True the client must not train
   (``mark_exhausted(cid, round)``);
2. after training, BEFORE the update leaves the client, ``charge(cid, phase=..., round=...,
   steps=...)``: the entry is appended and the file saved atomically (``fsync`` + ``os.replace``)
   before ``charge`` returns. A crash can therefore lose an un-released update but never a
   released update's charge.

Resume (:meth:`PrivacyLedger.reopen_after`): the charges of rounds after the checkpoint are
KEPT (their updates may have left). A replayed round is free only when it reproduces the recorded
digest of the released update bit for bit (then the same value is released twice, which reveals
nothing more); otherwise the replay is discarded unreleased and the client retrains with fresh
noise and fresh sampling, charged again (``securefed.client.dp.train_private_charged``). Replay
is not bit-identical across thread counts or devices, so "exact" is judged by the digest, never by
the resuming machine.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from securefed.artefacts.rundir import LEDGER_FILE
from securefed.errors import SecurefedError
from securefed.io import atomic_write_json
from securefed.privacy.accountant import (
    ACCOUNTANTS,
    History,
    calibrate_noise_multiplier,
    epsilon_of,
)

__all__ = [
    "EPSILON_SLACK",
    "LEDGER_FILENAME",
    "ClientPlan",
    "LedgerEntry",
    "LedgerError",
    "PrivacyLedger",
]

log = logging.getLogger(__name__)

LEDGER_FILENAME = LEDGER_FILE
_FORMAT = "securefed-privacy-ledger"
_VERSION = 1

#: relative slack of the budget test: absorbs only float round-off between machines (the
#: calibration already guarantees epsilon <= target for the planned schedule); it is never applied
#: to the epsilon that is recorded or reported
EPSILON_SLACK = 1e-9

Status = Literal["active", "budget_exhausted"]
_STATUSES = ("active", "budget_exhausted")


class LedgerError(SecurefedError, ValueError):
    """The ledger file is corrupt, or an operation would break the ledger's invariants."""


@dataclass(frozen=True)
class ClientPlan:
    """One client's DP-SGD plan.

    Attributes:
        target_epsilon: the budget; no charge may take epsilon above it.
        delta: the delta at which epsilon is computed.
        noise_multiplier: Gaussian noise std / clipping norm (Abadi et al. 2016).
        sample_rate: Poisson sampling rate ``batch_size / n``.
        planned_steps: DP-SGD steps the whole run plans for this client.
        accountant: ``"prv"`` or ``"rdp"``.
        planned_epsilon: epsilon of the whole planned schedule (<= target when calibrated).
    """

    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    accountant: str
    planned_epsilon: float


@dataclass(frozen=True)
class LedgerEntry:
    """One charged phase of one client: ``steps`` DP-SGD steps at the given noise and rate."""

    client_id: int
    phase: str
    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    epsilon_after: float
    update_sha256: str | None = None


@dataclass
class _Account:
    plan: ClientPlan
    status: Status = "active"
    exhausted_round: int | None = None


class PrivacyLedger:
    """Per-client privacy accounts persisted atomically as JSON at ``path``.

    ``PrivacyLedger(path)`` starts an empty ledger (nothing is written until the first
    :meth:`plan`); :meth:`load` reads an existing one; :meth:`open` does whichever applies.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._accounts: dict[int, _Account] = {}
        self._entries: list[LedgerEntry] = []

    # ------------------------------------------------------------------ persistence
    @classmethod
    def open(cls, path: str | Path) -> PrivacyLedger:
        """Load the ledger at ``path`` if the file exists, else start an empty one there."""
        return cls.load(path) if Path(path).exists() else cls(path)

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """Read and validate a ledger file.

        Raises:
            LedgerError: the file is not valid JSON or does not follow the schema; the message
                names the file and the offending field.
        """
        p = Path(path)
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerError(f"{p}: cannot read the privacy ledger ({exc})") from None
        ledger = cls(p)
        try:
            ledger._from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            msg = exc.args[0] if isinstance(exc, LedgerError) else f"{type(exc).__name__}: {exc}"
            raise LedgerError(
                f"{p}: corrupt privacy ledger: {msg}; restore it from a backup; never delete or "
                "reset it, it is the only record of the privacy budget already spent"
            ) from None
        return ledger

    def save(self) -> None:
        """Write the ledger atomically (temp file, fsync, ``os.replace``)."""
        atomic_write_json(self.path, self._to_dict())

    def _to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "clients": {
                str(cid): {
                    **asdict(acc.plan),
                    "status": acc.status,
                    "exhausted_round": acc.exhausted_round,
                }
                for cid, acc in sorted(self._accounts.items())
            },
            "entries": [asdict(e) for e in self._entries],
        }

    def _from_dict(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise LedgerError("top level must be a JSON object")
        if raw.get("format") != _FORMAT:
            raise LedgerError(f"format: expected {_FORMAT!r}, got {raw.get('format')!r}")
        if raw.get("version") != _VERSION:
            raise LedgerError(f"version: expected {_VERSION}, got {raw.get('version')!r}")
        clients, entries = raw.get("clients"), raw.get("entries")
        if not isinstance(clients, dict):
            raise LedgerError("clients: must be an object keyed by client id")
        if not isinstance(entries, list):
            raise LedgerError("entries: must be a list")
        for key, acc in clients.items():
            where = f"clients[{key!r}]"
            cid = _as_int(int(key) if key.isdigit() else key, where, minimum=0)
            if not isinstance(acc, dict):
                raise LedgerError(f"{where}: must be an object")
            plan = ClientPlan(
                target_epsilon=_as_float(acc, "target_epsilon", where, positive=True),
                delta=_as_float(acc, "delta", where, positive=True),
                noise_multiplier=_as_float(acc, "noise_multiplier", where, positive=True),
                sample_rate=_as_float(acc, "sample_rate", where, positive=True),
                planned_steps=_as_int(acc.get("planned_steps"), f"{where}.planned_steps", 1),
                accountant=_as_str(acc, "accountant", where),
                planned_epsilon=_as_float(acc, "planned_epsilon", where, inf_ok=True),
            )
            _validate_plan(plan, where)
            status = acc.get("status")
            if status not in _STATUSES:
                raise LedgerError(f"{where}.status: must be one of {_STATUSES}, got {status!r}")
            ex = acc.get("exhausted_round")
            ex = None if ex is None else _as_int(ex, f"{where}.exhausted_round", 0)
            self._accounts[cid] = _Account(plan, status, ex)
        for i, e in enumerate(entries):
            where = f"entries[{i}]"
            if not isinstance(e, dict):
                raise LedgerError(f"{where}: must be an object")
            cid = _as_int(e.get("client_id"), f"{where}.client_id", 0)
            if cid not in self._accounts:
                raise LedgerError(f"{where}.client_id: client {cid} has no plan in 'clients'")
            self._entries.append(
                LedgerEntry(
                    client_id=cid,
                    phase=_as_str(e, "phase", where),
                    round=_as_int(e.get("round"), f"{where}.round", 0),
                    steps=_as_int(e.get("steps"), f"{where}.steps", 1),
                    noise_multiplier=_as_float(e, "noise_multiplier", where, positive=True),
                    sample_rate=_as_float(e, "sample_rate", where, positive=True),
                    epsilon_after=_as_float(e, "epsilon_after", where, inf_ok=True),
                    update_sha256=_as_digest(e.get("update_sha256"), f"{where}.update_sha256"),
                )
            )
            if not self._entries[-1].sample_rate <= 1.0:
                raise LedgerError(f"{where}.sample_rate: must be <= 1")

    # ------------------------------------------------------------------ planning
    def plan(
        self,
        client_id: int,
        *,
        noise_multiplier: float | None,
        sample_rate: float,
        planned_steps: int,
        target_epsilon: float | None,
        delta: float,
        accountant: str = "prv",
    ) -> ClientPlan:
        """Record (and save) a client's plan; idempotent for an identical plan.

        Args:
            client_id: the client, >= 0.
            noise_multiplier: ``None`` calibrates it from ``target_epsilon`` over the planned
                schedule (:func:`~securefed.privacy.accountant.calibrate_noise_multiplier`).
            sample_rate: Poisson rate ``batch_size / n`` in (0, 1].
            planned_steps: DP-SGD steps over the whole run.
            target_epsilon: the budget; ``None`` (explicit noise multiplier only) makes the
                budget the epsilon of the planned schedule.
            delta: in (0, 1).
            accountant: ``"prv"`` or ``"rdp"``.

        Raises:
            LedgerError: the client already has a different plan (a budget is fixed for a run).
            ValueError: invalid or impossible inputs.
        """
        cid = _check_client_id(client_id)
        old = self._accounts.get(cid)
        if old is not None:  # resume: the same plan again is a no-op (no re-calibration)
            o = old.plan
            same = (
                (o.sample_rate, o.planned_steps, o.delta, o.accountant)
                == (float(sample_rate), planned_steps, float(delta), accountant)
                and (noise_multiplier is None or float(noise_multiplier) == o.noise_multiplier)
                and (target_epsilon is None or float(target_epsilon) == o.target_epsilon)
            )
            if same:
                return o
            raise LedgerError(
                f"{self.path}: client {cid} already has a plan ({o}); a client's budget and "
                f"noise are fixed for the whole run, got noise_multiplier={noise_multiplier}, "
                f"sample_rate={sample_rate}, planned_steps={planned_steps}, "
                f"target_epsilon={target_epsilon}, delta={delta}, accountant={accountant!r}"
            )
        if noise_multiplier is None:
            if target_epsilon is None:
                raise ValueError(
                    "dp.target_epsilon: a plan needs a target_epsilon or a noise_multiplier"
                )
            noise_multiplier = calibrate_noise_multiplier(
                target_epsilon, delta, sample_rate, planned_steps, accountant
            )
        planned_eps = epsilon_of(
            [(noise_multiplier, sample_rate, planned_steps)], delta, accountant
        )
        target = planned_eps if target_epsilon is None else float(target_epsilon)
        plan = ClientPlan(
            target_epsilon=target,
            delta=float(delta),
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            planned_steps=_check_steps(planned_steps, allow_zero=False),
            accountant=accountant,
            planned_epsilon=planned_eps,
        )
        _validate_plan(plan, "plan", exc=ValueError)
        if _exceeds(planned_eps, target):
            log.warning(
                "client %d: the planned %d steps would spend epsilon %.4g > target %.4g; "
                "training will stop when the budget is exhausted",
                cid,
                planned_steps,
                planned_eps,
                target,
            )
        self._accounts[cid] = _Account(plan)
        try:
            self.save()
        except BaseException:
            del self._accounts[cid]
            raise
        return plan

    # ------------------------------------------------------------------ queries
    @property
    def clients(self) -> list[int]:
        """Planned client ids, sorted."""
        return sorted(self._accounts)

    @property
    def entries(self) -> list[LedgerEntry]:
        """All charged phases in charge order (a copy)."""
        return list(self._entries)

    def get_plan(self, client_id: int) -> ClientPlan:
        return self._account(client_id).plan

    def history(self, client_id: int) -> History:
        """The client's accountant history ``[(noise_multiplier, sample_rate, steps), ...]``."""
        self._account(client_id)
        return [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in self._entries
            if e.client_id == client_id
        ]

    def steps(self, client_id: int) -> int:
        """DP-SGD steps charged so far."""
        return sum(s for _, _, s in self.history(client_id))

    def epsilon(self, client_id: int) -> float:
        """Epsilon spent so far at the plan's delta (0.0 before the first charge)."""
        self._account(client_id)
        for e in reversed(self._entries):
            if e.client_id == client_id:
                return e.epsilon_after
        return 0.0

    def status(self, client_id: int) -> Status:
        return self._account(client_id).status

    def would_exceed(
        self,
        client_id: int,
        steps: int,
        *,
        noise_multiplier: float | None = None,
        sample_rate: float | None = None,
    ) -> bool:
        """Would ``steps`` more steps take epsilon over the target?

        The steps are at the planned noise multiplier and sample rate unless overridden (e.g. a
        phase with another subsampled Gaussian mechanism). Computed on the full history (never on
        an approximation), with only :data:`EPSILON_SLACK` relative float slack. An exhausted
        client always exceeds.
        """
        acc = self._account(client_id)
        steps = _check_steps(steps, allow_zero=True)
        if acc.status == "budget_exhausted":
            return True
        p = acc.plan
        step = _step(p, noise_multiplier, sample_rate, steps)
        hist = [*self.history(client_id), step]
        return _exceeds(epsilon_of(hist, p.delta, p.accountant), p.target_epsilon)

    def remaining_steps(self, client_id: int) -> int:
        """Largest number of further steps that :meth:`would_exceed` allows (bisection)."""
        if self.would_exceed(client_id, 1):
            return 0
        lo, hi = 1, max(2, self.get_plan(client_id).planned_steps)
        while not self.would_exceed(client_id, hi):
            if hi > 1 << 40:
                raise LedgerError(f"client {client_id}: epsilon does not grow with steps")
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.would_exceed(client_id, mid) else (mid, hi)
        return lo

    # ------------------------------------------------------------------ updates
    def charge(
        self,
        client_id: int,
        *,
        phase: str,
        round: int,
        steps: int,
        noise_multiplier: float | None = None,
        sample_rate: float | None = None,
        update_sha256: str | None = None,
    ) -> float:
        """Charge ``steps`` DP-SGD steps; save; return the epsilon spent.

        The steps are at the planned noise multiplier and sample rate unless overridden.
        ``update_sha256`` is the digest of the update this charge releases (64 hex digits); a
        resumed replay that reproduces it is not charged again.

        Call it BEFORE the client's update leaves the client: the entry is on disk (atomic
        write) when this returns; if saving fails the in-memory ledger is rolled back and the
        exception propagates, so the update must not be released. A charge is recorded even if it
        takes epsilon over the target (the noise was drawn); the client is then marked
        ``budget_exhausted`` and an error is logged.
        """
        acc = self._account(client_id)
        if not (isinstance(phase, str) and phase):
            raise ValueError(f"phase: must be a non-empty string, got {phase!r}")
        rnd = _as_int(round, "round", 0, exc=ValueError)
        steps = _check_steps(steps, allow_zero=True)
        digest = _as_digest(update_sha256, "update_sha256", exc=ValueError)
        if steps == 0:
            return self.epsilon(client_id)
        p = acc.plan
        sigma, q, _ = step = _step(p, noise_multiplier, sample_rate, steps)
        eps = epsilon_of([*self.history(client_id), step], p.delta, p.accountant)
        entry = LedgerEntry(
            client_id=int(client_id),
            phase=phase,
            round=rnd,
            steps=steps,
            noise_multiplier=sigma,
            sample_rate=q,
            epsilon_after=eps,
            update_sha256=digest,
        )
        before = (acc.status, acc.exhausted_round)
        self._entries.append(entry)
        if _exceeds(eps, p.target_epsilon):
            log.error(
                "client %d: epsilon %.4g exceeds the target %.4g after round %d (call "
                "would_exceed before training)",
                client_id,
                eps,
                p.target_epsilon,
                rnd,
            )
            acc.status, acc.exhausted_round = "budget_exhausted", rnd
        try:
            self.save()
        except BaseException:
            self._entries.pop()
            acc.status, acc.exhausted_round = before
            raise
        return eps

    def mark_exhausted(self, client_id: int, round: int) -> None:
        """Mark a client out of budget from ``round`` on (it trains no more); save."""
        acc = self._account(client_id)
        rnd = _as_int(round, "round", 0, exc=ValueError)
        if acc.status == "budget_exhausted":
            return
        acc.status, acc.exhausted_round = "budget_exhausted", rnd
        try:
            self.save()
        except BaseException:
            acc.status, acc.exhausted_round = "active", None
            raise

    def charges_for(self, client_id: int, phase: str, round: int) -> list[LedgerEntry]:
        """The entries already charged for ``client_id``'s ``phase`` of ``round`` (a replay)."""
        return [
            e
            for e in self._entries
            if e.client_id == client_id and e.phase == phase and e.round == round
        ]

    def reopen_after(self, round: int) -> list[LedgerEntry]:
        """Resume from the checkpoint of ``round``: KEEP every charge; clear later exhaustion marks.

        Charges are made before an update leaves its client, so after a crash the ledger may hold
        charges of rounds after the last checkpoint whose updates were released. They stay: a
        replayed round is free only if it reproduces the entry's ``update_sha256``, otherwise it
        is retrained with fresh noise and charged again (over-counting is safe, under-counting is
        not). Exhaustion marks after ``round`` are decisions, not spending: they are cleared and
        re-decided by the replay. Saves.

        Returns:
            the kept entries of rounds ``> round`` (awaiting replay).
        """
        k = _as_int(round, "round", 0, exc=ValueError)
        marks = {cid: (a.status, a.exhausted_round) for cid, a in self._accounts.items()}
        changed = False
        for a in self._accounts.values():
            if a.exhausted_round is not None and a.exhausted_round > k:
                a.status, a.exhausted_round = "active", None
                changed = True
        # a client whose KEPT charges already spent its budget stays exhausted
        for cid, a in self._accounts.items():
            if a.status == "active" and _exceeds(self.epsilon(cid), a.plan.target_epsilon):
                a.status, a.exhausted_round = marks[cid]
        if changed:
            try:
                self.save()
            except BaseException:
                for cid, (st, ex) in marks.items():
                    self._accounts[cid].status, self._accounts[cid].exhausted_round = st, ex
                raise
        return [e for e in self._entries if e.round > k]

    def truncate_after(self, round: int) -> list[LedgerEntry]:
        """Drop the entries (and exhaustion marks) of rounds ``> round``; save; return them.

        For resuming from the checkpoint of round ``round``. Entries are charged before an update
        leaves its client, so after a crash the ledger may hold charges of rounds after the last
        checkpoint. Those rounds are re-executed on resume and charged again. Dropping their old
        entries is exact, with no double count and no lost charge, ONLY because replay
        regenerates the same randomness: same data, same Poisson batches and diffusion draws
        (seeded), and bit-identical DP noise (the noise key is derived per client-round from the
        persisted run key, :func:`securefed.noise.secure_noise.derive_key`). A replayed update
        is then identical to the one that may have been released, and releasing the same value
        twice reveals nothing more than releasing it once.

        Resume does not use it (see :meth:`reopen_after`): replay is not bit-identical across
        thread counts or devices. Do NOT call this when replay is not bit-identical (fresh
        ``os.urandom`` noise keys, a changed config or data, non-deterministic GPU kernels without
        ``torch.use_deterministic_algorithms(True)``): two different noisy updates of the same
        data may then have left the client, and the conservative policy is to keep the old
        entries (double counting is safe, forgetting is not).

        Returns:
            the dropped entries (for the run log).
        """
        k = _as_int(round, "round", 0, exc=ValueError)
        dropped = [e for e in self._entries if e.round > k]
        if not dropped and not any(
            a.exhausted_round is not None and a.exhausted_round > k for a in self._accounts.values()
        ):
            return []
        old_entries = self._entries
        old_marks = {cid: (a.status, a.exhausted_round) for cid, a in self._accounts.items()}
        self._entries = [e for e in self._entries if e.round <= k]
        for a in self._accounts.values():
            if a.exhausted_round is not None and a.exhausted_round > k:
                a.status, a.exhausted_round = "active", None
        try:
            self.save()
        except BaseException:
            self._entries = old_entries
            for cid, (st, ex) in old_marks.items():
                self._accounts[cid].status, self._accounts[cid].exhausted_round = st, ex
            raise
        return dropped

    # ------------------------------------------------------------------ reporting
    def table(self) -> str:
        """A fixed-width table: one row per client with its plan, spend and status."""
        head = (
            "client",
            "target eps",
            "delta",
            "noise mult",
            "sample rate",
            "steps",
            "eps spent",
            "status",
        )
        rows = [head]
        for cid in self.clients:
            p = self.get_plan(cid)
            rows.append(
                (
                    str(cid),
                    f"{p.target_epsilon:.4g}",
                    f"{p.delta:.3g}",
                    f"{p.noise_multiplier:.4g}",
                    f"{p.sample_rate:.4g}",
                    f"{self.steps(cid)}/{p.planned_steps}",
                    f"{self.epsilon(cid):.4g}",
                    self.status(cid),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    # ------------------------------------------------------------------ helpers
    def _account(self, client_id: int) -> _Account:
        cid = _check_client_id(client_id)
        acc = self._accounts.get(cid)
        if acc is None:
            raise KeyError(f"privacy ledger {self.path}: client {cid} has no plan (call plan())")
        return acc


def _step(
    plan: ClientPlan, noise_multiplier: float | None, sample_rate: float | None, steps: int
) -> tuple[float, float, int]:
    sigma = plan.noise_multiplier if noise_multiplier is None else float(noise_multiplier)
    q = plan.sample_rate if sample_rate is None else float(sample_rate)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise_multiplier: must be finite and > 0, got {noise_multiplier!r}")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate: must lie in (0, 1], got {sample_rate!r}")
    return sigma, q, steps


def _exceeds(eps: float, target: float) -> bool:
    return eps > target * (1.0 + EPSILON_SLACK)


def _validate_plan(plan: ClientPlan, where: str, exc: type[ValueError] = LedgerError) -> None:
    if plan.accountant not in ACCOUNTANTS:
        raise exc(
            f"{where}.accountant: must be one of {sorted(ACCOUNTANTS)}, got {plan.accountant!r}"
        )
    if not 0.0 < plan.delta < 1.0:
        raise exc(f"{where}.delta: must lie in (0, 1), got {plan.delta}")
    if not 0.0 < plan.sample_rate <= 1.0:
        raise exc(f"{where}.sample_rate: must lie in (0, 1], got {plan.sample_rate}")
    if not (math.isfinite(plan.noise_multiplier) and plan.noise_multiplier > 0):
        raise exc(f"{where}.noise_multiplier: must be finite and > 0, got {plan.noise_multiplier}")
    if not (math.isfinite(plan.target_epsilon) and plan.target_epsilon > 0):
        raise exc(f"{where}.target_epsilon: must be finite and > 0, got {plan.target_epsilon}")
    if plan.planned_steps < 1:
        raise exc(f"{where}.planned_steps: must be >= 1, got {plan.planned_steps}")


def _check_client_id(client_id: int) -> int:
    return _as_int(client_id, "client_id", 0, exc=ValueError)


def _check_steps(steps: int, allow_zero: bool) -> int:
    return _as_int(steps, "steps", 0 if allow_zero else 1, exc=ValueError)


def _as_int(value: Any, where: str, minimum: int, exc: type[ValueError] = LedgerError) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise exc(f"{where}: must be an integer >= {minimum}, got {value!r}")
    return value


def _as_float(
    d: Mapping[str, Any], key: str, where: str, *, positive: bool = False, inf_ok: bool = False
) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise LedgerError(f"{where}.{key}: must be a number, got {v!r}")
    if (math.isinf(v) and not inf_ok) or (positive and not v > 0) or v < 0:
        raise LedgerError(f"{where}.{key}: out of range, got {v!r}")
    return float(v)


def _as_str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not (isinstance(v, str) and v):
        raise LedgerError(f"{where}.{key}: must be a non-empty string, got {v!r}")
    return v


def _as_digest(value: Any, where: str, exc: type[ValueError] = LedgerError) -> str | None:
    """``None`` or a lower-case SHA-256 hex digest (64 characters)."""
    if value is None:
        return None
    hexdigits = "0123456789abcdef"
    if not (isinstance(value, str) and len(value) == 64 and all(c in hexdigits for c in value)):
        raise exc(f"{where}: must be a SHA-256 hex digest (64 lower-case hex digits), got {value}")
    return value
