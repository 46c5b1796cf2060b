"""Run checkpoints: atomic, checksummed, loaded without pickle (``weights_only=True``).

Layout: ``checkpoints/round_XXXX.pt`` plus ``checkpoints/latest.json`` =
``{"round": r, "file": "round_XXXX.pt", "sha256": ...}``. The manifest is replaced only after
the checkpoint file is durable, so a kill at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from securefed.errors import SecurefedError
from securefed.io import atomic_write_bytes, atomic_write_json, sha256_file

__all__ = ["Checkpoint", "CheckpointError", "load_latest", "save_checkpoint"]

FORMAT_VERSION = 1


class CheckpointError(SecurefedError, RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue a run after ``round``.

    Attributes:
        round: last completed round.
        global_params: ``[D]`` float32 global model.
        strategy: strategy state (server momentum, EMA, SCAFFOLD control variate).
        clients: client id -> its private persistent state (e.g. SCAFFOLD ``c_i``).
        meta: small JSON-able facts (config hash, format version, counters).
        released: ``[D]`` float32 parameters the run releases at this round (the strategy's
            ``eval_params``: the EMA when kept), or None for the global model.
    """

    round: int
    global_params: torch.Tensor
    strategy: dict[str, torch.Tensor]
    clients: dict[int, dict[str, torch.Tensor]]
    meta: dict[str, Any]
    released: torch.Tensor | None = None


def save_checkpoint(ckpt_dir: Path, ckpt: Checkpoint, keep_last: int = 2) -> Path:
    """Write ``round_XXXX.pt`` atomically, then the manifest; prune older files."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "round": ckpt.round,
        "global_params": ckpt.global_params.contiguous(),
        "strategy": dict(ckpt.strategy),
        "clients": {str(k): dict(v) for k, v in ckpt.clients.items()},
        "meta_json": json.dumps(ckpt.meta, sort_keys=True),
    }
    if ckpt.released is not None:
        payload["released"] = ckpt.released.detach().to(torch.float32).contiguous()
    buf = io.BytesIO()
    torch.save(payload, buf)
    name = f"round_{ckpt.round:04d}.pt"
    path = ckpt_dir / name
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_json(
        ckpt_dir / "latest.json", {"round": ckpt.round, "file": name, "sha256": sha256_file(path)}
    )
    existing = sorted(ckpt_dir.glob("round_*.pt"))
    for old in existing[:-keep_last]:
        if old.name != name:
            old.unlink(missing_ok=True)
    return path


def load_latest(ckpt_dir: Path) -> Checkpoint:
    """Load the checkpoint named by ``latest.json`` after verifying its SHA-256."""
    manifest = ckpt_dir / "latest.json"
    if not manifest.exists():
        raise CheckpointError(
            f"no checkpoint to resume from: {manifest} is missing (the run stopped before its "
            "first checkpoint; start it again without --resume)"
        )
    try:
        info = json.loads(manifest.read_text())
        path = ckpt_dir / str(info["file"])
        expected = str(info["sha256"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{manifest}: unreadable manifest ({exc})") from None
    if not path.exists():
        raise CheckpointError(f"{manifest} names {path.name}, which does not exist")
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: checksum mismatch (expected {expected[:12]}..., got {actual[:12]}...); "
            "the file is corrupt or was modified"
        )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {raw.get('format_version')} is not {FORMAT_VERSION}"
        )
    return Checkpoint(
        round=int(raw["round"]),
        global_params=raw["global_params"],
        strategy=dict(raw["strategy"]),
        clients={int(k): dict(v) for k, v in raw["clients"].items()},
        meta=json.loads(raw["meta_json"]),
        released=raw.get("released"),
    )
