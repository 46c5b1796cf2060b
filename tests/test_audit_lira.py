"""LiRA: the Gaussian likelihood-ratio maths, and the whole shadow-model pipeline on
nearest-neighbour "memoriser" denoisers (fast, and the answer is known)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from securefed.audit.attacks import AttackContext, build_attack
from securefed.audit.attacks.lira import lira_offline_scores, lira_online_scores
from securefed.audit.metrics import roc_auc
from securefed.data import ImageDataset
from securefed.diffusion import NoiseSchedule
from tests.helpers import audit_config


def test_offline_and_online_scores_match_the_formulas() -> None:
    rng = np.random.default_rng(0)
    s, n = 12, 5
    phis = rng.normal(size=(s, n))
    inm = rng.random((s, n)) < 0.5
    inm[:2], inm[2:4] = True, False  # every example has >= 2 IN and >= 2 OUT shadows
    phi = rng.normal(size=n)
    out = np.where(~inm, phis, np.nan)
    inn = np.where(inm, phis, np.nan)
    # per-example variances (as with >= 32 shadows)
    off = lira_offline_scores(phi, out, global_variance=False)
    on = lira_online_scores(phi, inn, out, global_variance=False)
    for j in range(n):
        o, i = phis[~inm[:, j], j], phis[inm[:, j], j]
        assert off[j] == pytest.approx((phi[j] - o.mean()) / o.std())
        ref = stats.norm.logpdf(phi[j], i.mean(), i.std()) - stats.norm.logpdf(
            phi[j], o.mean(), o.std()
        )
        assert on[j] == pytest.approx(ref)
    # global variance: one pooled standard deviation of the residuals
    g = lira_offline_scores(phi, out, global_variance=True)
    mu = np.nanmean(out, axis=0)
    assert g == pytest.approx((phi - mu) / np.nanstd(out - mu))


class Memoriser(nn.Module):
    """eps_theta(x_t, t) = (x_t - sqrt(ab_t) x0*) / sqrt(1 - ab_t) with x0* the training image
    nearest to x_t / sqrt(ab_t): a denoiser that has memorised exactly its training set."""

    def __init__(self, train: torch.Tensor, ab: torch.Tensor) -> None:
        super().__init__()
        self.train_x, self.ab = train.reshape(train.shape[0], -1), ab

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: object = None) -> torch.Tensor:
        a = self.ab[t].view(-1, 1)
        flat = x.reshape(x.shape[0], -1)
        nearest = self.train_x[torch.cdist(flat / a.sqrt(), self.train_x).argmin(dim=1)]
        return ((flat - a.sqrt() * nearest) / (1 - a).sqrt()).view_as(x)


@pytest.mark.parametrize("online", [False, True])
def test_lira_pipeline_finds_memorised_members(online: bool) -> None:
    sched = NoiseSchedule.from_config(audit_config(128, 0.5).diffusion)
    ab = sched.alphas_cumprod.to(torch.float32)
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(120, 1, 8, 8, generator=g) * 2 - 1
    members, nonmembers, reference = pool[:30], pool[30:60], pool[60:]

    def ds(x: torch.Tensor) -> ImageDataset:
        return ImageDataset(x, torch.zeros(x.shape[0], dtype=torch.int64), 1, "rand", ("0",))

    trained_on: list[int] = []

    def train_shadow(data: ImageDataset, seed: int) -> nn.Module:
        trained_on.append(len(data))
        return Memoriser(data.images, ab)

    ctx = AttackContext(sched, torch.device("cpu"), seed=0)
    attack = build_attack(
        "lira_online" if online else "lira_offline",
        ctx,
        {"num_shadows": 8, "timesteps": [30], "num_draws": 2, "progress": False},
        train_shadow=train_shadow,
    )
    targets = ds(torch.cat([members, nonmembers]))
    attack.fit(ds(reference), targets=targets if online else None)
    assert len(trained_on) == 8 and max(trained_on) < (120 if online else 60)
    target = Memoriser(members, ab)
    auc = roc_auc(attack.score(target, members), attack.score(target, nonmembers))
    assert auc >= 0.95
    # a target that memorised other images gives members no advantage
    decoy = Memoriser(reference, ab)
    auc_decoy = roc_auc(attack.score(decoy, members), attack.score(decoy, nonmembers))
    assert 0.25 <= auc_decoy <= 0.75
