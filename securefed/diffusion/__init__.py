"""Diffusion models: noise schedules, the UNet, per-example losses, samplers and weight EMA."""

from __future__ import annotations

from securefed.diffusion.ema import EMA
from securefed.diffusion.loss import (
    denoising_loss_at,
    diffusion_loss,
    diffusion_loss_from_draws,
    draw_timesteps_and_noise,
)
from securefed.diffusion.sampling import (
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_step,
    sample,
)
from securefed.diffusion.schedule import NoiseSchedule, cosine_betas, linear_betas, q_sample
from securefed.diffusion.unet import UNet, timestep_embedding

__all__ = [
    "EMA",
    "NoiseSchedule",
    "UNet",
    "cosine_betas",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_sample",
    "ddpm_step",
    "denoising_loss_at",
    "diffusion_loss",
    "diffusion_loss_from_draws",
    "draw_timesteps_and_noise",
    "linear_betas",
    "q_sample",
    "sample",
    "timestep_embedding",
]
