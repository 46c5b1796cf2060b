"""Tests of securefed.diffusion: schedules, forward process, UNet, losses, samplers, EMA."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefed.config import DiffusionConfig, ModelConfig
from securefed.diffusion import (
    EMA,
    NoiseSchedule,
    UNet,
    cosine_betas,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    denoising_loss_at,
    diffusion_loss,
    diffusion_loss_from_draws,
    draw_timesteps_and_noise,
    linear_betas,
    q_sample,
    sample,
)

TINY = ModelConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_unet(num_classes: int | None = None, **kw: Any) -> UNet:
    """A small seeded UNet for 1x8x8 images (``kw`` overrides fields of ``TINY``)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.model_dump(), **kw})
    return UNet(cfg, in_channels=1, image_size=8, num_classes=num_classes)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised layers non-zero weights so outputs depend on the input."""
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


# --------------------------------------------------------------------------- schedules


def test_linear_betas_endpoints_and_dtype() -> None:
    b = linear_betas(1000, 1e-4, 0.02)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == 1e-4 and b[-1] == 0.02
    assert np.all(np.diff(b) > 0)


def test_cosine_betas_match_formula() -> None:
    t_max, s = 50, 0.008
    b = cosine_betas(t_max, s=s)
    assert b.dtype == np.float64 and b.shape == (t_max,)

    def f(t: float) -> float:
        return math.cos((t / t_max + s) / (1 + s) * math.pi / 2) ** 2

    ab = np.cumprod(1.0 - b)
    for t in (0, 10, 25, 48):
        assert ab[t] == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert b.max() <= 0.999 and b.min() > 0
    assert cosine_betas(t_max, max_beta=0.5).max() == 0.5


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_from_config(kind: str) -> None:
    cfg = DiffusionConfig(timesteps=200, schedule=kind)  # type: ignore[arg-type]
    s = NoiseSchedule.from_config(cfg)
    assert s.timesteps == 200
    betas = linear_betas(200, 1e-4, 0.02) if kind == "linear" else cosine_betas(200)
    ab64 = np.cumprod(1.0 - betas)
    for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        v = getattr(s, name)
        assert v.dtype == torch.float32 and v.shape == (200,), name
    # products computed in float64, then rounded once
    np.testing.assert_array_equal(s.alphas_cumprod.numpy(), ab64.astype(np.float32))
    np.testing.assert_array_equal(s.sqrt_alphas_cumprod.numpy(), np.sqrt(ab64).astype(np.float32))
    ab = s.alphas_cumprod
    assert torch.all(ab[1:] < ab[:-1]) and 0 < ab[-1] and ab[0] < 1
    torch.testing.assert_close(
        s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, torch.ones(200)
    )
    assert s.to("cpu") is s


def test_schedule_rejects_bad_betas() -> None:
    with pytest.raises(ValueError):
        NoiseSchedule.from_betas(np.array([0.1, 1.0]))
    with pytest.raises(ValueError):
        linear_betas(10, 0.02, 0.01)


def test_q_sample_formula() -> None:
    s = NoiseSchedule.from_config(DiffusionConfig(timesteps=100))
    g = gen(1)
    x0 = torch.rand((4, 1, 8, 8), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 5, 50, 99])
    xt = q_sample(s, x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        ab = float(s.alphas_cumprod[ti])
        torch.testing.assert_close(xt[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i])
    with pytest.raises(ValueError):
        q_sample(s, x0, t[:3], noise)


# --------------------------------------------------------------------------- UNet


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    levels=st.integers(1, 3),
    mult_seed=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    base=st.sampled_from([4, 8]),
    groups=st.sampled_from([1, 2, 4]),
    res_blocks=st.integers(1, 2),
    attn_mask=st.integers(0, 7),
    size_mult=st.integers(1, 3),
    channels=st.sampled_from([1, 3]),
    batch=st.integers(1, 3),
)
def test_unet_output_shape(
    levels: int,
    mult_seed: list[int],
    base: int,
    groups: int,
    res_blocks: int,
    attn_mask: int,
    size_mult: int,
    channels: int,
    batch: int,
) -> None:
    cfg = ModelConfig(
        base_channels=base,
        channel_mults=tuple(mult_seed[:levels]),
        num_res_blocks=res_blocks,
        attention_levels=tuple(i for i in range(levels) if attn_mask >> i & 1),
        norm_groups=groups,
    )
    # at least 2x2 at the bottleneck: a 1x1 image at batch 1 leaves GroupNorm one value per
    # group, which torch refuses in training mode (hypothesis found it: levels 1, size 1)
    size = 2 ** (levels - 1) * (size_mult + 1)
    model = UNet(cfg, channels, size)
    x = torch.randn(batch, channels, size, size)
    out = model(x, torch.randint(0, 1000, (batch,)))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert not list(model.buffers())
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


def test_unet_has_only_opacus_friendly_layers() -> None:
    model = UNet(ModelConfig(attention_levels=(0, 1), class_conditional=True), 1, 8, num_classes=10)
    allowed = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.Embedding)
    for name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            assert isinstance(mod, allowed), name
        assert not isinstance(
            mod,
            (
                torch.nn.modules.batchnorm._BatchNorm,
                torch.nn.ConvTranspose2d,
                torch.nn.MultiheadAttention,
            ),
        ), name


def test_unet_depends_on_t_and_x() -> None:
    model = randomize_(tiny_unet(attention_levels=(1,)))
    x = torch.randn(2, 1, 8, 8, generator=gen(3))
    a = model(x, torch.tensor([1, 1]))
    assert not torch.allclose(a, model(x, torch.tensor([500, 500])))
    assert not torch.allclose(a, model(x.flip(-1), torch.tensor([1, 1])))
    # examples do not interact (GroupNorm is per example): a batch of 2 == two batches of 1
    torch.testing.assert_close(a[1:], model(x[1:], torch.tensor([1])))
    # a 0-d t is broadcast
    torch.testing.assert_close(a, model(x, torch.tensor(1)))


def test_unet_class_conditional() -> None:
    model = randomize_(tiny_unet(class_conditional=True, num_classes=3))
    assert model.class_conditional and model.num_classes == 3
    x = torch.randn(2, 1, 8, 8, generator=gen(4))
    t = torch.tensor([10, 10])
    out0 = model(x, t, torch.tensor([0, 0]))
    out2 = model(x, t, torch.tensor([2, 2]))
    assert out0.shape == x.shape and not torch.allclose(out0, out2)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_unet(class_conditional=True)
    uncond = tiny_unet()
    assert not uncond.class_conditional and uncond.num_classes is None
    torch.testing.assert_close(uncond(x, t, torch.tensor([0, 1])), uncond(x, t))  # y ignored


def test_parameter_groups_partition() -> None:
    model = UNet(
        ModelConfig(attention_levels=(1,), class_conditional=True, num_res_blocks=2), 1, 8, 10
    )
    groups = model.parameter_groups()
    assert list(groups) == ["encoder", "bottleneck", "decoder"]
    names = [n for n, _ in model.named_parameters()]
    flat = [n for g in groups.values() for n in g]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert all(groups.values())
    assert any(n.startswith("time_embed.") for n in groups["encoder"])
    assert any(n.startswith("class_embed.") for n in groups["encoder"])
    assert all(n.startswith("middle.") for n in groups["bottleneck"])
    assert any(n.startswith("out_conv.") for n in groups["decoder"])


def test_unet_bad_image_size() -> None:
    with pytest.raises(ValueError, match=r"model\.channel_mults.*data\.image_size"):
        UNet(ModelConfig(channel_mults=(1, 2, 2)), 1, 10)
    model = tiny_unet()
    with pytest.raises(ValueError):
        model(torch.randn(1, 1, 7, 7), torch.tensor([0]))
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 8, 8), torch.tensor([0]))


def test_unet_digits_size() -> None:
    model = UNet(ModelConfig(), 1, 8)
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000
    out = model(torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)))
    assert out.shape == (4, 1, 8, 8)


# --------------------------------------------------------------------------- losses


def test_diffusion_loss_per_example_and_reproducible() -> None:
    model = randomize_(tiny_unet())
    s = NoiseSchedule.from_config(DiffusionConfig(timesteps=50))
    x0 = torch.rand((5, 1, 8, 8), generator=gen(0)) * 2 - 1
    loss = diffusion_loss(model, s, x0, generator=gen(7))
    assert loss.shape == (5,) and torch.all(loss >= 0)
    torch.testing.assert_close(loss, diffusion_loss(model, s, x0, generator=gen(7)))
    assert not torch.allclose(loss, diffusion_loss(model, s, x0, generator=gen(8)))
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_diffusion_loss_matches_draws_by_hand() -> None:
    model = randomize_(tiny_unet())
    s = NoiseSchedule.from_config(DiffusionConfig(timesteps=50))
    x0 = torch.rand((3, 1, 8, 8), generator=gen(0)) * 2 - 1
    g = gen(11)
    t = torch.randint(0, 50, (3,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    expected = (model(q_sample(s, x0, t, noise), t) - noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(diffusion_loss(model, s, x0, generator=gen(11)), expected)


def test_num_draws_is_mean_of_single_draws() -> None:
    k = 4
    model = randomize_(tiny_unet(class_conditional=True, num_classes=3))
    s = NoiseSchedule.from_config(DiffusionConfig(timesteps=50))
    x0 = torch.rand((3, 1, 8, 8), generator=gen(0)) * 2 - 1
    y = torch.tensor([0, 2, 1])
    fast = diffusion_loss(model, s, x0, y, generator=gen(5), num_draws=k)
    t, noise = draw_timesteps_and_noise(s, x0, k, generator=gen(5))
    assert t.shape == (k, 3) and noise.shape == (k, 3, 1, 8, 8)
    slow = torch.stack(
        [diffusion_loss_from_draws(model, s, x0, t[i], noise[i], y) for i in range(k)]
    ).mean(0)
    assert fast.shape == (3,)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        diffusion_loss(model, s, x0, y, generator=gen(5), num_draws=0)


def test_denoising_loss_at() -> None:
    model = randomize_(tiny_unet())
    s = NoiseSchedule.from_config(DiffusionConfig(timesteps=50))
    x0 = torch.rand((3, 1, 8, 8), generator=gen(0)) * 2 - 1
    a = denoising_loss_at(model, s, x0, 10, generator=gen(2))
    b = denoising_loss_at(model, s, x0, torch.tensor([10, 10, 10]), generator=gen(2))
    assert a.shape == (3,)
    torch.testing.assert_close(a, b)
    noise = torch.randn(x0.shape, generator=gen(2))
    t = torch.full((3,), 10)
    expected = (model(q_sample(s, x0, t, noise), t) - noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(a, expected)
    with pytest.raises(ValueError):
        denoising_loss_at(model, s, x0, 50, generator=gen(2))


# --------------------------------------------------------------------------- samplers


def test_ddim_timesteps() -> None:
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    assert ddim_timesteps(100, 1) == [99]
    ts = ddim_timesteps(1000, 37)
    assert ts[0] == 999 and ts[-1] == 0 and len(set(ts)) == 37 and ts == sorted(ts, reverse=True)
    with pytest.raises(ValueError):
        ddim_timesteps(10, 11)
    with pytest.raises(ValueError):
        ddim_timesteps(10, 0)


def test_samplers_shape_range_determinism() -> None:
    model = randomize_(tiny_unet(), seed=3)
    s = NoiseSchedule.from_config(DiffusionConfig(timesteps=20))
    a = ddpm_sample(model, s, (3, 1, 8, 8), generator=gen(0), device="cpu")
    assert a.shape == (3, 1, 8, 8) and a.abs().max() <= 1
    torch.testing.assert_close(
        a, ddpm_sample(model, s, (3, 1, 8, 8), generator=gen(0), device="cpu")
    )
    b = ddim_sample(model, s, (3, 1, 8, 8), steps=7, generator=gen(0), device="cpu")
    assert b.shape == (3, 1, 8, 8) and b.abs().max() <= 1
    torch.testing.assert_close(
        b, ddim_sample(model, s, (3, 1, 8, 8), steps=7, generator=gen(0), device="cpu")
    )
    c = ddim_sample(model, s, (3, 1, 8, 8), steps=7, eta=1.0, generator=gen(0), device="cpu")
    assert c.abs().max() <= 1 and not torch.allclose(b, c)


def test_ddim_eta1_full_steps_equals_ddpm() -> None:
    """Song et al. 2021: DDIM with eta = 1 on all T steps is DDPM with beta_tilde variance."""
    model = randomize_(tiny_unet(), seed=5)
    s = NoiseSchedule.from_config(DiffusionConfig(timesteps=15, schedule="cosine"))
    a = ddpm_sample(model, s, (2, 1, 8, 8), generator=gen(9), device="cpu")
    b = ddim_sample(model, s, (2, 1, 8, 8), steps=15, eta=1.0, generator=gen(9), device="cpu")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sample_batches_modes_and_labels() -> None:
    model = randomize_(tiny_unet(class_conditional=True, num_classes=3, dropout=0.5), seed=1)
    s = NoiseSchedule.from_config(DiffusionConfig(timesteps=10))
    model.train()
    out = sample(model, s, 5, (1, 8, 8), steps=4, generator=gen(0), device="cpu", batch_size=2)
    assert out.shape == (5, 1, 8, 8) and out.abs().max() <= 1
    assert model.training  # mode restored
    again = sample(model, s, 5, (1, 8, 8), steps=4, generator=gen(0), device="cpu", batch_size=5)
    torch.testing.assert_close(out, again)  # eval mode (no dropout), batching-independent for DDIM
    y = torch.tensor([0, 1, 2, 0, 1])
    ddpm = sample(model, s, 5, (1, 8, 8), sampler="ddpm", y=y, generator=gen(0), device="cpu")
    assert ddpm.shape == (5, 1, 8, 8)
    model.eval()
    sample(model, s, 1, (1, 8, 8), steps=2, generator=gen(0), device="cpu")
    assert not model.training

    class Wrapper(torch.nn.Module):  # like Opacus' GradSampleModule: no attribute forwarding
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self._module = inner

        def forward(self, *args: Any) -> torch.Tensor:
            return self._module(*args)

    wrapped = sample(Wrapper(model), s, 5, (1, 8, 8), steps=4, generator=gen(0), device="cpu")
    torch.testing.assert_close(wrapped, out)  # labels drawn the same way through the wrapper
    with pytest.raises(ValueError):
        sample(model, s, 2, (1, 8, 8), steps=11, generator=gen(0), device="cpu")
    with pytest.raises(ValueError):
        bad: Any = "euler"
        sample(model, s, 2, (1, 8, 8), sampler=bad, generator=gen(0), device="cpu")


def test_overfit_single_image() -> None:
    """A tiny UNet trained on one image: DDIM samples from fresh noise should reproduce it."""
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=16, channel_mults=(1,), norm_groups=4), 1, 8)
    s = NoiseSchedule.from_config(DiffusionConfig(timesteps=100, beta_end=0.1))
    target = torch.full((1, 1, 8, 8), -0.8)
    target[..., 2:6, 2:6] = 0.8
    untrained = sample(model, s, 16, (1, 8, 8), steps=20, generator=gen(1), device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = gen(0)
    for _ in range(300):
        loss = diffusion_loss(model, s, target.expand(16, -1, -1, -1), generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = sample(model, s, 16, (1, 8, 8), steps=20, generator=gen(1), device="cpu")
    err = (out - target).abs().mean().item()
    assert (untrained - target).abs().mean().item() > 0.5
    assert err < 0.2, err  # observed 0.05-0.13 over seeds


# --------------------------------------------------------------------------- EMA


def test_ema_math_and_round_trip() -> None:
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0]]))
        model.bias.fill_(1.0)
    ema.update(model)
    ema.update(model)
    # s1 = 0.9 s0 + 0.1 p ; s2 = 0.9 s1 + 0.1 p
    w1 = 0.9 * torch.tensor([[1.0, 2.0]]) + 0.1 * torch.tensor([[3.0, 0.0]])
    w2 = 0.9 * w1 + 0.1 * torch.tensor([[3.0, 0.0]])
    torch.testing.assert_close(ema.state_dict()["weight"], w2)
    torch.testing.assert_close(ema.state_dict()["bias"], torch.tensor([0.19]))

    sd = ema.state_dict()
    other = EMA(torch.nn.Linear(2, 1), decay=0.9)
    other.load_state_dict(sd)
    sd["weight"].zero_()  # state_dict is a copy
    target = torch.nn.Linear(2, 1)
    other.copy_to(target)
    torch.testing.assert_close(target.weight.detach(), w2)
    torch.testing.assert_close(ema.state_dict()["weight"], w2)
    with pytest.raises(KeyError):
        other.load_state_dict({"weight": w2})
    with pytest.raises(ValueError):
        EMA(model, decay=1.5)


def test_ema_on_unet() -> None:
    model = tiny_unet()
    ema = EMA(model, decay=0.5)
    assert set(ema.state_dict()) == {n for n, _ in model.named_parameters()}
    randomize_(model)
    ema.update(model)
    fresh = tiny_unet()
    ema.copy_to(fresh)
    for (n, p), (_, q0), (_, q) in zip(
        tiny_unet().named_parameters(),
        fresh.named_parameters(),
        model.named_parameters(),
        strict=True,
    ):
        torch.testing.assert_close(q0, 0.5 * p + 0.5 * q, msg=n)
