"""What an audit attacks, reconstructed from a run directory.

- members: the clients' training records, rebuilt exactly with ``prepare_data(cfg)`` (the
  split and the partition are deterministic); non-members: the holdout (never reaches a client);
- the released global model (the EMA when the strategy keeps one, as ``securefed sample`` uses);
- individual models the server received, if the run stored any under ``received/`` (one
  ``*.pt`` per model: a ``[D]`` tensor or a mapping with ``params``; members of ``client_<i>``
  are client i's records);
- per-client composed models (FedDiffuse ``udec``/``ulatdec``: the global shared groups with a
  client's local groups from the checkpoint; members = that client's records);
- canaries (``canaries/``), the ledger's epsilon, and synthetic images from ``auxiliary/``
  (any ``.npz``/``.pt`` holding an ``[N, C, H, W]`` image array).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.artefacts.checkpoint import load_latest
from securefed.artefacts.rundir import RunDir, released_params
from securefed.audit.canaries import CanarySet, load_canaries
from securefed.builders import build_model, prepare_data
from securefed.client.dp import DPLocalTrainer
from securefed.client.trainer import LocalTrainer, local_steps_for
from securefed.config import ExperimentConfig, load_config
from securefed.data import ImageDataset
from securefed.diffusion import NoiseSchedule
from securefed.diffusion.params import get_flat, param_slices, set_flat
from securefed.privacy import InsecureNoiseWarning, PrivacyLedger, TorchGaussian
from securefed.privacy.canaries import load_client_scores, load_gradient_scores
from securefed.seeds import Purpose, derive_seed
from securefed.strategies.base import LocalObjective
from securefed.strategies.feddiffuse import group_indices, shared_groups

__all__ = [
    "AuditRun",
    "Ledger",
    "find_synthetic",
    "load_audit_run",
    "make_shadow_trainer",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ledger:
    """The accountant's promise for the run: the WORST client's (epsilon, delta); a record of
    any client is protected at least that well. ``epsilon`` is inf without DP."""

    epsilon: float
    delta: float
    level: str
    per_client: dict[int, float] = field(default_factory=dict)


@dataclass
class AuditRun:
    """A run directory opened for auditing (see module docstring)."""

    run_dir: Path
    cfg: ExperimentConfig
    members: ImageDataset
    holdout: ImageDataset
    parts: list[np.ndarray]
    schedule: NoiseSchedule
    device: torch.device
    released: torch.Tensor
    round: int
    received: dict[str, torch.Tensor]
    client_models: dict[int, torch.Tensor]
    canaries: CanarySet | None
    ledger: Ledger
    #: white-box canary scores by source name: ``(scores [m], included [m] bool)``
    canary_scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: diagnostic: the gradient canaries scored on the released model alone,
    #: ``-s_i (theta_T - theta_0)[j_i]`` (``(scores, included)`` or None)
    released_canary_scores: tuple[np.ndarray, np.ndarray] | None = None
    #: client-level canary clients by source name (a key of :attr:`canary_scores`): each
    #: canary's participation history (the charged multipliers of its rounds), from which the
    #: audit recomputes the accountant's epsilon for the canaries themselves
    canary_histories: dict[str, list[list[float]]] = field(default_factory=dict)
    #: diagnostic (Andrew et al. 2024): cosines of the final model delta with each canary
    #: client's direction, ``(cosines [m], included [m])`` by source name
    canary_cosines: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return bool(self.cfg.model.class_conditional)

    def model(self, params: torch.Tensor) -> nn.Module:
        """A fresh UNet of the run's architecture holding ``params`` ``[D]`` (eval mode)."""
        m = build_model(self.cfg, self.members.image_shape, self.members.num_classes)
        m = m.to(self.device)
        if params.numel() != sum(p.numel() for p in m.parameters()):
            raise ValueError(
                f"{self.run_dir}: a model vector has {params.numel()} values, the run's "
                f"architecture {sum(p.numel() for p in m.parameters())}"
            )
        set_flat(m, params.to(self.device))
        return m.eval()

    def client_records(self, cid: int) -> ImageDataset:
        return self.members.subset(self.parts[cid])


def _ledger(run_dir: Path, cfg: ExperimentConfig) -> Ledger:
    path = RunDir(run_dir).ledger
    if cfg.dp.level == "none" or not path.exists():
        return Ledger(float("inf"), 0.0, cfg.dp.level)

    led = PrivacyLedger.load(path)
    per = {c: float(led.epsilon(c)) for c in led.clients}
    if not per:
        return Ledger(float("inf"), 0.0, cfg.dp.level)
    delta = max(float(led.get_plan(c).delta) for c in led.clients)
    return Ledger(max(per.values()), delta, cfg.dp.level, per)


