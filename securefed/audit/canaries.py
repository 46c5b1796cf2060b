"""Canary records for one-run privacy auditing (Steinke, Nasr & Jagielski 2023).

``m`` canaries are drawn, each independently INCLUDED with probability 1/2 (a fair coin from
an explicit generator) and, when included, handed to one client chosen uniformly at random.
The coins and the canaries are recorded in the run directory under ``canaries/`` (0600) for
the auditor: the server never sees them, the clients only see their own inserted canaries
as ordinary training records.

Kinds:
    - ``ood``: out-of-distribution images, independent uniform {-1, +1} pixels.
    - ``inverted``: real images (from a source set that never reaches a client, e.g. a held
      part of the holdout) with their intensities inverted (``x -> -x``).
    - ``mislabelled``: real source images with a wrong label (class-conditional models).
    - ``natural``: real source images, unchanged (in-distribution canaries; the one-run
      audit then randomises the membership of ordinary examples, Steinke et al. 2023 §7).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from securefed.artefacts.rundir import RunDir
from securefed.data import ImageDataset
from securefed.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "CANARY_DIR",
    "CANARY_KINDS",
    "CanarySet",
    "draw_canaries",
    "insert_canaries",
    "load_canaries",
    "make_canary_images",
    "save_canaries",
]

CANARY_DIR = RunDir(".").canaries.name
CanaryKind = Literal["ood", "inverted", "mislabelled", "natural"]
CANARY_KINDS: tuple[str, ...] = ("ood", "inverted", "mislabelled", "natural")


@dataclass(frozen=True)
class CanarySet:
    """The canaries of one run.

    Attributes:
        images: ``[m, C, H, W]`` float32 in [-1, 1].
        labels: ``[m]`` int64.
        included: ``[m]`` bool, the fair coins (True = inserted into a client's data).
        clients: ``[m]`` int64, the receiving client (-1 when not included).
        kind: the canary kind.
        seed: the seed the canaries and coins were drawn from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    included: np.ndarray
    clients: np.ndarray
    kind: str
    seed: int

    def __len__(self) -> int:
        return int(self.images.shape[0])


def make_canary_images(
    kind: str,
    m: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    rng: np.random.Generator,
    source: ImageDataset | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` canary images ``[m, C, H, W]`` and labels ``[m]`` of the given kind.

    Args:
        kind: ``ood``, ``inverted``, ``mislabelled`` or ``natural``.
        source: real images the canaries are made from (all kinds but ``ood``); must
            not be training data, and must hold at least ``m`` examples.
    """
    if kind not in CANARY_KINDS:
        raise ValueError(f"canaries.kind: unknown kind {kind!r}; choose one of {CANARY_KINDS}")
    if m < 2:
        raise ValueError(f"canaries.m: need at least 2 canaries, got {m}")
    if kind == "ood":
        x = rng.integers(0, 2, size=(m, *image_shape)).astype(np.float32) * 2 - 1
        y = rng.integers(0, num_classes, size=m)
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    if source is None or len(source) < m:
        have = 0 if source is None else len(source)
        raise ValueError(
            f"canaries.kind: {kind!r} canaries are made from {m} source images that never reach "
            f"a client; got {have} (use more holdout examples or kind 'ood')"
        )
    idx = rng.choice(len(source), size=m, replace=False)
    imgs = source.images[torch.as_tensor(idx)].clone()
    labels = source.labels[torch.as_tensor(idx)].clone()
    if kind == "inverted":
        imgs = -imgs
    elif kind == "mislabelled":
        if num_classes < 2:
            raise ValueError("canaries.kind: 'mislabelled' needs at least 2 classes")
        shift = torch.from_numpy(rng.integers(1, num_classes, size=m).astype(np.int64))
        labels = (labels + shift) % num_classes
    return imgs.contiguous(), labels.contiguous()


def draw_canaries(
    kind: str,
    m: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    num_clients: int,
    seed: int,
    source: ImageDataset | None = None,
) -> CanarySet:
    """Draw ``m`` canaries, their fair inclusion coins and receiving clients from ``seed``."""
    if num_clients < 1:
        raise ValueError(f"canaries: need at least one client, got {num_clients}")
    rng = np.random.default_rng(seed)
    images, labels = make_canary_images(kind, m, image_shape, num_classes, rng, source)
    included = rng.random(m) < 0.5
    clients = np.where(included, rng.integers(0, num_clients, size=m), -1).astype(np.int64)
    return CanarySet(images, labels, included, clients, kind, int(seed))


def insert_canaries(parts: list[ImageDataset], canaries: CanarySet) -> list[ImageDataset]:
    """Each client's dataset with its included canaries appended (order: records, canaries)."""
    out = []
    for cid, ds in enumerate(parts):
        sel = np.flatnonzero(canaries.clients == cid)
        if sel.size == 0:
            out.append(ds)
            continue
        if tuple(canaries.images.shape[1:]) != ds.image_shape:
            raise ValueError(
                f"insert_canaries: canaries are {tuple(canaries.images.shape[1:])}, client {cid}'s "
                f"images are {ds.image_shape}"
            )
        idx = torch.as_tensor(sel)
        out.append(
            ImageDataset(
                images=torch.cat([ds.images, canaries.images[idx]]),
                labels=torch.cat([ds.labels, canaries.labels[idx]]),
                num_classes=ds.num_classes,
                name=ds.name,
                class_names=ds.class_names,
            )
        )
    if int((canaries.clients >= len(parts)).sum()):
        raise ValueError(
            f"insert_canaries: canaries assigned to clients >= {len(parts)} (only {len(parts)} "
            "client datasets given)"
        )
    return out


def save_canaries(run_dir: str | Path, canaries: CanarySet) -> Path:
    """Write ``canaries/canaries.npz`` and ``canaries/canaries.json`` (both 0600)."""
    d = Path(run_dir) / CANARY_DIR
    buf = io.BytesIO()
    np.savez(
        buf,
        images=canaries.images.numpy(),
        labels=canaries.labels.numpy(),
        included=canaries.included,
        clients=canaries.clients,
    )
    atomic_write_bytes(d / "canaries.npz", buf.getvalue(), mode=0o600)
    atomic_write_json(
        d / "canaries.json",
        {
            "kind": canaries.kind,
            "m": len(canaries),
            "included": int(canaries.included.sum()),
            "seed": canaries.seed,
            "note": "audit-only: never shown to the server; inclusion coins are fair (p = 1/2)",
        },
        mode=0o600,
    )
    return d


def load_canaries(run_dir: str | Path) -> CanarySet | None:
    """The run's canaries, or None when it has none."""
    d = Path(run_dir) / CANARY_DIR
    if not (d / "canaries.npz").exists():
        return None
    meta = json.loads((d / "canaries.json").read_text())
    with np.load(d / "canaries.npz", allow_pickle=False) as z:
        images = torch.from_numpy(z["images"].astype(np.float32))
        labels = torch.from_numpy(z["labels"].astype(np.int64))
        included = z["included"].astype(bool)
        clients = z["clients"].astype(np.int64)
    if not (images.shape[0] == labels.shape[0] == included.shape[0] == clients.shape[0]):
        raise ValueError(f"{d / 'canaries.npz'}: arrays of different lengths (corrupt file)")
    return CanarySet(images, labels, included, clients, str(meta["kind"]), int(meta["seed"]))
