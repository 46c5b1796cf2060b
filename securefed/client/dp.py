"""Record-level DP-SGD local training (Abadi et al. 2016) with noise multiplicity (DPDM).

Each step draws a Poisson batch (every example independently with rate ``q = batch_size / n``:
what the accountant assumes), computes each EXAMPLE's gradient of its loss averaged over K
(t, noise) draws, clips it to ``max_grad_norm``, sums, adds Gaussian noise of std
``noise_multiplier * max_grad_norm`` from the configured noise source, and divides by the
expected batch size ``q n``. Strategy terms (FedProx, SCAFFOLD) are data-independent and are
added after the noise (post-processing). The privacy cost of the steps is charged by the caller
to the client's ledger BEFORE the resulting update leaves the client.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from securefed.client.trainer import LocalResult, LocalTrainer, _split_like, local_steps_for
from securefed.client.update import get_flat, set_flat
from securefed.config import ClientConfig, DPConfig
from securefed.data import ImageDataset
from securefed.diffusion import NoiseSchedule
from securefed.diffusion.loss import diffusion_loss_from_draws, draw_timesteps_and_noise
from securefed.strategies.base import LocalObjective

__all__ = ["DPLocalTrainer", "poisson_batches", "sample_rate_for"]


def sample_rate_for(cfg: ClientConfig, num_examples: int) -> float:
    """Poisson sampling rate ``q = min(1, batch_size / n)``."""
    return min(1.0, cfg.batch_size / num_examples)


def poisson_batches(n: int, q: float, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``steps`` Poisson batches: each index in ``0..n-1`` independently with probability ``q``.

    Batches can be empty (the step then releases noise only).
    """
    return [torch.nonzero(torch.rand(n, generator=gen) < q).reshape(-1) for _ in range(steps)]


class DPLocalTrainer(LocalTrainer):
    """DP-SGD variant of :class:`LocalTrainer` (engine ``fast`` or ``opacus``)."""

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        cfg: ClientConfig,
        dp: DPConfig,
        device: torch.device,
        conditional: bool = False,
    ) -> None:
        super().__init__(model, schedule, cfg, device, conditional)
        self.dp = dp
        if dp.engine == "opacus":
            from securefed.privacy.opacus_engine import make_private_module

            self._gsm: Any = make_private_module(model)
        else:
            from securefed.privacy.per_sample_norms import PerSampleGradNorms

            # validates every parameterised layer up front (clear error naming the layer)
            PerSampleGradNorms(model, group_size=dp.noise_multiplicity).remove()
            self._gsm = None

    def train_private(
        self,
        data: ImageDataset,
        start_params: torch.Tensor,
        objective: LocalObjective,
        seed: int,
        *,
        noise_multiplier: float,
        noise_source: Any,
        progress: object | None = None,
        canaries: Any | None = None,
    ) -> LocalResult:
        """DP-SGD local training; same contract as :meth:`LocalTrainer.train`.

        ``canaries``: an audit hook (:class:`~securefed.privacy.canaries.ClientCanaries`)
        whose ``extra_sum()`` is added to each step's clipped sum before the noise and whose
        ``observe(q n)`` reads the privatized gradient after it."""
        t0 = time.perf_counter()
        n = len(data)
        if n == 0:
            raise ValueError("client has no training examples")
        steps = local_steps_for(self.cfg, n)
        q = sample_rate_for(self.cfg, n)
        expected = q * n
        k = self.dp.noise_multiplicity
        set_flat(self.model, start_params)
        self.model.train()
        params = list(self.model.parameters())
        from securefed.client.trainer import make_optimizer

        opt = make_optimizer(params, self.cfg)
        cpu_gen = torch.Generator().manual_seed(seed)
        dev_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        torch.manual_seed(seed + 2)
        prox_ref = _split_like(start_params, params, self.device) if objective.prox_mu > 0 else None
        correction = (
            _split_like(objective.grad_correction, params, self.device)
            if objective.grad_correction is not None
            else None
        )
        from securefed.client.trainer import GradMeanTracker

        tracker = GradMeanTracker(params) if objective.track_mean_grad else None
        images = data.images.to(self.device)
        labels = data.labels.to(self.device)
        total, counted = 0.0, 0
        for idx in poisson_batches(n, q, steps, cpu_gen):
            idx = idx.to(self.device)
            x0 = images[idx]
            y = labels[idx] if self.conditional else None

            def row_losses(
                x0: torch.Tensor = x0, y: torch.Tensor | None = y
            ) -> torch.Tensor | None:
                if x0.shape[0] == 0:
                    return None  # empty Poisson batch: the step releases noise only
                t, noise = draw_timesteps_and_noise(self.schedule, x0, k, generator=dev_gen)
                net = self._gsm if self._gsm is not None else self.model
                return diffusion_loss_from_draws(net, self.schedule, x0, t, noise, y, per_row=True)

            opt.zero_grad(set_to_none=True)
            extra = canaries.extra_sum() if canaries is not None else None
            stats = self._dp_step(row_losses, expected, noise_multiplier, noise_source, extra)
            if canaries is not None:
                canaries.observe(expected)
            with torch.no_grad():
                if tracker is not None:
                    tracker.add()  # the privatized gradient: post-processing of the DP release
                for j, p in enumerate(params):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    if prox_ref is not None:
                        p.grad.add_(p - prox_ref[j], alpha=objective.prox_mu)
                    if correction is not None:
                        p.grad.add_(correction[j])
            opt.step()
            if stats.batch_size > 0:
                total += stats.mean_loss
                counted += 1
            if progress is not None:
                progress.update(1)  # type: ignore[attr-defined]
        return LocalResult(
            params=get_flat(self.model),
            mean_loss=total / max(counted, 1),
            steps=steps,
            num_examples=n,
            seconds=time.perf_counter() - t0,
            mean_grad=tracker.mean() if tracker is not None else None,
        )

    def _dp_step(
        self,
        row_losses: Any,
        expected: float,
        sigma: float,
        noise_source: Any,
        extra_sum: Any | None = None,
    ) -> Any:
        if self._gsm is not None:
            from securefed.privacy.opacus_engine import opacus_dp_step

            return opacus_dp_step(
                self._gsm,
                row_losses,
                expected_batch_size=expected,
                max_grad_norm=self.dp.max_grad_norm,
                noise_multiplier=sigma,
                noise_source=noise_source,
                group_size=self.dp.noise_multiplicity,
                extra_sum=extra_sum,
            )
        from securefed.privacy.dp_step import dp_sgd_step

        return dp_sgd_step(
            self.model,
            row_losses,
            batch_size_expected=expected,
            max_grad_norm=self.dp.max_grad_norm,
            noise_multiplier=sigma,
            noise_source=noise_source,
            group_size=self.dp.noise_multiplicity,
            extra_sum=extra_sum,
        )