def _load_vector(path: Path) -> torch.Tensor | None:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # tolerant: a foreign file is skipped, not fatal
        log.warning("%s: not a loadable model vector (%s); skipped", path, exc)
        return None
    if isinstance(raw, dict):
        raw = raw.get("params", raw.get("global_params"))
    if isinstance(raw, torch.Tensor) and raw.dim() == 1:
        return raw.to(torch.float32)
    log.warning("%s: holds no [D] parameter vector; skipped", path)
    return None


def load_audit_run(run_dir: str | Path, device: torch.device | None = None) -> AuditRun:
    """Open a run directory for auditing.

    Raises:
        FileNotFoundError: not a run directory, or it has no checkpoint.
    """
    run_dir = Path(run_dir)
    RunDir(run_dir).require_run()
    if not (RunDir(run_dir).checkpoints / "latest.json").exists():
        raise FileNotFoundError(
            f"{run_dir}/checkpoints/latest.json is missing: the run has no model to audit yet"
        )
    cfg = load_config(RunDir(run_dir).config)
    dev = device or torch.device("cpu")
    data = prepare_data(cfg)
    ckpt = load_latest(RunDir(run_dir).checkpoints)
    released = released_params(ckpt)
    received: dict[str, torch.Tensor] = {}
    rdir = RunDir(run_dir).received
    if rdir.is_dir():
        for p in sorted(rdir.glob("*.pt")):
            v = _load_vector(p)
            if v is not None:
                received[p.stem] = v
    client_models: dict[int, torch.Tensor] = {}
    fd = getattr(cfg, "feddiffuse", None)
    if fd is not None and getattr(fd, "enabled", False):
        model = build_model(cfg, data.members.image_shape, data.members.num_classes)
        groups = group_indices(param_slices(model), model.parameter_groups())
        shared = set(shared_groups(fd.variant))
        local = [groups[g] for g in groups if g not in shared]
        if local:
            local_idx = torch.sort(torch.cat(local)).values
            for cid, state in ckpt.clients.items():
                vec = state.get("feddiffuse.local")
                if vec is not None and vec.numel() == local_idx.numel():
                    composed = released.clone()
                    composed[local_idx] = vec.to(composed.dtype)
                    client_models[int(cid)] = composed
    canary_scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    got = load_gradient_scores(RunDir(run_dir).canaries, int(ckpt.round))
    if got is not None:
        gc, scores, rounds = got
        if rounds:
            canary_scores[
                f"{len(gc)} white-box gradient canaries ({int(gc.included.sum())} inserted): "
                f"privatized gradient sums of their clients' DP-SGD steps, rounds "
                f"{min(rounds)}-{max(rounds)}"
            ] = (scores, gc.included.copy())
        else:
            log.warning("%s/canaries: gradient canaries but no round scores", run_dir)
    canary_histories: dict[str, list[list[float]]] = {}
    canary_cosines: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    cc = load_client_scores(RunDir(run_dir).canaries, int(ckpt.round))
    if cc is not None and cc.rounds:
        name = (
            f"{len(cc.canaries)} white-box canary clients ({int(cc.canaries.included.sum())} "
            f"inserted): privatized per-round sums along their directions (log-likelihood-"
            f"ratio statistic), rounds {min(cc.rounds)}-{max(cc.rounds)}"
        )
        canary_scores[name] = (cc.statistic, cc.canaries.included.copy())
        canary_histories[name] = cc.histories
        init = build_model(cfg, data.members.image_shape, data.members.num_classes)
        theta0 = torch.cat([p.detach().reshape(-1).float() for p in init.parameters()])
        if theta0.numel() == released.numel():
            delta_t = (released - theta0).double().numpy()
            norm = float(np.linalg.norm(delta_t))
            cos = cc.canaries.signs * delta_t[cc.canaries.flat] / max(norm, 1e-300)
            canary_cosines[name] = (cos, cc.canaries.included.copy())
    elif cc is not None:
        log.warning("%s/canaries: canary clients but no round scores", run_dir)
    released_scores = None
    if got is not None:
        init = build_model(cfg, data.members.image_shape, data.members.num_classes)
        params = [p for p in init.parameters() if p.requires_grad]
        if sum(p.numel() for p in params) == released.numel():
            starts = np.cumsum([0] + [p.numel() for p in params])[:-1]
            flat = starts[got[0].param_index] + got[0].offset
            theta0 = torch.cat([p.detach().reshape(-1) for p in params])
            delta = (released - theta0).double().numpy()[flat]
            released_scores = (-got[0].signs * delta, got[0].included.copy())
    return AuditRun(
        run_dir=run_dir,
        cfg=cfg,
        members=data.members,
        holdout=data.holdout,
        parts=list(data.parts),
        schedule=NoiseSchedule.from_config(cfg.diffusion),
        device=dev,
        released=released,
        round=int(ckpt.round),
        received=received,
        client_models=client_models,
        canaries=load_canaries(run_dir),
        ledger=_ledger(run_dir, cfg),
        canary_scores=canary_scores,
        released_canary_scores=released_scores,
        canary_histories=canary_histories,
        canary_cosines=canary_cosines,
    )


