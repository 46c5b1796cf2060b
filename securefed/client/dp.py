"""Record-level DP-SGD local training (Abadi et al. 2016) with noise multiplicity (DPDM).

Each step draws a Poisson batch (every example independently with rate ``q = batch_size / n``:
what the accountant assumes) from the noise source's secret-keyed sampling stream (never from the
public seed: amplification by subsampling assumes the batches are secret), computes each
EXAMPLE's gradient of its loss averaged over K (t, noise) draws, clips it to ``max_grad_norm``,
sums, adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` from the configured noise
source, and divides by the expected batch size ``q n``. Strategy terms (FedProx, SCAFFOLD) are
data-independent and are added after the noise (post-processing). The privacy cost of the steps
is charged by the caller to the client's ledger BEFORE the resulting update leaves the client.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
from torch import nn

from securefed.client.trainer import (
    GradMeanTracker,
    LocalResult,
    LocalTrainer,
    _split_like,
    local_steps_for,
    make_optimizer,
)
from securefed.config import ClientConfig, DPConfig
from securefed.data import ImageDataset
from securefed.diffusion import NoiseSchedule
from securefed.diffusion.loss import diffusion_loss_from_draws, draw_timesteps_and_noise
from securefed.diffusion.params import get_flat, set_flat
from securefed.noise.secure_noise import SecureGaussian, UniformSource
from securefed.privacy.dp_step import dp_sgd_step
from securefed.privacy.opacus_engine import make_private_module, opacus_dp_step
from securefed.privacy.per_sample_norms import PerSampleGradNorms
from securefed.seeds import Purpose, derive_seed
from securefed.strategies.base import LocalObjective

__all__ = [
    "DPLocalTrainer",
    "dp_row_losses",
    "poisson_batches",
    "sample_rate_for",
    "sampling_source_of",
    "train_private_charged",
    "update_digest",
]


def sample_rate_for(cfg: ClientConfig, num_examples: int) -> float:
    """Poisson sampling rate ``q = min(1, batch_size / n)``."""
    return min(1.0, cfg.batch_size / num_examples)


def poisson_batches(n: int, q: float, steps: int, coins: UniformSource) -> list[torch.Tensor]:
    """``steps`` Poisson batches: each index in ``0..n-1`` independently with probability ``q``.

    ``coins`` must be unpredictable to the adversary (a CSPRNG keyed by a secret, e.g.
    ``SecureGaussian(key).sampling_source()``; Opacus' ``secure_mode`` does the same): the
    privacy amplification of Poisson subsampling assumes nobody knows which steps used a record.
    Batches can be empty (the step then releases noise only).
    """
    return [torch.nonzero(coins.uniform(n) < q).reshape(-1) for _ in range(steps)]


def sampling_source_of(noise_source: Any) -> UniformSource:
    """The Poisson coins that belong to ``noise_source`` (its ``sampling_source()``).

    Raises:
        TypeError: the noise source has no sampling stream.
    """
    get = getattr(noise_source, "sampling_source", None)
    if get is None:
        raise TypeError(
            f"noise_source: {type(noise_source).__name__} has no sampling_source(); DP-SGD draws "
            "its Poisson batches from the noise source's secret key: pass a SecureGaussian "
            "(or TorchGaussian for insecure tests)"
        )
    coins: UniformSource = get()
    return coins


def dp_row_losses(
    net: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    num_draws: int,
    *,
    generator: torch.Generator,
) -> torch.Tensor | None:
    """The ``[K * B]`` per-row losses that the DP-SGD engines reduce to per-example losses.

    Row ``k * B + b`` is draw ``k`` of example ``b`` (draw-major, undivided); the engines take
    example ``b``'s loss as the MEAN of its ``K`` rows (``row_reduction="mean"``), i.e. exactly
    ``diffusion_loss_from_draws(...)[b]``, and clip the gradient of that loss. ``None`` for an
    empty Poisson batch (the step then releases noise only).
    """
    if x0.shape[0] == 0:
        return None
    t, noise = draw_timesteps_and_noise(schedule, x0, num_draws, generator=generator)
    return diffusion_loss_from_draws(net, schedule, x0, t, noise, y, per_row=True)


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

            self._gsm: Any = make_private_module(model)
        else:

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

        opt = make_optimizer(params, self.cfg)
        coins = sampling_source_of(noise_source)
        dev_seed = derive_seed(seed, Purpose.LOSS_DRAWS)
        dev_gen = torch.Generator(device=self.device).manual_seed(dev_seed)
        torch.manual_seed(derive_seed(seed, Purpose.MODULE_RNG))
        prox_ref = _split_like(start_params, params, self.device) if objective.prox_mu > 0 else None
        correction = (
            _split_like(objective.grad_correction, params, self.device)
            if objective.grad_correction is not None
            else None
        )

        tracker = GradMeanTracker(params) if objective.track_mean_grad else None
        images = data.images.to(self.device)
        labels = data.labels.to(self.device)
        total, counted = 0.0, 0
        for idx in poisson_batches(n, q, steps, coins):
            idx = idx.to(self.device)
            x0 = images[idx]
            y = labels[idx] if self.conditional else None

            def row_losses(
                x0: torch.Tensor = x0, y: torch.Tensor | None = y
            ) -> torch.Tensor | None:
                net = self._gsm if self._gsm is not None else self.model
                return dp_row_losses(net, self.schedule, x0, y, k, generator=dev_gen)

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


def update_digest(result: LocalResult) -> str:
    """SHA-256 (hex) of what a DP-SGD run releases: the local model ``[D]`` and, when tracked,
    the mean privatized gradient, each with its dtype and shape."""
    h = hashlib.sha256(b"securefed/dp-update/v1")
    for t in (result.params, result.mean_grad):
        if t is None:
            h.update(b"none")
            continue
        c = t.detach().to("cpu").contiguous()
        h.update(f"{c.dtype}{tuple(c.shape)}".encode())
        h.update(c.numpy().tobytes())
    return h.hexdigest()


def train_private_charged(
    trainer: DPLocalTrainer,
    ledger: Any,
    data: ImageDataset,
    start_params: torch.Tensor,
    objective: LocalObjective,
    seed: int,
    *,
    client_id: int,
    round: int,
    phase: str = "round",
    noise_multiplier: float,
    noise_source: Any,
    progress: object | None = None,
    canaries: Any | None = None,
) -> LocalResult | None:
    """DP-SGD local training whose charge is persisted BEFORE the result is returned.

    ``noise_source`` is the client-round's replayable source (its key also draws the Poisson
    batches). If the ledger already holds a charge for this ``(client, phase, round)`` (a round
    replayed after a crash, whose first attempt may have been released):

    - the replay reproduces one of the recorded ``update_sha256`` digests: it IS the released
      update, so it is returned without a new charge;
    - otherwise the replay is discarded unreleased (same noise, different gradients: releasing
      both would let their difference cancel the noise), the old charge stays, and the client
      retrains with a fresh ``os.urandom`` key (fresh noise and fresh batches), charged again.

    Returns:
        the result, or ``None`` when the fresh retrain would exceed the client's budget (the
        client then releases nothing this round).
    """

    def train(source: Any) -> LocalResult:
        return trainer.train_private(
            data, start_params, objective, seed, noise_multiplier=noise_multiplier,
            noise_source=source, progress=progress, canaries=canaries,
        )

    # the charge is at the noise multiplier and sample rate this training actually used, never
    # the plan's (a coordinator that changes batch_size must not lower the recorded epsilon)
    q = sample_rate_for(trainer.cfg, len(data))
    prior = ledger.charges_for(client_id, phase, round)
    result = train(noise_source)
    digest = update_digest(result)
    if prior:
        if any(e.update_sha256 == digest for e in prior):
            return result  # bit-identical to the charged release
        if ledger.would_exceed(client_id, result.steps, noise_multiplier=noise_multiplier,
                               sample_rate=q):
            return None

        if canaries is not None:  # the discarded attempt's canary scores are not the release's
            canaries.restart()
        result = train(SecureGaussian())  # fresh key: never replayed, never seen before
        digest = update_digest(result)
    ledger.charge(client_id, phase=phase, round=round, steps=result.steps,
                  noise_multiplier=noise_multiplier, sample_rate=q, update_sha256=digest)
    return result
