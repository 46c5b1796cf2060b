"""FedDDPM phase 0: local pre-training, uploads and the server's auxiliary dataset.

Before the federated rounds every client trains a local DDPM from the common initial model for
``fedddpm.pretrain_epochs`` (DP-SGD under ``dp.level: record``: charged to the client's ledger as
phase ``pretrain``, round 0, and persisted BEFORE anything leaves the client). Client i then
contributes ``n_i`` images, ``n_i`` proportional to its size (Hamilton apportionment of
``aux_total``; client sizes are treated as public, as the server needs them to weight FedAvg):

- ``upload: samples``: the client samples ``n_i`` images from its local model and uploads only
  the images (and labels);
- ``upload: model``: the client uploads its local model and the server samples from it.

Both produce the same images here (same generator), they differ in what the server holds and in
traffic (logged). For class-conditional models the per-class counts follow the client's label
histogram (released with the Gaussian mechanism under DP, noise multiplier
``histogram_noise_multiplier``, L2 sensitivity 1, charged as phase ``histogram``) or are uniform.

The server stores the set for audits::

    auxiliary/auxiliary.npz   images [N,C,H,W] float32 in [-1,1], labels [N] int64, client [N] int64
    auxiliary/grid.png        a sample grid (up to 8 images per client)
    auxiliary/meta.json       per-client n_i, pretrain steps/loss/seconds, upload bytes, epsilon,
                              the npz's SHA-256 (verified when a resumed run reloads the set)
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from securefed.artefacts.grid import save_grid
from securefed.artefacts.rundir import RunDir
from securefed.client import LocalTrainer, local_steps_for
from securefed.client.dp import DPLocalTrainer, update_digest
from securefed.config import ExperimentConfig
from securefed.diffusion import NoiseSchedule, sample
from securefed.diffusion.params import num_params
from securefed.io import atomic_write_bytes, atomic_write_json, sha256_file
from securefed.privacy import calibrate_noise_multiplier
from securefed.privacy.accountant import epsilon_of
from securefed.seeds import Purpose
from securefed.strategies import LocalObjective
from securefed.strategies.fedddpm import allocate_proportional

__all__ = [
    "AUX_DIR",
    "AuxiliarySet",
    "build_auxiliary_set",
    "calibrate_with_extra",
    "class_counts_for",
    "load_auxiliary",
    "pretrain_steps_for",
    "save_auxiliary",
]

log = logging.getLogger(__name__)

AUX_DIR = RunDir(".").auxiliary.name



@dataclass(frozen=True)
class AuxiliarySet:
    """The server's auxiliary dataset.

    Attributes:
        images: ``[N,C,H,W]`` float32 in [-1, 1].
        labels: ``[N]`` int64 (the conditioning labels; 0 for unconditional models).
        client: ``[N]`` int64 id of the client whose model produced each image.
    """

    images: torch.Tensor
    labels: torch.Tensor
    client: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


def pretrain_steps_for(cfg: ExperimentConfig, num_examples: int) -> int:
    """Phase-0 optimizer steps of a client with ``num_examples``: ``ceil(E_pre n / B)``."""
    pre = cfg.client.model_copy(
        update={"local_steps": None, "local_epochs": cfg.fedddpm.pretrain_epochs}
    )
    return local_steps_for(pre, num_examples)


def class_counts_for(
    histogram: np.ndarray, n: int, mode: str, noise: np.ndarray | None = None
) -> np.ndarray:
    """Per-class sample counts ``[C]`` summing to ``n``.

    Args:
        histogram: ``[C]`` the client's label counts.
        n: images to produce.
        mode: ``histogram`` (proportional to the histogram, plus ``noise`` if given, clipped at
            0) or ``uniform``.
        noise: ``[C]`` Gaussian noise already drawn for the DP release of the histogram.
    """
    c = histogram.shape[0]
    if mode == "uniform":
        return allocate_proportional(np.ones(c), n)
    h = histogram.astype(np.float64) + (0.0 if noise is None else noise)
    h = np.clip(h, 0.0, None)
    if h.sum() <= 0:  # noise wiped every count out: fall back to uniform (post-processing)
        h = np.ones(c)
    return allocate_proportional(h, n)


def calibrate_with_extra(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    extra: list[tuple[float, float, int]],
    accountant: str,
) -> float:
    """Smallest noise multiplier (to 0.1%) whose DP-SGD schedule ``(sigma, q, steps)`` composed
    with the fixed ``extra`` mechanisms spends at most ``target_epsilon`` (bisection on the
    ledger's own accountant, so planning and charging agree)."""
    def eps(s: float) -> float:
        return epsilon_of([*extra, (s, sample_rate, steps)], delta, accountant)

    if eps(1e6) > target_epsilon:
        raise ValueError(
            f"dp.target_epsilon: {target_epsilon} is already spent by the histogram release "
            f"(fedddpm.histogram_noise_multiplier); raise histogram_noise_multiplier, set "
            "fedddpm.class_counts: uniform, or raise the target"
        )
    lo = calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    hi = lo
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return float(hi)


def save_auxiliary(run_dir: Path, aux: AuxiliarySet, meta: dict[str, Any]) -> Path:
    """Write ``auxiliary/auxiliary.npz`` + ``grid.png`` + ``meta.json`` atomically."""
    d = run_dir / AUX_DIR
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(
        buf,
        images=aux.images.numpy().astype(np.float32),
        labels=aux.labels.numpy().astype(np.int64),
        client=aux.client.numpy().astype(np.int64),
    )
    path = d / "auxiliary.npz"
    atomic_write_bytes(path, buf.getvalue())
    picks = torch.cat(
        [torch.nonzero(aux.client == c).reshape(-1)[:8] for c in torch.unique(aux.client)]
    )[:64]
    if picks.numel():
        save_grid(aux.images[picks], d / "grid.png", nrow=8)
    atomic_write_json(d / "meta.json", {**meta, "npz_sha256": sha256_file(path)})
    return path


def load_auxiliary(run_dir: Path) -> tuple[AuxiliarySet, dict[str, Any]]:
    """Reload a run's auxiliary set after verifying its SHA-256 against ``meta.json``."""
    d = run_dir / AUX_DIR
    path, meta_path = d / "auxiliary.npz", d / "meta.json"
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(
            f"{d}: the FedDDPM auxiliary set is missing (auxiliary.npz + meta.json); the run "
            "cannot be resumed without it: start a new run"
        )
    meta = json.loads(meta_path.read_text())
    if sha256_file(path) != meta.get("npz_sha256"):
        raise ValueError(f"{path}: checksum mismatch with meta.json; the file was modified")
    with np.load(path) as z:
        aux = AuxiliarySet(
            torch.from_numpy(z["images"].astype(np.float32)),
            torch.from_numpy(z["labels"].astype(np.int64)),
            torch.from_numpy(z["client"].astype(np.int64)),
        )
    return aux, meta


def build_auxiliary_set(
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    clients: list[Any],
    init_params: torch.Tensor,
    num_classes: int,
    histograms: np.ndarray,
    device: torch.device,
    privacy: Any | None,
    *,
    trainer: LocalTrainer,
    derive: Any,
    progress: bool = False,
    uploads: dict[int, torch.Tensor] | None = None,
    alloc: Sequence[int] | None = None,
) -> tuple[AuxiliarySet, dict[str, Any]]:
    """Phase 0 (see module docstring). Returns the auxiliary set and its metadata.

    Args:
        clients: the :class:`~securefed.federation.simulation.SimClient` list (own data only).
        init_params: ``[D]`` common initial model every client starts from.
        histograms: ``[K, C]`` per-client label counts (each client knows only its own row).
        privacy: the run's ``PrivacyContext`` (record level) or None.
        trainer: the run's (DP) local trainer; its step schedule is switched to
            ``pretrain_epochs`` for the phase (so the DP engine wraps the model only once).
        derive: ``derive_seed``.
        uploads: filled with client id -> uploaded local model ``[D]`` when ``upload: model``
            (what the server receives individually; the run keeps it under ``received/`` for
            audits).
        alloc: the images each of ``clients`` produces (default: ``aux_total`` split in
            proportion to their sizes; a deployed site gets its share from the coordinator,
            which knows every site's size).
    """
    fd = cfg.fedddpm
    if alloc is None:
        alloc_arr = allocate_proportional([len(c.data) for c in clients], fd.aux_total)
    else:
        alloc_arr = np.asarray(alloc, dtype=np.int64)
    pre_cfg = cfg.client.model_copy(
        update={"local_steps": None, "local_epochs": fd.pretrain_epochs}
    )
    saved_cfg = trainer.cfg
    trainer.cfg = pre_cfg
    try:
        return _phase0(
            cfg, model, schedule, clients, init_params, num_classes, histograms, device,
            privacy, trainer, alloc_arr, derive, uploads,
        )
    finally:
        trainer.cfg = saved_cfg


def _phase0(
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    clients: list[Any],
    init_params: torch.Tensor,
    num_classes: int,
    histograms: np.ndarray,
    device: torch.device,
    privacy: Any | None,
    trainer: LocalTrainer,
    alloc: np.ndarray,
    derive: Any,
    uploads: dict[int, torch.Tensor] | None = None,
) -> tuple[AuxiliarySet, dict[str, Any]]:
    fd = cfg.fedddpm
    conditional = cfg.model.class_conditional
    sched = schedule.to(device)
    ch, hh, ww = (int(v) for v in clients[0].data.images.shape[1:])
    shape = (ch, hh, ww)
    imgs, labs, owners = [], [], []
    per_client: dict[str, Any] = {}
    d = num_params(model)
    for c, n_i in zip(clients, alloc, strict=True):
        n_i = int(n_i)
        rec: dict[str, Any] = {"examples": len(c.data), "aux_images": n_i}
        if n_i == 0:
            per_client[str(c.cid)] = {**rec, "pretrain_steps": 0, "note": "no allocation"}
            continue
        t0 = time.perf_counter()
        seed = derive(cfg.seed, Purpose.PRETRAIN, 0, c.cid)
        steps = pretrain_steps_for(cfg, len(c.data))
        if privacy is not None:
            ledger = privacy.ledger
            if ledger.would_exceed(c.cid, steps):
                raise ValueError(
                    f"fedddpm.pretrain_epochs: client {c.cid}'s {steps} pre-training steps would "
                    f"exceed dp.target_epsilon {cfg.dp.target_epsilon}; lower pretrain_epochs or "
                    "let the noise multiplier be calibrated (unset dp.noise_multiplier)"
                )

            if not isinstance(trainer, DPLocalTrainer):  # pragma: no cover - wiring error
                raise TypeError("phase 0 under DP needs a DP trainer")
            res = trainer.train_private(
                c.data, init_params, LocalObjective(), seed,
                noise_multiplier=privacy.noise_multipliers[c.cid],
                noise_source=privacy.noise_source(0, c.cid),
            )
            # charged and persisted BEFORE the model (or anything sampled from it) leaves
            ledger.charge(
                c.cid, phase="pretrain", round=0, steps=res.steps, update_sha256=update_digest(res)
            )
        else:
            res = trainer.train(c.data, init_params, LocalObjective(), seed=seed)
        rec.update(pretrain_steps=res.steps, pretrain_loss=round(res.mean_loss, 6))
        if fd.upload == "model" and uploads is not None:
            uploads[c.cid] = res.params.detach().to("cpu", torch.float32).clone()
        y = None
        if conditional:
            noise = None
            if fd.class_counts == "histogram" and privacy is not None:
                z = fd.histogram_noise_multiplier
                src = privacy.phase_noise_source(0, c.cid, 1)
                noise = src.normal((num_classes,), z, "cpu", torch.float64).numpy()
                privacy.ledger.charge(
                    c.cid, phase="histogram", round=0, steps=1, noise_multiplier=z,
                    sample_rate=1.0,
                )
            counts = class_counts_for(histograms[c.cid], n_i, fd.class_counts, noise)
            rec["class_counts"] = counts.tolist()
            y = torch.repeat_interleave(torch.arange(num_classes), torch.as_tensor(counts))
        gen = torch.Generator(device=device).manual_seed(
            derive(cfg.seed, Purpose.AUX_SAMPLE, 0, c.cid)
        )
        x = sample(
            model, sched, n_i, shape, sampler=fd.aux_sampler, steps=fd.aux_sampling_steps,
            y=None if y is None else y.to(device), generator=gen, device=device,
        ).cpu()
        x = x.clamp(-1, 1).to(torch.float32)
        imgs.append(x)
        labs.append(y if y is not None else torch.zeros(n_i, dtype=torch.int64))
        owners.append(torch.full((n_i,), c.cid, dtype=torch.int64))
        elems = int(math.prod(shape))
        rec["upload_bytes"] = (
            4 * d if fd.upload == "model" else n_i * (4 * elems + (8 if conditional else 0))
        )
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        if privacy is not None:
            rec["epsilon_after_phase0"] = round(float(privacy.ledger.epsilon(c.cid)), 6)
        per_client[str(c.cid)] = rec
        log.info("phase 0: client %d pre-trained %d steps, %d aux images", c.cid, res.steps, n_i)
    aux = AuxiliarySet(torch.cat(imgs), torch.cat(labs), torch.cat(owners))
    meta = {
        "upload": fd.upload,
        "aux_total": fd.aux_total,
        "class_counts": fd.class_counts if conditional else "unconditional",
        "dp": privacy is not None,
        "sampler": fd.aux_sampler,
        "sampling_steps": fd.aux_sampling_steps,
        "upload_bytes_total": int(sum(r.get("upload_bytes", 0) for r in per_client.values())),
        "clients": per_client,
    }
    return aux, meta