def _to_unit_range(x: np.ndarray, was_uint8: bool) -> np.ndarray:
    """The project's convention is float images in [-1, 1]; 8-bit images are rescaled."""
    if was_uint8 or float(np.max(x)) > 1.5:
        return x / 127.5 - 1.0
    return np.clip(x, -1.0, 1.0)


def find_synthetic(
    run_dir: Path, image_shape: tuple[int, int, int]
) -> tuple[torch.Tensor, str] | None:
    """Synthetic images stored under ``auxiliary/`` (``.npz``: key ``images`` or the first image
    array; ``.pt``: a tensor or a mapping with ``images``), as ``[N, C, H, W]`` in [-1, 1];
    None when there are none."""
    d = RunDir(run_dir).auxiliary
    if not d.is_dir():
        return None
    for p in sorted(d.iterdir()):
        arr: Any = None
        was_uint8 = False
        try:
            if p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    keys = ["images", *[k for k in z.files if k != "images"]]
                    for k in keys:
                        if k in z.files and z[k].ndim in (3, 4) and z[k].dtype.kind == "f":
                            arr = z[k]
                            break
                        if k in z.files and z[k].ndim in (3, 4) and z[k].dtype == np.uint8:
                            arr, was_uint8 = z[k].astype(np.float32), True
                            break
            elif p.suffix == ".pt":
                raw = torch.load(p, map_location="cpu", weights_only=True)
                if isinstance(raw, dict):
                    raw = raw.get("images")
                if isinstance(raw, torch.Tensor):
                    arr = raw.numpy()
        except Exception as exc:  # tolerant: skip what cannot be read
            log.warning("%s: unreadable (%s); skipped", p, exc)
            continue
        if arr is None:
            continue
        x = np.asarray(arr, dtype=np.float32)
        if x.ndim == 3:
            x = x[:, None]
        c, h, w = image_shape
        if x.shape[1:] != (c, h, w) and x.shape[-1] == c and x.shape[1:3] == (h, w):
            x = np.transpose(x, (0, 3, 1, 2))
        if x.shape[1:] != (c, h, w) or x.shape[0] == 0:
            log.warning("%s: images %s do not match the run's %s; skipped", p, x.shape, image_shape)
            continue
        return torch.from_numpy(
            np.ascontiguousarray(_to_unit_range(x, was_uint8))
        ), f"auxiliary/{p.name}"
    return None


def make_shadow_trainer(run: AuditRun, steps: int | None = None, progress: bool = False) -> Any:
    """The run's own trainer as a LiRA shadow trainer ``(data, seed) -> model``.

    A shadow is one client holding the shadow data and training for ``rounds x local steps``
    (the federation's total local steps per client; ``steps`` overrides) from the run's
    initial model: plain :class:`~securefed.client.trainer.LocalTrainer`, or
    :class:`~securefed.client.dp.DPLocalTrainer` at the ledger's noise multiplier for
    record-level DP runs (attacker-side noise from a seeded torch generator).
    """
    cfg = run.cfg
    sigma = None
    if cfg.dp.level == "record" and RunDir(run.run_dir).ledger.exists():
        led = PrivacyLedger.load(RunDir(run.run_dir).ledger)
        if led.clients:
            sigma = float(led.get_plan(led.clients[0]).noise_multiplier)

    def train(data: ImageDataset, seed: int) -> nn.Module:
        model = build_model(cfg, data.image_shape, data.num_classes).to(run.device)
        n_steps = steps or cfg.federation.rounds * local_steps_for(cfg.client, len(data))
        ccfg = cfg.client.model_copy(update={"local_steps": n_steps, "local_epochs": None})
        start = get_flat(model)
        if sigma is not None:
            trainer: LocalTrainer = DPLocalTrainer(
                model, run.schedule, ccfg, cfg.dp, run.device, run.conditional
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InsecureNoiseWarning)
                res = trainer.train_private(  # type: ignore[attr-defined]
                    data,
                    start,
                    LocalObjective(),
                    seed,
                    noise_multiplier=sigma,
                    noise_source=TorchGaussian(seed=derive_seed(seed, Purpose.AUDIT_NOISE)),
                )
        else:
            trainer = LocalTrainer(model, run.schedule, ccfg, run.device, run.conditional)
            res = trainer.train(data, start, LocalObjective(), seed=seed)
        return run.model(res.params)

    return train


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None
