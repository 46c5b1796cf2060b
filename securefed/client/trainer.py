"""Plain (non-DP) local training of the denoiser on one client's data."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from securefed.config import ClientConfig
from securefed.data import ImageDataset
from securefed.diffusion import NoiseSchedule, diffusion_loss
from securefed.diffusion.params import get_flat, set_flat
from securefed.seeds import Purpose, derive_seed
from securefed.strategies.base import LocalObjective

__all__ = ["LocalResult", "LocalTrainer", "local_steps_for", "make_optimizer"]


@dataclass(frozen=True)
class LocalResult:
    """Outcome of one client's local training.

    Attributes:
        params: ``[D]`` float32 CPU vector of the trained local model.
        mean_loss: mean per-example denoising loss over all local steps.
        steps: optimizer steps taken.
        num_examples: size of the client's dataset.
        seconds: wall seconds spent.
        mean_grad: ``[D]`` float32 CPU mean of the raw minibatch gradients (before any
            FedProx term or SCAFFOLD correction) when ``LocalObjective.track_mean_grad``.
    """

    params: torch.Tensor
    mean_loss: float
    steps: int
    num_examples: int
    seconds: float
    mean_grad: torch.Tensor | None = None


class GradMeanTracker:
    """Running sum of per-step gradients, flattened like :func:`get_flat` (``[D]``)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.sums = [torch.zeros_like(p) for p in params]
        self.steps = 0

    def add(self) -> None:
        """Accumulate the current ``p.grad`` (a missing gradient counts as zero)."""
        for s, p in zip(self.sums, self.params, strict=True):
            if p.grad is not None:
                s.add_(p.grad)
        self.steps += 1

    def mean(self) -> torch.Tensor:
        if self.steps == 0:
            raise RuntimeError("GradMeanTracker.mean: no steps were recorded")
        return torch.cat([s.reshape(-1) for s in self.sums]).div_(self.steps).float().cpu()


def local_steps_for(cfg: ClientConfig, num_examples: int) -> int:
    """Steps per round: ``local_steps`` or ``ceil(local_epochs * n / batch_size)``."""
    if cfg.local_steps is not None:
        return cfg.local_steps
    epochs = cfg.local_epochs if cfg.local_epochs is not None else 1.0
    return max(1, math.ceil(epochs * num_examples / min(cfg.batch_size, num_examples)))


def make_optimizer(params: list[nn.Parameter], cfg: ClientConfig) -> torch.optim.Optimizer:
    """Registry of client optimizers (``client.optimizer``)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True
    )


class LocalTrainer:
    """Runs local epsilon-prediction training from a start vector; optimizer reset per round.

    One trainer (and one model instance) serves every simulated client: the model is loaded
    from ``start_params`` before each client's turn, so clients never share state.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        cfg: ClientConfig,
        device: torch.device,
        conditional: bool = False,
    ) -> None:
        self.model = model
        self.schedule = schedule.to(device)
        self.cfg = cfg
        self.device = device
        self.conditional = conditional

    def _batches(self, n: int, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
        """Index batches for ``steps`` steps: reshuffled epochs, drawn from ``gen`` (CPU)."""
        bs = min(self.cfg.batch_size, n)
        out: list[torch.Tensor] = []
        perm = torch.randperm(n, generator=gen)
        pos = 0
        while len(out) < steps:
            if pos + bs > n:
                perm = torch.randperm(n, generator=gen)
                pos = 0
            out.append(perm[pos : pos + bs])
            pos += bs
        return out

    def train(
        self,
        data: ImageDataset,
        start_params: torch.Tensor,
        objective: LocalObjective,
        seed: int,
        progress: object | None = None,
    ) -> LocalResult:
        """Train locally.

        Args:
            data: the client's examples (images ``[n,C,H,W]`` in [-1,1], labels ``[n]``).
            start_params: ``[D]`` global parameters to start from.
            objective: strategy modifications (FedProx term, SCAFFOLD correction).
            seed: seeds the batch order and the diffusion noise of this client-round.
            progress: optional tqdm bar advanced once per step.
        """
        t0 = time.perf_counter()
        n = len(data)
        if n == 0:
            raise ValueError("client has no training examples")
        steps = local_steps_for(self.cfg, n)
        set_flat(self.model, start_params)
        self.model.train()
        params = list(self.model.parameters())
        opt = make_optimizer(params, self.cfg)

        cpu_gen = torch.Generator().manual_seed(seed)
        dev_seed = derive_seed(seed, Purpose.LOSS_DRAWS)
        dev_gen = torch.Generator(device=self.device).manual_seed(dev_seed)
        # any module-level randomness (e.g. dropout) is seeded too
        torch.manual_seed(derive_seed(seed, Purpose.MODULE_RNG))

        prox_ref: list[torch.Tensor] | None = None
        correction: list[torch.Tensor] | None = None
        if objective.prox_mu > 0:
            prox_ref = _split_like(start_params, params, self.device)
        if objective.grad_correction is not None:
            correction = _split_like(objective.grad_correction, params, self.device)

        tracker = GradMeanTracker(params) if objective.track_mean_grad else None
        images = data.images.to(self.device)
        labels = data.labels.to(self.device)
        total = 0.0
        for idx in self._batches(n, steps, cpu_gen):
            idx = idx.to(self.device)
            x0 = images[idx]
            y = labels[idx] if self.conditional else None
            loss = diffusion_loss(self.model, self.schedule, x0, y, generator=dev_gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                if tracker is not None:
                    tracker.add()
                for k, p in enumerate(params):
                    if p.grad is None:
                        continue
                    if prox_ref is not None:
                        p.grad.add_(p - prox_ref[k], alpha=objective.prox_mu)
                    if correction is not None:
                        p.grad.add_(correction[k])
            if self.cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            opt.step()
            total += float(loss.detach())
            if progress is not None:
                progress.update(1)  # type: ignore[attr-defined]
        return LocalResult(
            params=get_flat(self.model),
            mean_loss=total / steps,
            steps=steps,
            num_examples=n,
            seconds=time.perf_counter() - t0,
            mean_grad=tracker.mean() if tracker is not None else None,
        )


def _split_like(
    vec: torch.Tensor, params: list[nn.Parameter], device: torch.device
) -> list[torch.Tensor]:
    """Split a ``[D]`` vector into tensors shaped like ``params`` (on ``device``)."""
    out, offset = [], 0
    for p in params:
        out.append(vec[offset : offset + p.numel()].view_as(p).to(device))
        offset += p.numel()
    return out
