"""Public pre-training: train the denoiser centrally on PUBLIC data before federated training.

The strongest DP image generators pre-train on public data and then fine-tune under DP
(Ghalebikesabi et al. 2023; Lyu et al. 2023, DP-LDM). Here the result of ``pretrain.steps`` Adam
steps of the DDPM loss (Ho et al. 2020, eq. 14) on ``pretrain.data`` becomes the federated run's
initial global model. Nothing private is read, so nothing is charged to any client's privacy
ledger; what MUST hold instead is that the public set is not the private one:

- :func:`securefed.config.same_collection` refuses the config when ``pretrain.data`` names the
  private collection (same name, the same collection under another name, the same root);
- :func:`check_disjoint` refuses the run when any public image equals a private image (member or
  holdout) bit for bit after both are brought to the model's shape.

The public model is cached under ``<cache>/pretrain/public-<key>.pt`` (``key``: SHA-256 of the
public data's fingerprint, the model and diffusion configs, the pre-training settings and
:data:`VERSION`), written atomically and read with ``torch.load(weights_only=True)``; a corrupt
or mismatched file is retrained. Its seed is ``pretrain.seed``, not the run seed, so one public
model serves every run seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.config import DataConfig, ExperimentConfig, PublicPretrainConfig
from securefed.data import ImageDataset, load_dataset
from securefed.diffusion import NoiseSchedule, UNet, diffusion_loss
from securefed.diffusion.params import get_flat, set_flat
from securefed.errors import SecurefedError
from securefed.io import atomic_write_bytes
from securefed.seeds import Purpose, derive_seed

__all__ = [
    "VERSION",
    "PublicDataError",
    "PublicPretrainResult",
    "check_disjoint",
    "load_public",
    "pretrain_cache_key",
    "public_pretrain",
    "train_public",
]

log = logging.getLogger(__name__)

#: bump when the training procedure changes: old cache files are then simply not found
VERSION = 2  # 2: streams from seeds.Purpose.PUBLIC_PRETRAIN


class PublicDataError(SecurefedError, ValueError):
    """The public pre-training set is (partly) the private set, or does not fit the model."""


@dataclass(frozen=True)
class PublicPretrainResult:
    """The public model and how it was obtained.

    Attributes:
        params: ``[D]`` float32 weights (the EMA when ``ema_decay > 0``).
        meta: JSON-ready facts (public dataset, size, fingerprint, steps, seconds, final loss,
            cache key, ``cached``: whether it came from the cache).
    """

    params: torch.Tensor
    meta: dict[str, Any]


def load_public(pt: PublicPretrainConfig, image_shape: tuple[int, int, int]) -> ImageDataset:
    """Load the public set at the private data's ``(C, H, W)`` (unless ``pretrain.data`` sets
    ``image_size`` / ``channels`` itself, which must then match)."""
    c, h, _ = image_shape
    dcfg = pt.data.model_copy(
        update={
            "image_size": pt.data.image_size if pt.data.image_size is not None else h,
            "channels": pt.data.channels if pt.data.channels is not None else c,
        }
    )
    ds = load_dataset(DataConfig.model_validate(dcfg.model_dump()))
    if ds.image_shape != tuple(image_shape):
        raise PublicDataError(
            f"pretrain.data: public images are {ds.image_shape}, the private images "
            f"{tuple(image_shape)}; unset pretrain.data.image_size / channels (they default to "
            "the private shape) or set them to match"
        )
    return ds


def _row_hashes(x: torch.Tensor) -> set[bytes]:
    arr = x.detach().cpu().contiguous().numpy().astype("<f4")
    return {hashlib.sha256(row.tobytes()).digest() for row in arr.reshape(len(arr), -1)}


def check_disjoint(public: ImageDataset, private: list[ImageDataset]) -> None:
    """Refuse when any public image equals (bit for bit) a private member or holdout image.

    Raises:
        PublicDataError: naming how many public images are private ones, and the fix.
    """
    pub = _row_hashes(public.images)
    priv: set[bytes] = set()
    for ds in private:
        priv |= _row_hashes(ds.images)
    shared = len(pub & priv)
    if shared:
        raise PublicDataError(
            f"pretrain.data.name: {shared} of {len(public)} public images ({public.name!r}) are "
            f"identical to private images; public pre-training is uncharged only when the public "
            "set is not the private one: choose another public dataset or set "
            "pretrain.enabled: false"
        )


def pretrain_cache_key(cfg: ExperimentConfig, public_fingerprint: str) -> str:
    """SHA-256 hex of everything the public model depends on."""
    pt = cfg.pretrain
    payload = json.dumps(
        {
            "version": VERSION,
            "public": public_fingerprint,
            "model": cfg.model.model_dump(mode="json"),
            "diffusion": cfg.diffusion.model_dump(mode="json"),
            "steps": pt.steps,
            "batch_size": pt.batch_size,
            "lr": pt.lr,
            "ema_decay": pt.ema_decay,
            "seed": pt.seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def train_public(
    model: nn.Module,
    schedule: NoiseSchedule,
    public: ImageDataset,
    pt: PublicPretrainConfig,
    device: torch.device,
    conditional: bool,
) -> tuple[torch.Tensor, float]:
    """``pt.steps`` Adam steps (grad-norm clip 1) of the mean eps-MSE on uniform random batches.

    Args:
        model: the denoiser, already initialised (trained in place).
        schedule: noise schedule. public: the public set (images ``[N,C,H,W]`` in [-1, 1]).
        pt: the ``pretrain`` section. device: where to train. conditional: feed labels.

    Returns:
        ``[D]`` float32 weights (the EMA when ``pt.ema_decay > 0``) and the mean loss of the
        last ``min(50, steps)`` steps.
    """
    cpu_gen = torch.Generator().manual_seed(derive_seed(pt.seed, Purpose.PUBLIC_PRETRAIN, phase=1))
    dev_gen = torch.Generator(device=device).manual_seed(
        derive_seed(pt.seed, Purpose.PUBLIC_PRETRAIN, phase=2)
    )
    sched = schedule.to(device)
    x_all = public.images.to(device)
    y_all = public.labels.to(device)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=pt.lr, foreach=True)
    ema = get_flat(model).clone() if pt.ema_decay > 0 else None
    bs = min(pt.batch_size, len(public))
    tail: list[float] = []
    for step in range(pt.steps):
        idx = torch.randint(0, len(public), (bs,), generator=cpu_gen).to(device)
        y = y_all[idx] if conditional else None
        loss = diffusion_loss(model, sched, x_all[idx], y, generator=dev_gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        if ema is not None:
            ema.mul_(pt.ema_decay).add_(get_flat(model), alpha=1.0 - pt.ema_decay)
        if step >= pt.steps - 50:
            tail.append(float(loss.detach()))
    params = ema if ema is not None else get_flat(model)
    return params.detach().to(torch.float32).cpu(), float(np.mean(tail))


def _save_atomic(path: Path, blob: dict[str, Any]) -> None:
    """``torch.save`` through the project's one atomic writer (tmp + fsync + rename)."""
    buf = BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_cached(path: Path, key: str, numel: int) -> tuple[torch.Tensor, dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("key") != key:
        raise ValueError("not the public model for this key")
    params = blob["params"]
    if not isinstance(params, torch.Tensor) or params.shape != (numel,):
        raise ValueError(f"params must be a [{numel}] tensor")
    if params.dtype != torch.float32 or not bool(torch.isfinite(params).all()):
        raise ValueError("params must be finite float32")
    meta = json.loads(str(blob["meta"]))
    return params, meta


def public_pretrain(
    cfg: ExperimentConfig,
    model: UNet,
    schedule: NoiseSchedule,
    private: list[ImageDataset],
    device: torch.device,
    cache_dir: Path,
    *,
    shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> PublicPretrainResult:
    """Load (or train and cache) the public model for ``cfg`` and load it into ``model``.

    Args:
        cfg: the experiment (``cfg.pretrain.enabled``).
        model: the run's denoiser (its weights are replaced by the public model's).
        schedule: noise schedule.
        private: the private datasets (members and holdout), checked against the public set.
            Empty for a deployed coordinator, which holds no private data: give ``shape`` and
            ``num_classes`` instead; every site runs :func:`check_disjoint` on its own data.
        device: where to train. cache_dir: ``<cache>/pretrain``.

    Raises:
        PublicDataError: the public set overlaps the private one or does not fit the model.
    """
    pt = cfg.pretrain
    if private:
        shape, num_classes = private[0].image_shape, private[0].num_classes
    if shape is None or num_classes is None:
        raise ValueError("public_pretrain: give the private datasets, or shape and num_classes")
    public = load_public(pt, shape)
    if private:
        check_disjoint(public, private)
    if cfg.model.class_conditional and public.num_classes != num_classes:
        raise PublicDataError(
            f"pretrain.data.name: {pt.data.name!r} has {public.num_classes} classes, the private "
            f"data {num_classes}; a class-conditional model needs the same classes "
            "(or set model.class_conditional: false)"
        )
    fingerprint = public.fingerprint()
    key = pretrain_cache_key(cfg, fingerprint)
    path = Path(cache_dir) / f"public-{key}.pt"
    numel = get_flat(model).numel()
    if pt.cache and path.is_file():
        try:
            params, meta = _load_cached(path, key, numel)
        except Exception as exc:  # corrupt or foreign file: retrain and overwrite
            log.warning("public-model cache %s is unusable (%s: %s); retraining", path,
                        type(exc).__name__, exc)
        else:
            set_flat(model, params.to(device))
            log.info("public model loaded from cache %s", path)
            return PublicPretrainResult(params, {**meta, "cached": True, "cache_file": str(path)})
    t0 = time.perf_counter()
    # initialised from pretrain.seed, not the run seed: one public model serves every run seed
    init_seed = derive_seed(pt.seed, Purpose.PUBLIC_PRETRAIN, phase=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        fresh = UNet(cfg.model, shape[0], shape[1], model.num_classes)
    set_flat(model, get_flat(fresh).to(device))
    params, loss = train_public(
        model, schedule, public, pt, device, cfg.model.class_conditional
    )
    meta = {
        "dataset": pt.data.name,
        "layout": pt.data.mnist5k_layout if pt.data.name == "mnist5k" else None,
        "examples": len(public),
        "image_shape": list(public.image_shape),
        "fingerprint": fingerprint,
        "steps": pt.steps,
        "batch_size": min(pt.batch_size, len(public)),
        "lr": pt.lr,
        "ema_decay": pt.ema_decay,
        "seed": pt.seed,
        "final_loss": round(loss, 6),
        "seconds": round(time.perf_counter() - t0, 2),
        "key": key,
    }
    if pt.cache:
        _save_atomic(path, {"key": key, "params": params, "meta": json.dumps(meta)})
    set_flat(model, params.to(device))
    return PublicPretrainResult(params, {**meta, "cached": False, "cache_file": str(path)})
