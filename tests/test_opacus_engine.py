"""The Opacus DP-SGD step against a slow per-example reference on the tiny UNet."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from securefed.config import DiffusionConfig, ModelConfig
from securefed.diffusion import NoiseSchedule, UNet, diffusion_loss_from_draws, q_sample
from securefed.diffusion.loss import draw_timesteps_and_noise
from securefed.privacy import (
    DPModelError,
    SecureGaussian,
    clip_factors,
    make_private_module,
    opacus_dp_step,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")

B = 4
KEY = bytes(range(32))


def _unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(
        ModelConfig(base_channels=8, channel_mults=(1, 2), norm_groups=4),
        in_channels=1,
        image_size=8,
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the UNet zero-initialises its output convs: make every grad non-zero
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(DiffusionConfig(timesteps=50))


def _draws(schedule: NoiseSchedule, k: int, b: int = B) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(10 + k)
    x0 = torch.rand(b, 1, 8, 8, generator=gen) * 2 - 1
    t, noise = draw_timesteps_and_noise(schedule, x0, k, generator=gen)
    return x0, t, noise


def _rows_fn(
    module: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> Callable[[], torch.Tensor]:
    """``[K * B]`` per-row losses, draw-major (row k*B + b is draw k of example b)."""

    def fn() -> torch.Tensor:
        k, b = t.shape
        t_flat = t.reshape(k * b)
        noise_flat = noise.reshape(k * b, *x0.shape[1:])
        x_t = q_sample(schedule, x0.repeat(k, 1, 1, 1), t_flat, noise_flat)
        return (module(x_t, t_flat) - noise_flat).pow(2).flatten(1).mean(dim=1)

    return fn


def _slow_reference(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    clip: float,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clipped per-example gradient sum by an explicit loop (one backward per example)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for b in range(x0.shape[0]):
        loss = diffusion_loss_from_draws(
            model, schedule, x0[b : b + 1], t[:, b : b + 1], noise[:, b : b + 1]
        ).sum()
        grads = torch.autograd.grad(loss, params)
        norm = torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt()
        norms.append(norm)
        factor = float(clip_factors(norm, clip))
        for acc, g in zip(total, grads, strict=True):
            acc.add_(g * factor)
    return total, torch.stack(norms)


@pytest.mark.parametrize("k", [1, 2])
def test_step_equals_slow_per_example_loop_without_noise(schedule: NoiseSchedule, k: int) -> None:
    model = _unet()
    reference = copy.deepcopy(model)
    x0, t, noise = _draws(schedule, k)
    _, norms = _slow_reference(reference, schedule, x0, t, noise, clip=1e9)
    clip = float(norms.median())  # some examples clipped, some not
    expected, _ = _slow_reference(reference, schedule, x0, t, noise, clip=clip)

    gsm = make_private_module(model)
    res = opacus_dp_step(
        gsm,
        _rows_fn(gsm, schedule, x0, t, noise),
        expected_batch_size=3.0,
        max_grad_norm=clip,
        noise_multiplier=0.0,
        noise_source=SecureGaussian(KEY),
        group_size=k,
    )
    assert res.batch_size == B
    assert 0.0 < res.clipped_fraction < 1.0
    assert res.mean_norm == pytest.approx(float(norms.mean()), rel=1e-4)
    params = [p for p in gsm.parameters() if p.requires_grad]
    for p, e in zip(params, expected, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, e / 3.0, rtol=1e-4, atol=1e-6)
    assert all(p.grad_sample is None for p in params)  # per-sample grads freed


@pytest.mark.parametrize("clip", [1e-3, 0.5, 1e3])
def test_each_clipped_example_gradient_has_norm_at_most_c(
    schedule: NoiseSchedule, clip: float
) -> None:
    gsm = make_private_module(_unet())
    x0, t, noise = _draws(schedule, 2)
    for b in range(B):  # one-example batches: the step's gradient IS the clipped example's
        res = opacus_dp_step(
            gsm,
            _rows_fn(gsm, schedule, x0[b : b + 1], t[:, b : b + 1], noise[:, b : b + 1]),
            expected_batch_size=1.0,
            max_grad_norm=clip,
            noise_multiplier=0.0,
            noise_source=SecureGaussian(KEY),
            group_size=2,
        )
        norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in gsm.parameters()))
        assert float(norm) <= clip
        if res.mean_norm > clip:
            assert float(norm) == pytest.approx(clip, rel=1e-4)


def test_noise_is_drawn_from_the_source_in_parameter_order(schedule: NoiseSchedule) -> None:
    x0, t, noise = _draws(schedule, 1)
    gsm_a, gsm_b = make_private_module(_unet()), make_private_module(_unet())
    for gsm, sigma in ((gsm_a, 0.0), (gsm_b, 1.3)):
        opacus_dp_step(
            gsm,
            _rows_fn(gsm, schedule, x0, t, noise),
            expected_batch_size=4.0,
            max_grad_norm=0.7,
            noise_multiplier=sigma,
            noise_source=SecureGaussian(KEY),
        )
    replay = SecureGaussian(KEY)
    for pa, pb in zip(gsm_a.parameters(), gsm_b.parameters(), strict=True):
        drawn = replay.normal(pa.shape, 1.3 * 0.7)
        torch.testing.assert_close(pb.grad, pa.grad + drawn / 4.0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("empty", [None, torch.zeros(0)])
def test_empty_poisson_batch_releases_noise_only(empty: torch.Tensor | None) -> None:
    gsm = make_private_module(_unet())
    res = opacus_dp_step(
        gsm,
        lambda: empty,
        expected_batch_size=2.0,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        noise_source=SecureGaussian(KEY),
    )
    assert res.batch_size == 0
    replay = SecureGaussian(KEY)
    for p in gsm.parameters():
        torch.testing.assert_close(p.grad, replay.normal(p.shape, 1.0) / 2.0)


def test_per_example_losses_give_the_same_step_as_per_row_losses(
    schedule: NoiseSchedule,
) -> None:
    x0, t, noise = _draws(schedule, 3)
    grads = []
    for per_row in (True, False):
        gsm = make_private_module(_unet())
        rows = _rows_fn(gsm, schedule, x0, t, noise)
        fn = rows if per_row else (lambda rows=rows: rows().reshape(3, B).mean(dim=0))
        res = opacus_dp_step(
            gsm,
            fn,
            expected_batch_size=2.0,
            max_grad_norm=0.3,
            noise_multiplier=0.0,
            noise_source=SecureGaussian(KEY),
            group_size=3,
        )
        assert res.batch_size == B
        grads.append([p.grad for p in gsm.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_stale_forward_without_backward_does_not_corrupt_the_next_step(
    schedule: NoiseSchedule,
) -> None:
    model = _unet()
    reference = copy.deepcopy(model)
    x0, t, noise = _draws(schedule, 1)
    expected, _ = _slow_reference(reference, schedule, x0, t, noise, clip=0.5)
    gsm = make_private_module(model)
    _rows_fn(gsm, schedule, x0, t, noise)()  # e.g. a monitoring forward in training mode
    opacus_dp_step(
        gsm,
        _rows_fn(gsm, schedule, x0, t, noise),
        expected_batch_size=1.0,
        max_grad_norm=0.5,
        noise_multiplier=0.0,
        noise_source=SecureGaussian(KEY),
    )
    for p, e in zip(gsm.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


class _WithBatchNorm(nn.Module):
    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, affine=affine)
        self.head = nn.Linear(4 * 8 * 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).flatten(1))


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_model_is_refused_naming_the_layer(affine: bool) -> None:
    with pytest.raises(DPModelError, match=r"bn \(BatchNorm2d\)"):
        make_private_module(_WithBatchNorm(affine))


def test_invalid_step_arguments(schedule: NoiseSchedule) -> None:
    gsm = make_private_module(_unet())
    x0, t, noise = _draws(schedule, 2)
    fn = _rows_fn(gsm, schedule, x0, t, noise)
    src = SecureGaussian(KEY)
    with pytest.raises(ValueError, match="group_size"):
        opacus_dp_step(
            gsm,
            fn,
            expected_batch_size=1.0,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            noise_source=src,
            group_size=0,
        )
    with pytest.raises(ValueError, match="expected_batch_size"):
        opacus_dp_step(
            gsm,
            fn,
            expected_batch_size=0.0,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            noise_source=src,
        )
    with pytest.raises(ValueError, match=r"K \* B = 8 or B = 4"):
        opacus_dp_step(
            gsm,
            lambda: fn()[:-1],  # 7 losses for 8 rows
            expected_batch_size=1.0,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            noise_source=src,
            group_size=2,
        )
    with pytest.raises(ValueError, match="not a multiple of K = 3"):
        opacus_dp_step(
            gsm,
            fn,
            expected_batch_size=1.0,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            noise_source=src,
            group_size=3,
        )
