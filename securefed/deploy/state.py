"""A site's secure-aggregation state between two Flower messages, on the site's own disk.

Flower runs every message of a SuperNode in a fresh ``flwr-clientapp`` process, while the
masking client (:class:`~securefed.secagg.masking.client.MaskingClient`) is a state machine
that lives for a whole round. Between two stages the site therefore writes the machine's state
(its X25519 secrets, its self-mask seed, the shares it holds, what it already revealed) and,
until the masked input is built, its own update vector, to ``<state-dir>/secagg/round.json``:
JSON (no pickle), written atomically with mode 0600, never sent anywhere. It is deleted when
the round ends (unmasking answered) and replaced when a new round starts.

The public round plan (graph, threshold, grid) is not stored: it is re-derived from the round's
participants and vector length with :func:`~securefed.secagg.masking.stages.plan_round`, exactly
as the client derived it at the first stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from securefed.io import atomic_write_text
from securefed.secagg.masking.stages import ClientState, MaskingParams, Stage, plan_round

__all__ = ["StateError", "clear_round_state", "load_round_state", "save_round_state"]

_FORMAT = "securefed-site-secagg-v1"


class StateError(RuntimeError):
    """The stored round state is missing, corrupt, or for another round."""


def _path(state_dir: Path) -> Path:
    return Path(state_dir) / "secagg" / "round.json"


def _priv(key: X25519PrivateKey | None) -> str | None:
    if key is None:
        return None
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ).hex()


def _pairs(d: dict[int, tuple[bytes, bytes]]) -> dict[str, list[str]]:
    return {str(k): [a.hex(), b.hex()] for k, (a, b) in sorted(d.items())}


def save_round_state(
    state_dir: Path, state: ClientState, vector: np.ndarray | None
) -> None:
    """Persist ``state`` (and the not-yet-masked ``vector``) atomically, mode 0600."""
    plan = state.plan
    doc: dict[str, Any] = {
        "format": _FORMAT,
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
    atomic_write_text(_path(state_dir), json.dumps(doc), mode=0o600)


def clear_round_state(state_dir: Path) -> None:
    """Remove the stored round state (the round is over for this site)."""
    _path(state_dir).unlink(missing_ok=True)


def load_round_state(
    state_dir: Path, client_id: int, round_id: int, params: MaskingParams
) -> tuple[ClientState, np.ndarray | None]:
    """Read the state saved by :func:`save_round_state` for ``(client_id, round_id)``.

    Raises:
        StateError: no state, a corrupt file, or a state of another client or round.
    """
    p = _path(state_dir)
    if not p.exists():
        raise StateError(
            f"{p}: no secure-aggregation state for round {round_id}: this site did not take "
            "part in the round's first stage (or its state dir changed)"
        )
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc.get("format") != _FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
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
            state.plan = plan_round(
                params, round_id, [int(c) for c in doc["participants"]],
                int(doc["vector_length"]),
            )
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
