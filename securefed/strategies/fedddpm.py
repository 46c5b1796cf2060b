"""FedDDPM (Peng et al. 2025; abstract only): server calibration on a DP auxiliary dataset.

A WRAPPER around any base strategy (FedAvg, FedProx, SCAFFOLD), in the style of Flower's DP
wrappers: planning, client-side hooks and the aggregation of the SUM are the base strategy's;
after every aggregation the server takes ``calibration_steps`` optimizer steps of the DDPM loss
(Ho et al. 2020, eq. 14) on the auxiliary set the clients' pre-trained local models produced in
phase 0 (``securefed.federation.auxiliary``). With ``calibration_steps: 0`` the wrapper returns
the base strategy's aggregate unchanged.

The auxiliary set is DP when the local models were trained with DP-SGD (post-processing), so the
server's calibration costs no privacy. Its individual uploads (a model or its samples per client)
ARE visible to the server: that is the threat docs/guide.md states.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.config import FedDDPMConfig
from securefed.diffusion import NoiseSchedule, diffusion_loss
from securefed.diffusion.params import get_flat, set_flat
from securefed.strategies.base import (
    CohortSum,
    Strategy,
    StrategyWrapper,
)

__all__ = [
    "CalibrationResult",
    "FedDDPM",
    "ServerCalibrator",
    "allocate_proportional",
    "split_holdout",
]

log = logging.getLogger(__name__)


def allocate_proportional(weights: Sequence[float] | np.ndarray, total: int) -> np.ndarray:
    """Integer counts ``n_i`` proportional to ``weights`` that sum exactly to ``total``.

    Hamilton's largest-remainder method (Balinski & Young, "Fair Representation", 1982): floor
    of the quotas, then one extra unit to the largest remainders (ties to the lower index).

    Args:
        weights: ``[K]`` non-negative floats, not all zero (client sizes, class counts).
        total: the number to distribute, >= 0.

    Returns:
        ``[K]`` int64 counts, ``sum == total``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights: must be a non-empty 1-D sequence, got shape {w.shape}")
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights: must be finite, >= 0 and not all zero, got {w.tolist()}")
    if total < 0:
        raise ValueError(f"total: must be >= 0, got {total}")
    quota = w / w.sum() * total
    base = np.floor(quota).astype(np.int64)
    rest = int(total - base.sum())
    order = np.lexsort((np.arange(w.size), -(quota - base)))  # largest remainder, lower index
    base[order[:rest]] += 1
    return base


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (train, holdout) index arrays (holdout >= 1 if n >= 2)."""
    if n < 1:
        raise ValueError("the auxiliary set is empty; raise fedddpm.aux_total")
    perm = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
    return np.sort(perm[k:]), np.sort(perm[:k])


@dataclass(frozen=True)
class CalibrationResult:
    """One server calibration: new ``[D]`` params, steps taken, mean loss, wall seconds."""

    params: torch.Tensor
    steps: int
    mean_loss: float
    seconds: float


class ServerCalibrator:
    """Server-side DDPM-loss optimisation on the auxiliary set (its own optimizer and lr).

    With ``server_optimizer_state: persistent`` (default) ONE optimizer serves every calibration,
    so Adam's moment estimates carry across rounds; its state is part of the strategy's
    checkpoint (:meth:`optimizer_state` / :meth:`load_optimizer_state`), so resume is exact.
    With ``fresh`` a new optimizer is built per calibration (the earlier behaviour, kept for the
    ablation): Adam's bias-corrected first steps then move every coordinate by about ``lr``
    whatever its gradient.

    Args:
        model: the denoiser instance (parameters are overwritten from the given vector).
        schedule: noise schedule.
        images: ``[N,C,H,W]`` float32 auxiliary images in [-1, 1].
        labels: ``[N]`` int64 labels (used when ``conditional``).
        train_idx / holdout_idx: disjoint index arrays into the auxiliary set.
        cfg: the ``fedddpm`` section (optimizer, lr, batch size).
        device: where the server computes. seed: the run seed. conditional: class-conditional.
        seed_purpose_calibrate / seed_purpose_eval: derive_seed purposes of the batch/noise
            stream and of the fixed evaluation noise.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        images: torch.Tensor,
        labels: torch.Tensor,
        train_idx: np.ndarray,
        holdout_idx: np.ndarray,
        cfg: FedDDPMConfig,
        device: torch.device,
        seed: int,
        conditional: bool,
        *,
        derive: Any,
        purpose_calibrate: int,
        purpose_eval: int,
    ) -> None:
        self.model = model
        self.schedule = schedule.to(device)
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.train_idx = torch.as_tensor(train_idx, dtype=torch.long)
        self.holdout_idx = torch.as_tensor(holdout_idx, dtype=torch.long)
        self.cfg = cfg
        self.device = device
        self.seed = seed
        self.conditional = conditional
        self._derive = derive
        self._p_cal, self._p_eval = purpose_calibrate, purpose_eval
        self._opt: torch.optim.Optimizer | None = None

    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = list(self.model.parameters())
        if self.cfg.server_optimizer == "adam":
            return torch.optim.Adam(params, lr=self.cfg.server_lr, foreach=True)
        return torch.optim.SGD(params, lr=self.cfg.server_lr, foreach=True)

    def _optimizer(self) -> torch.optim.Optimizer:
        if self.cfg.server_optimizer_state == "fresh":
            return self._new_optimizer()
        if self._opt is None:
            self._opt = self._new_optimizer()
        return self._opt

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The persistent optimizer's per-parameter state as flat named tensors
        (``"<param index>.<name>"``); empty before the first calibration or when ``fresh``."""
        if self._opt is None:
            return {}
        out: dict[str, torch.Tensor] = {}
        for i, st in self._opt.state_dict()["state"].items():
            for k, v in st.items():
                out[f"{i}.{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).cpu()
        return out

    def load_optimizer_state(self, flat: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`optimizer_state` (exact: same tensors, same step counts)."""
        if not flat:
            self._opt = None
            return
        opt = self._new_optimizer()
        sd = opt.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in flat.items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = v.clone()
        if set(state) - set(sd["param_groups"][0]["params"]):
            raise ValueError(
                "checkpoint: the server optimizer state names parameters the model does not have"
            )
        params = list(self.model.parameters())
        for pi, st in state.items():
            for sname, v in st.items():
                ok = v.numel() == 1 if sname == "step" else v.shape == params[pi].shape
                if not ok or not bool(torch.isfinite(v).all()):
                    raise ValueError(
                        f"checkpoint: server optimizer state {pi}.{sname} has shape "
                        f"{tuple(v.shape)} or non-finite values; expected "
                        f"{'a scalar' if sname == 'step' else tuple(params[pi].shape)}"
                    )
        sd["state"] = state
        opt.load_state_dict(sd)
        self._opt = opt

    def calibrate(
        self, params: torch.Tensor, steps: int, rnd: int, *, use_all: bool = False
    ) -> CalibrationResult:
        """``steps`` optimizer steps of the mean eps-MSE on auxiliary batches from ``params``.

        Args:
            params: ``[D]`` float32 start (the freshly aggregated global model).
            steps: number of server steps (0: ``params`` returned unchanged).
            rnd: the round (seeds the batch order and the diffusion noise).
            use_all: train on the whole auxiliary set (FedDDPM) rather than only the slice the
                detector does not evaluate on (FedDDPM+).
        """
        t0 = time.perf_counter()
        if steps == 0:
            return CalibrationResult(params.clone(), 0, float("nan"), 0.0)
        pool = (
            torch.arange(self.images.shape[0]) if use_all or len(self.holdout_idx) == 0
            else self.train_idx
        )
        seed = self._derive(self.seed, self._p_cal, rnd)
        cpu_gen = torch.Generator().manual_seed(seed)
        draws = self._derive(self.seed, self._p_cal, rnd, 0, 1)  # phase 1: diffusion draws
        dev_gen = torch.Generator(device=self.device).manual_seed(draws)
        set_flat(self.model, params)
        self.model.train()
        opt = self._optimizer()
        bs = min(self.cfg.server_batch_size, len(pool))
        perm, pos, total = pool[torch.randperm(len(pool), generator=cpu_gen)], 0, 0.0
        for _ in range(steps):
            if pos + bs > len(pool):
                perm, pos = pool[torch.randperm(len(pool), generator=cpu_gen)], 0
            idx = perm[pos : pos + bs].to(self.device)
            pos += bs
            y = self.labels[idx] if self.conditional else None
            loss = diffusion_loss(
                self.model, self.schedule, self.images[idx], y, generator=dev_gen
            ).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(list(self.model.parameters()), 1.0)
            opt.step()
            total += float(loss.detach())
        return CalibrationResult(
            get_flat(self.model), steps, total / steps, time.perf_counter() - t0
        )

    def holdout_loss(self, params: torch.Tensor) -> float:
        """Mean eps-MSE of ``params`` on the held-out auxiliary slice with FIXED noise (the same
        draws every round, so rounds are comparable)."""
        idx = self.holdout_idx if len(self.holdout_idx) else torch.arange(self.images.shape[0])
        gen = torch.Generator(device=self.device).manual_seed(
            self._derive(self.seed, self._p_eval)
        )
        set_flat(self.model, params)
        self.model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(idx), 256):
                j = idx[i : i + 256].to(self.device)
                y = self.labels[j] if self.conditional else None
                out.append(diffusion_loss(self.model, self.schedule, self.images[j], y,
                                          generator=gen))
        return float(torch.cat(out).mean())


