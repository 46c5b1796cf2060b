"""A site's secure-aggregation state between two Flower messages, on the site's own disk.

Flower runs every message of a SuperNode in a fresh ``flwr-clientapp`` process, while the
masking client (:class:`~securefed.secagg.masking.client.MaskingClient`) is a state machine
that lives for a whole round. Between two stages the site therefore writes the machine's state
(its X25519 secrets, its self-mask seed, the shares it holds, what it already revealed) and,
until the masked input is built, its own update vector, to ``<state-dir>/secagg/round.json``
(a round of two sessions, FedDiffuse ``usplit``: one file per session,
``secagg/round.<cohort>.json``, each with the session bytes it is bound to): JSON (no
pickle), written atomically with mode 0600, never sent anywhere. It is deleted when the round
ends (unmasking answered) and replaced when a new round starts.

The public round plan (graph, threshold, grid) is not stored: it is re-derived from the round's
participants and vector length with :func:`~securefed.secagg.masking.plan.plan_round`, exactly
as the client derived it at the first stage.

The site's run registry (``<state-dir>/site_runs.json``, :class:`SiteRecord`) outlives rounds
and runs: the run ids the site accepted (a run id is never accepted twice, except by a resume of
that run, :meth:`securefed.deploy.node.Site.setup`), the current run, per
run the last trained round (a round at or below it is refused: replay) and the nonce of the run's
DP noise key, and the DP plan pinned at the first DP setup.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from securefed.io import atomic_write_text
from securefed.secagg.masking.messages import Stage
from securefed.secagg.masking.plan import MaskingParams, plan_round
from securefed.secagg.masking.state import ClientState

__all__ = [
    "SITE_FILE",
    "RunRecord",
    "SiteRecord",
    "StateError",
    "clear_round_state",
    "load_round_state",
    "load_site_record",
    "round_session",
    "save_round_state",
    "save_site_record",
]

_FORMAT = "securefed-site-secagg-v1"


class StateError(RuntimeError):
    """The stored round state is missing, corrupt, or for another round."""


def _path(state_dir: Path, cohort: str = "") -> Path:
    """``secagg/round.json`` (the round's one session), or ``secagg/round.<cohort>.json`` for
    one session of a multi-cohort round (FedDiffuse ``usplit``: ``front``, ``back``)."""
    if cohort and not cohort.isalpha():
        raise ValueError(f"cohort: {cohort!r} is not a cohort name")
    name = f"round.{cohort}.json" if cohort else "round.json"
    return Path(state_dir) / "secagg" / name


def _priv(key: X25519PrivateKey | None) -> str | None:
    if key is None:
        return None
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ).hex()


def _pairs(d: dict[int, tuple[bytes, bytes]]) -> dict[str, list[str]]:
    return {str(k): [a.hex(), b.hex()] for k, (a, b) in sorted(d.items())}


def save_round_state(
    state_dir: Path, state: ClientState, vector: np.ndarray | None, *, cohort: str = "",
    session: bytes | None = None,
) -> None:
    """Persist ``state`` (and the not-yet-masked ``vector``) atomically, mode 0600.

    ``cohort`` / ``session``: one session of a multi-cohort round, its own file, and the
    session bytes it is bound to (:func:`~securefed.deploy.common.cohort_session`), read back
    by :func:`round_session`."""
    plan = state.plan
    doc: dict[str, Any] = {
        "format": _FORMAT,
        "cohort": cohort,
        "session": None if session is None else session.hex(),
        "client_id": state.client_id,
        "round_id": state.round_id,
        "stage": state.stage,
        "participants": None if plan is None else list(plan.participants),
        "vector_length": None if plan is None else plan.vector_length,
        "c_secret": _priv(state.c_secret),
        "s_secret": _priv(state.s_secret),
        "peer_keys": _pairs(state.peer_keys),
        "share_keys": {str(k): v.hex() for k, v in sorted(state.share_keys.items())},
        "b_seed": None if state.b_seed is None else state.b_seed.hex(),
        "held_shares": _pairs(state.held_shares),
        "masked_with": list(state.masked_with),
        "survivors": None if state.survivors is None else list(state.survivors),
        "revealed_b": sorted(state.revealed_b),
        "revealed_s": sorted(state.revealed_s),
        "vector": None
        if vector is None
        else np.asarray(vector, dtype="<f8").tobytes().hex(),
    }
    atomic_write_text(_path(state_dir, cohort), json.dumps(doc), mode=0o600)


def clear_round_state(state_dir: Path, cohort: str | None = None) -> None:
    """Remove the stored round state (the round is over for this site): every session's, or
    only ``cohort``'s."""
    if cohort is not None:
        _path(state_dir, cohort).unlink(missing_ok=True)
        return
    _path(state_dir).unlink(missing_ok=True)
    folder = Path(state_dir) / "secagg"
    if folder.is_dir():
        for p in folder.glob("round.*.json"):
            p.unlink(missing_ok=True)


def round_session(state_dir: Path, cohort: str) -> bytes:
    """The session bytes stored with ``cohort``'s round state (:func:`save_round_state`).

    Raises:
        StateError: no state for that cohort, or none stored with it.
    """
    p = _path(state_dir, cohort)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc.get("format") != _FORMAT or doc.get("cohort") != cohort:
            raise ValueError(f"format {doc.get('format')!r}, cohort {doc.get('cohort')!r}")
        return bytes.fromhex(doc["session"])
    except FileNotFoundError:
        raise StateError(
            f"{p}: no secure-aggregation state for session {cohort!r}: this site is not in that "
            "session of the round (or did not take part in its first stage)"
        ) from None
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise StateError(
            f"{p}: corrupt secure-aggregation state ({type(exc).__name__}: {exc})"
        ) from None


def load_round_state(
    state_dir: Path,
    client_id: int,
    round_id: int,
    params: MaskingParams | Callable[[int, int], MaskingParams],
    *,
    cohort: str = "",
) -> tuple[ClientState, np.ndarray | None]:
    """Read the state saved by :func:`save_round_state` for ``(client_id, round_id)``.

    ``params``: the round's masking parameters, or ``(participants, vector_length) -> params``
    when they depend on the round (client-level DP: the noise std is per round).

    Raises:
        StateError: no state, a corrupt file, or a state of another client or round.
    """
    p = _path(state_dir, cohort)
    if not p.exists():
        raise StateError(
            f"{p}: no secure-aggregation state for round {round_id}: this site did not take "
            "part in the round's first stage (or its state dir changed)"
        )
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc.get("format") != _FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        if doc.get("cohort", "") != cohort:
            raise StateError(f"{p}: state of session {doc.get('cohort')!r}, not {cohort!r}")
        if int(doc["client_id"]) != client_id or int(doc["round_id"]) != round_id:
            raise StateError(
                f"{p}: state is for client {doc['client_id']} round {doc['round_id']}, the "
                f"message is for client {client_id} round {round_id}"
            )
        stage = doc["stage"]
        if stage is not None and stage not in Stage.ORDER:
            raise ValueError(f"stage {stage!r}")
        state = ClientState(client_id=client_id, round_id=round_id, stage=stage)
        if doc["participants"] is not None:
            parts, length = [int(c) for c in doc["participants"]], int(doc["vector_length"])
            rp = params(len(parts), length) if callable(params) else params
            state.plan = plan_round(rp, round_id, parts, length)
        for name in ("c_secret", "s_secret"):
            if doc[name] is not None:
                setattr(
                    state, name, X25519PrivateKey.from_private_bytes(bytes.fromhex(doc[name]))
                )
        state.peer_keys = {
            int(k): (bytes.fromhex(a), bytes.fromhex(b)) for k, (a, b) in doc["peer_keys"].items()
        }
        state.share_keys = {int(k): bytes.fromhex(v) for k, v in doc["share_keys"].items()}
        state.b_seed = None if doc["b_seed"] is None else bytes.fromhex(doc["b_seed"])
        state.held_shares = {
            int(k): (bytes.fromhex(a), bytes.fromhex(b))
            for k, (a, b) in doc["held_shares"].items()
        }
        state.masked_with = tuple(int(c) for c in doc["masked_with"])
        state.survivors = None if doc["survivors"] is None else tuple(
            int(c) for c in doc["survivors"]
        )
        state.revealed_b = {int(c) for c in doc["revealed_b"]}
        state.revealed_s = {int(c) for c in doc["revealed_s"]}
        vector = None
        if doc["vector"] is not None:
            vector = np.frombuffer(bytes.fromhex(doc["vector"]), dtype="<f8").astype(np.float64)
    except StateError:
        raise
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise StateError(
            f"{p}: corrupt secure-aggregation state ({type(exc).__name__}: {exc}); the site "
            "drops out of this round (delete the file to rejoin from the next round)"
        ) from None
    return state, vector


# ------------------------------------------------------------------ the site's run registry

SITE_FILE = "site_runs.json"
_SITE_FORMAT = "securefed-site-runs-v1"


@dataclass
class RunRecord:
    """One run this site accepted at setup.

    Attributes:
        run_id: the run id (32 hex digits) the coordinator proposed and this site accepted; bound
            into every secure-aggregation signature, key and ciphertext of the run.
        accepted: Unix time of the setup.
        noise_nonce: 32 random bytes (hex) drawn by the site at setup: with the site's secret DP
            noise key they derive this run's noise key, so no two runs share DP noise.
        seed: the experiment's ``seed`` (refused again under seeded noise, a rehearsal mode).
        experiment_sha256: SHA-256 of the ``experiment.yaml`` the site accepted for this run;
            a message of the run is refused if the file changed since.
        last_trained_round: the last round this site trained in (0: none); persisted before the
            update leaves the site; a round at or below it is refused.
        phase0_done: FedDDPM phase 0 (local pre-training and the upload) ran in this run;
            persisted before the upload leaves; a second phase 0 of the run is refused.
        last_decrypted_round: CKKS key holder: the last round whose aggregate this site
            decrypted; a second decryption for a round (a decryption oracle) is refused.
        round_clips: client-level DP with adaptive clipping: round -> the clip norm broadcast
            with that round's start (its noise plan at every later stage of the round); the
            last two rounds are kept.
        round_bit_scales: CKKS with adaptive clipping: round -> the clip-bit scale ``beta`` this
            site planned and packed its bit with (to read the round's unclipped fraction off
            the sum if it decrypts it); the last two rounds are kept.
        derived_clips: CKKS key holder with adaptive clipping: round -> the clip norm this site
            derived itself from the previous round's decrypted sum (a broadcast norm other than
            that, or than the previous round's, is refused); the last two rounds are kept.
        canaries_sha256: audit canaries: SHA-256 of the canary set (coordinates, signs, coins)
            of the first round that assigned this site canaries; a later round of the run with
            another set is refused (a coordinator may not move the canaries from round to round
            to read other coordinates of the site's gradients); empty until then.
    """

    run_id: str
    accepted: float
    noise_nonce: str
    seed: int
    experiment_sha256: str = ""
    last_trained_round: int = 0
    phase0_done: bool = False
    last_decrypted_round: int = 0
    round_clips: dict[int, float] = field(default_factory=dict)
    round_bit_scales: dict[int, float] = field(default_factory=dict)
    derived_clips: dict[int, float] = field(default_factory=dict)
    canaries_sha256: str = ""


@dataclass
class SiteRecord:
    """``<state-dir>/site_runs.json``: every run the site accepted, the current one, and the DP
    plan it pinned at its first DP setup (the ledger's plan is for the life of the state dir)."""

    current: str | None = None
    runs: dict[str, RunRecord] = field(default_factory=dict)
    dp_plan: dict[str, Any] | None = None

    def run(self, run_id: str) -> RunRecord:
        return self.runs[run_id]


def load_site_record(state_dir: Path) -> SiteRecord:
    """Read ``site_runs.json`` (an empty record if the site never accepted a run).

    Raises:
        StateError: the file is corrupt (the site then refuses every message: a lost record could
            let a coordinator replay a run; restore it from backup, do not delete it).
    """
    p = Path(state_dir) / SITE_FILE
    if not p.exists():
        return SiteRecord()
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc.get("format") != _SITE_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
        runs = {
            str(k): RunRecord(
                run_id=str(k),
                accepted=float(v["accepted"]),
                noise_nonce=str(v["noise_nonce"]),
                seed=int(v["seed"]),
                experiment_sha256=str(v["experiment_sha256"]),
                last_trained_round=int(v["last_trained_round"]),
                phase0_done=bool(v.get("phase0_done", False)),
                last_decrypted_round=int(v.get("last_decrypted_round", 0)),
                round_clips={int(r): float(c) for r, c in v.get("round_clips", {}).items()},
                round_bit_scales={
                    int(r): float(c) for r, c in v.get("round_bit_scales", {}).items()
                },
                derived_clips={int(r): float(c) for r, c in v.get("derived_clips", {}).items()},
                canaries_sha256=str(v.get("canaries_sha256", "")),
            )
            for k, v in doc["runs"].items()
        }
        current = doc["current"]
        if current is not None and current not in runs:
            raise ValueError(f"current run {current!r} is not among the runs")
        plan = doc["dp_plan"]
        if plan is not None and not isinstance(plan, dict):
            raise ValueError("dp_plan is not a mapping")
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise StateError(
            f"{p}: corrupt run registry ({type(exc).__name__}: {exc}); the site refuses to run "
            "until it is restored (it protects against replayed runs and DP plan changes)"
        ) from None
    return SiteRecord(current=current, runs=runs, dp_plan=plan)


def save_site_record(state_dir: Path, record: SiteRecord) -> None:
    """Persist ``record`` atomically (temp file, fsync, rename), mode 0600."""
    doc = {
        "format": _SITE_FORMAT,
        "current": record.current,
        "runs": {
            k: {
                "accepted": r.accepted,
                "noise_nonce": r.noise_nonce,
                "seed": r.seed,
                "experiment_sha256": r.experiment_sha256,
                "last_trained_round": r.last_trained_round,
                "phase0_done": r.phase0_done,
                "last_decrypted_round": r.last_decrypted_round,
                "round_clips": {str(k): c for k, c in sorted(r.round_clips.items())[-2:]},
                "round_bit_scales": {
                    str(k): c for k, c in sorted(r.round_bit_scales.items())[-2:]
                },
                "derived_clips": {str(k): c for k, c in sorted(r.derived_clips.items())[-2:]},
                "canaries_sha256": r.canaries_sha256,
            }
            for k, r in sorted(record.runs.items())
        },
        "dp_plan": record.dp_plan,
    }
    atomic_write_text(Path(state_dir) / SITE_FILE, json.dumps(doc, indent=1), mode=0o600)
