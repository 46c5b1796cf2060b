"""Attacks have teeth: an overfit non-DP DDPM is caught; attack mechanics are exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from securefed.audit.attacks import (
    AttackContext,
    AttackError,
    build_attack,
    ddim_map,
)
from securefed.audit.harness import train_model
from securefed.audit.metrics import roc_auc
from securefed.builders import build_model, prepare_data
from securefed.diffusion import NoiseSchedule
from securefed.diffusion.params import set_flat
from tests.helpers import audit_config


@pytest.fixture(scope="module")
def overfit() -> tuple[nn.Module, torch.Tensor, torch.Tensor, AttackContext]:
    """64 digits, 300 full-size steps without DP: the model memorises its members."""
    cfg = audit_config(128, 0.5)
    data = prepare_data(cfg)
    assert len(data.members) == 64 and len(data.holdout) == 64
    trained = train_model(cfg, data.members, steps=300, seed=0)
    model = build_model(cfg, data.members.image_shape, 10)
    set_flat(model, trained.params)
    ctx = AttackContext(NoiseSchedule.from_config(cfg.diffusion), torch.device("cpu"), seed=0)
    return model.eval(), data.members.images, data.holdout.images, ctx


@pytest.mark.parametrize("name", ["loss", "pia"])
def test_overfit_model_is_caught(overfit, name: str) -> None:
    model, members, holdout, ctx = overfit
    attack = build_attack(name, ctx)
    auc = roc_auc(attack.score(model, members), attack.score(model, holdout))
    assert auc >= 0.8, f"{name} AUC {auc:.3f} on an overfit model"


def test_other_attacks_run_and_scores_are_reproducible(overfit) -> None:
    model, members, _, ctx = overfit
    for name in ("secmi", "pian"):
        a = build_attack(name, ctx)
        s1, s2 = a.score(model, members), a.score(model, members)
        assert s1.shape == (64,) and np.isfinite(s1).all() and np.array_equal(s1, s2)
    loss = build_attack("loss", ctx, {"num_draws": 2})
    # same seed, same noise per example: batch size does not change the scores' noise order
    # within one batch, and a different seed changes them
    other = build_attack("loss", AttackContext(ctx.schedule, ctx.device, seed=1), {"num_draws": 2})
    assert not np.array_equal(loss.score(model, members), other.score(model, members))


class _Oracle(nn.Module):
    """A perfect denoiser for a single training image x*: eps(x_t, t) = (x_t - sqrt(ab) x*) /
    sqrt(1 - ab)."""

    def __init__(self, x_star: torch.Tensor, ab: torch.Tensor) -> None:
        super().__init__()
        self.x, self.ab = x_star, ab

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: object = None) -> torch.Tensor:
        a = self.ab[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.x) / (1 - a).sqrt()


def test_secmi_round_trip_is_exact_for_a_perfect_denoiser_of_its_member() -> None:
    sched = NoiseSchedule.from_config(audit_config(128, 0.5).diffusion)
    ab = sched.alphas_cumprod.to(torch.float64)
    g = torch.Generator().manual_seed(0)
    x_star = torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    oracle = _Oracle(x_star, ab)
    abl = ab.tolist()
    xt = math.sqrt(abl[30]) * x_star + math.sqrt(1 - abl[30]) * torch.randn(
        1, 1, 8, 8, generator=g, dtype=torch.float64
    )
    back = ddim_map(oracle, ddim_map(oracle, xt, 30, 40, abl, None), 40, 30, abl, None)
    assert torch.allclose(back, xt, atol=1e-9)
    ctx = AttackContext(sched, torch.device("cpu"))
    secmi = build_attack("secmi", ctx)
    other = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    s = secmi.score(oracle, torch.cat([x_star, other]))
    assert s[0] == pytest.approx(0.0, abs=1e-9) and (s[1:] <= s[0]).all()
    pia = build_attack("pia", ctx)
    assert pia.score(oracle, torch.cat([x_star, other])).argmax() == 0


def test_bad_settings_are_refused() -> None:
    ctx = AttackContext(NoiseSchedule.from_config(audit_config(128, 0.5).diffusion), "cpu")  # type: ignore[arg-type]
    with pytest.raises(AttackError, match="unknown attack"):
        build_attack("gsa", ctx)
    with pytest.raises(AttackError, match="t_sec"):
        build_attack("secmi", ctx, {"t_sec": 99, "interval": 5})
    with pytest.raises(AttackError, match="timesteps"):
        build_attack("loss", ctx, {"timesteps": [100]})
    with pytest.raises(AttackError, match="bad settings"):
        build_attack("pia", ctx, {"norm": 2})
    with pytest.raises(AttackError, match="shadow"):
        build_attack("lira_offline", ctx)