class FedDDPM(StrategyWrapper):
    """Wraps ``base``; after each aggregation runs ``calibration_steps`` server steps.

    Args:
        base: the federated strategy whose aggregation is kept (FedAvg, FedProx, SCAFFOLD).
        cfg: the ``fedddpm`` section.
        calibrator: server calibration on the auxiliary set.
    """

    name = "fedddpm"
    layer = "fedddpm"

    def __init__(
        self,
        base: Strategy,
        cfg: FedDDPMConfig,
        calibrator: ServerCalibrator,
        client_examples_per_round: int | None = None,
    ) -> None:
        super().__init__(base)
        self.fd = cfg
        self.calibrator = calibrator
        self.server_steps_total = 0
        self.server_seconds_total = 0.0
        self.rounds_aggregated = 0
        self._last: dict[str, object] = {}
        self.client_examples_per_round = client_examples_per_round
        if cfg.calibration_fraction is not None and not client_examples_per_round:
            raise ValueError(
                "fedddpm.calibration_fraction: needs the planned client examples per round "
                "(client_examples_per_round); set calibration_steps instead"
            )

    @property
    def steps_per_round(self) -> int:
        """Server steps after each aggregation: ``calibration_steps``, or with
        ``calibration_fraction`` f: ``max(1, round(f x client examples per round / server
        batch))`` (so the server processes about f times the examples the clients do)."""
        f = self.fd.calibration_fraction
        if f is None:
            return self.fd.calibration_steps
        if self.client_examples_per_round is None:  # pragma: no cover - refused in __init__
            raise RuntimeError("fedddpm.calibration_fraction needs client_examples_per_round")
        return max(1, round(f * self.client_examples_per_round / self.fd.server_batch_size))

    def compute_metrics(self) -> dict[str, object]:
        """Server compute so far: examples and their ratio to the clients' planned examples."""
        out: dict[str, object] = {
            "server_examples_total": self.server_steps_total * self.fd.server_batch_size
        }
        if self.client_examples_per_round and self.rounds_aggregated:
            out["server_vs_client_examples"] = round(
                self.server_steps_total * self.fd.server_batch_size
                / (self.client_examples_per_round * self.rounds_aggregated), 4
            )
        return out

    # ------------------------------------------------------------------ delegation
    # every other hook (planning, the client policy, eval_params): StrategyWrapper

    # ------------------------------------------------------------------ server
    def aggregate(
        self, rnd: int, global_params: torch.Tensor, results: Mapping[str, CohortSum]
    ) -> torch.Tensor:
        new = self.base.aggregate(rnd, global_params, results)
        return self.after_aggregation(rnd, new)

    def after_aggregation(self, rnd: int, new: torch.Tensor) -> torch.Tensor:
        """FedDDPM: calibrate every round."""
        self.rounds_aggregated += 1
        steps = self.steps_per_round
        if steps == 0:
            self._last = {"server_steps": 0, "server_seconds": 0.0}
            return new
        res = self.calibrator.calibrate(new.to(torch.float32), steps, rnd, use_all=True)
        out = self._commit(new, res)
        self._last = {
            "server_steps": res.steps,
            "server_seconds": round(res.seconds, 4),
            "calibration_loss": round(res.mean_loss, 6),
        }
        return out

    def _commit(self, new: torch.Tensor, res: CalibrationResult) -> torch.Tensor:
        """Account the steps and keep the server optimizer's EMA consistent with the calibrated
        model (:meth:`~securefed.strategies.base.ServerOptimizer.replace_last_step`)."""
        self.server_steps_total += res.steps
        self.server_seconds_total += res.seconds
        calibrated = res.params.to(new.dtype)
        self.server_opt.replace_last_step(new, calibrated)
        return calibrated

    def round_metrics(self) -> dict[str, object]:
        return {
            **self._last,
            "server_steps_total": self.server_steps_total,
            "server_seconds_total": round(self.server_seconds_total, 4),
            **self.compute_metrics(),
        }

    # ------------------------------------------------------------------ persistence
    _OPT = "opt."

    def own_state(self) -> dict[str, torch.Tensor]:
        out = {
            "server_steps_total": torch.tensor(self.server_steps_total),
            "server_seconds_total": torch.tensor(self.server_seconds_total),
            "rounds_aggregated": torch.tensor(self.rounds_aggregated),
        }
        for k, v in self.calibrator.optimizer_state().items():
            out[self._OPT + k] = v
        return out

    def load_own_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if "server_steps_total" in state:
            self.server_steps_total = int(state["server_steps_total"])
            self.server_seconds_total = float(state["server_seconds_total"])
        if "rounds_aggregated" in state:
            self.rounds_aggregated = int(state["rounds_aggregated"])
        self.calibrator.load_optimizer_state(
            {k[len(self._OPT):]: v for k, v in state.items() if k.startswith(self._OPT)}
        )
