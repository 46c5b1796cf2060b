"""Client-level DP: DP-FedAvg with central or distributed Gaussian noise and adaptive clipping.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models", ICLR): every participating client clips its model delta to L2 norm ``S``; the
SUM of the clipped deltas carries Gaussian noise of std ``z S``; the server divides by the number
of contributors (public: the aggregation protocol reveals who survived). With a trusted server
(``secure_aggregation.protocol: plain``) the server adds the noise; under secure aggregation each
client adds a share before its vector leaves it (masking: a discrete Gaussian share in the
protocol's integer domain, Kairouz, Liu, Steinke 2021; CKKS: a float share before encryption),
so nobody ever sees an un-noised sum.

Adjacency and accounting. The guarantee protects the CONTENT of each client's contribution
(zero-out adjacency, Kairouz et al. 2021 §2): who took part in a round is visible to the server,
as in any secure aggregation. Because the server knows whom it selected, client sampling gives
no amplification against it, so each client's ledger is charged ``1`` step at sample rate ``1``
for every round it trains in, at the effective noise multiplier

    z_eff = noise_std_of_the_survivors_sum / (L + e),

where ``L`` is the L2 sensitivity of one client's vector (``S``, or ``S sqrt(1 + z^2 / (4
sigma_b^2))`` with adaptive clipping, below) and ``e`` the extra sensitivity of the protocol's
encoding (stochastic rounding onto the masking grid: ``2 sqrt(D)`` grid steps). The charge is made
BEFORE the update leaves the client, for the WORST case the protocol can complete with (only the
Shamir-threshold number of survivors, whose shares carry ``t / m`` of the planned variance): a
dropout can only make the realised guarantee better than what was charged, never worse.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping", NeurIPS, Algorithm 1): each client also sends the bit
``b = 1[||delta|| <= S]`` centred and scaled, ``(b - 1/2) beta``, in the same noised vector; the
server estimates the unclipped fraction and moves ``S <- S exp(-eta (b_hat - gamma))``. The bit
noise in count units is ``sigma_b = z_upd S / beta``; the update noise multiplier ``z_upd`` is
raised so that the whole vector still has effective multiplier ``z``:
``z_upd = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (their Theorem 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from securefed.config import DPConfig, SecureAggregationConfig
from securefed.secagg.base import DistributedNoise
from securefed.secagg.guarantees import encoding_sensitivity, min_survivors
from securefed.strategies.base import (
    ClientPolicy,
    ClientPolicyWrapper,
    ClientUpdate,
    CohortSum,
    RoundPlan,
    Strategy,
    StrategyWrapper,
    only_cohort,
)

__all__ = [
    "ClientLevelDP",
    "ClientLevelDPClient",
    "RoundNoise",
    "clip_update",
    "effective_noise_multiplier",
    "geometric_clip_update",
    "unclipped_fraction",
    "update_noise_multiplier",
]


def clip_update(delta: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, float]:
    """``delta * min(1, S / ||delta||)`` and the norm before clipping.

    Args:
        delta: ``[D]`` model delta.
        max_norm: ``S > 0``.
    """
    if not max_norm > 0:
        raise ValueError(f"dp.max_update_norm: must be > 0, got {max_norm}")
    norm = float(torch.linalg.vector_norm(delta.to(torch.float64)))
    if not math.isfinite(norm):
        raise ValueError("client update contains NaN or infinite values")
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return delta * factor, norm


def update_noise_multiplier(z_total: float, sigma_b: float | None) -> float:
    """Andrew et al. 2021, Thm 1: the delta's noise multiplier that, together with the clipped
    count noised at ``sigma_b``, gives the whole release the multiplier ``z_total``.

    ``sigma_b = None`` (fixed clipping): ``z_total``.

    Raises:
        ValueError: ``sigma_b`` too small for ``z_total`` (needs ``2 sigma_b > z_total``).
    """
    if sigma_b is None:
        return z_total
    inv = z_total**-2 - (2.0 * sigma_b) ** -2
    if inv <= 0:
        raise ValueError(
            f"dp.clipped_count_stddev: {sigma_b} is too small for noise multiplier {z_total:.4g} "
            f"(needs > {z_total / 2:.4g}); raise it or lower the privacy target"
        )
    return inv**-0.5


def effective_noise_multiplier(
    noise_std: float, sensitivity: float, encoding_sensitivity: float = 0.0
) -> float:
    """``z_eff = noise_std / (sensitivity + encoding_sensitivity)`` (Gaussian mechanism)."""
    if sensitivity <= 0:
        raise ValueError(f"sensitivity must be > 0, got {sensitivity}")
    return noise_std / (sensitivity + max(0.0, encoding_sensitivity))


def geometric_clip_update(
    clip: float, unclipped_fraction: float, target: float, lr: float
) -> float:
    """Andrew et al. 2021, Eq. 3: ``S <- S exp(-eta (b_hat - gamma))``."""
    return float(clip * math.exp(-lr * (unclipped_fraction - target)))


def unclipped_fraction(unclipped_sum: float, bit_scale: float, num_contributors: int) -> float:
    """Andrew et al. 2021, Algorithm 1: the noised fraction ``b_hat`` of contributors whose
    delta was not clipped, from the released sum of their centred, scaled clip bits
    ``sum_i (b_i - 1/2) beta`` (plus noise): ``sum / beta / n + 1/2``."""
    return float(unclipped_sum) / bit_scale / num_contributors + 0.5


@dataclass(frozen=True)
class RoundNoise:
    """The round's noise plan, public and fixed before any client trains.

    Attributes:
        clip: ``S`` for this round.
        update_multiplier: ``z_upd``: the noise on the full sum has std ``z_upd * S``.
        sensitivity: ``L`` of one client's packed vector (input units).
        charged_multiplier: what each participant is charged: the effective multiplier if only
            ``min_survivors`` of the ``participants`` survive.
        participants: ``m``, clients that may contribute a share this round.
        min_survivors: fewest survivors with which the protocol releases a sum.
        bit_scale: ``beta`` of the centred clip bit (0 when clipping is fixed).
    """

    clip: float
    update_multiplier: float
    sensitivity: float
    charged_multiplier: float
    participants: int
    min_survivors: int
    bit_scale: float

    @property
    def std(self) -> float:
        return self.update_multiplier * self.clip

    def noise(self) -> DistributedNoise:
        return DistributedNoise(std=self.std, expected=self.participants)


class ClientLevelDP(StrategyWrapper):
    """Wraps FedAvg/FedProx: clipped deltas, noised sum, per-participation ledger charges.

    Args:
        base: the wrapped strategy (its local objective, server optimiser and EMA are used).
        dp: the ``dp`` config (``level: client``).
        secagg: the ``secure_aggregation`` config (decides central vs distributed noise and the
            worst-case survivors).
        noise_multiplier: ``z`` calibrated for the planned participations (effective, i.e. what
            the accountant is charged per participation).
    """

    name = "client_dp"
    layer = "client_dp"

    def __init__(
        self,
        base: Strategy,
        dp: DPConfig,
        secagg: SecureAggregationConfig,
        noise_multiplier: float,
    ) -> None:
        self.dp = dp
        super().__init__(base)
        self.secagg = secagg
        self.z = float(noise_multiplier)
        self.clip = float(dp.max_update_norm)
        self.current: RoundNoise | None = None
        self.last_unclipped_fraction: float | None = None

    # ------------------------------------------------------------------ noise plan
    def sigma_b(self, participants: int, z_target: float) -> float | None:
        """Noise std on the unclipped count: configured, else ``max(m / 20, the value that
        raises the delta's noise by only 5%)`` (Andrew et al. recommend ``m / 20`` for the large
        cohorts of cross-device FL; a small hospital federation needs the second term)."""
        if not self.dp.adaptive_clipping:
            return None
        if self.dp.clipped_count_stddev is not None:
            return float(self.dp.clipped_count_stddev)
        return max(participants / 20.0, 0.5 * z_target / math.sqrt(1.0 - 1.0 / 1.05**2))

    def min_survivors(self, participants: int) -> int:
        """The protocol's worst-case survivors (``secagg.guarantees.min_survivors``)."""
        return min_survivors(self.secagg, participants)

    def round_noise(self, participants: int, vector_length: int) -> RoundNoise:
        """The noise plan of a round with ``participants`` clients and packed length ``D``."""
        m = max(1, participants)
        s_min = self.min_survivors(m)
        frac = s_min / m  # worst case: only the threshold's shares reach the sum
        z_target = self.z / math.sqrt(frac)
        sigma_b = self.sigma_b(m, z_target)
        z_upd = update_noise_multiplier(z_target, sigma_b)
        beta = 0.0 if sigma_b is None else z_upd * self.clip / sigma_b
        sens = math.sqrt(self.clip**2 + (beta / 2.0) ** 2)
        enc = 0.0
        for _ in range(3):  # the masking grid widens with the noise: a short fixed point
            std = z_upd * self.clip
            enc = self._encoding_sensitivity(std, m, vector_length)
            z_upd_needed = z_target * (sens + enc) / sens
            z_upd = update_noise_multiplier(z_upd_needed, sigma_b)
            beta = 0.0 if sigma_b is None else z_upd * self.clip / sigma_b
            sens = math.sqrt(self.clip**2 + (beta / 2.0) ** 2)
        std = z_upd * self.clip
        enc = self._encoding_sensitivity(std, m, vector_length)
        charged = effective_noise_multiplier(std * math.sqrt(frac), sens, enc)
        return RoundNoise(
            clip=self.clip,
            update_multiplier=z_upd,
            sensitivity=sens,
            charged_multiplier=charged,
            participants=m,
            min_survivors=s_min,
            bit_scale=beta,
        )

    def _encoding_sensitivity(self, std: float, m: int, length: int) -> float:
        return encoding_sensitivity(self.secagg, std, m, length)

    def _current(self) -> RoundNoise:
        if self.current is None:
            raise RuntimeError("ClientLevelDP: configure_round must run before the round's noise")
        return self.current

    def current_charge(self) -> float:
        """The noise multiplier each participant of the current round is charged."""
        return self._current().charged_multiplier

    def current_noise(self) -> DistributedNoise:
        """What the aggregation protocol must add to the current round's sum."""
        return self._current().noise()

    def round_summary(self, info: Mapping[str, object]) -> dict[str, float | int | None]:
        """For ``metrics.jsonl``: the plan, and the multiplier the survivors actually realised
        (from the protocol's ``noise_std_total``; at least the charged one)."""
        cur = self._current()
        realised = None
        std = info.get("noise_std_total")
        if isinstance(std, (int, float)):
            enc = info.get("encoding_sensitivity", 0.0)
            realised = effective_noise_multiplier(
                float(std), cur.sensitivity, float(enc) if isinstance(enc, (int, float)) else 0.0
            )
        return {
            "clip": cur.clip,
            "noise_std": cur.std,
            "charged_multiplier": cur.charged_multiplier,
            "realised_multiplier": realised,
            "min_survivors": cur.min_survivors,
            "unclipped_fraction": self.last_unclipped_fraction,
            "next_clip": self.clip,
        }

    # ------------------------------------------------------------------ Strategy hooks
    def configure_round(
        self,
        rnd: int,
        global_params: torch.Tensor,
        available: Sequence[int],
        fraction: float,
        minimum: int,
        rng: np.random.Generator,
    ) -> RoundPlan:
        """The base strategy's selection, plus the round's public noise plan: ``broadcast["clip"]
        = [S, beta]`` (clip norm and clip-bit scale); :attr:`current` holds the plan."""
        plan = self.base.configure_round(rnd, global_params, available, fraction, minimum, rng)
        length = global_params.numel() + (2 if self.dp.adaptive_clipping else 1)
        self.current = self.round_noise(len(plan.clients), length)
        broadcast = dict(plan.broadcast)
        broadcast["clip"] = torch.tensor(
            [self.current.clip, self.current.bit_scale], dtype=torch.float64
        )
        return RoundPlan(round=plan.round, clients=plan.clients, broadcast=broadcast)

    def aggregate(
        self, rnd: int, global_params: torch.Tensor, results: Mapping[str, CohortSum]
    ) -> torch.Tensor:
        r = only_cohort(rnd, results, weighted=False)
        sums, num_contributors = r.sums, r.num_contributors
        mean = sums["delta"].to(torch.float32) / num_contributors
        new = self.server_opt.step(global_params, mean)
        bit_scale = self.current.bit_scale if self.current is not None else 0.0
        if self.dp.adaptive_clipping and "unclipped" in sums and bit_scale > 0:
            frac = unclipped_fraction(
                float(sums["unclipped"].reshape(-1)[0]), bit_scale, num_contributors
            )
            self.last_unclipped_fraction = frac
            self.clip = geometric_clip_update(
                self.clip, frac, self.dp.target_unclipped_quantile, self.dp.clip_learning_rate
            )
        return new

    def own_state(self) -> dict[str, torch.Tensor]:
        return {"clip": torch.tensor([self.clip], dtype=torch.float64)}

    def load_own_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if "clip" in state:
            self.clip = float(state["clip"][0])

    def make_client_policy(self) -> ClientPolicy:
        return ClientLevelDPClient(self.base.client, self.dp.adaptive_clipping)


class ClientLevelDPClient(ClientPolicyWrapper):
    """The client of DP-FedAvg: it trains as its base policy says, then uploads its delta
    clipped to the round's broadcast clip norm (unweighted) and, with adaptive clipping, its
    centred, scaled clip bit. Its noise share is added by the aggregation protocol."""

    def __init__(self, base: ClientPolicy, adaptive: bool) -> None:
        super().__init__(base)
        self.adaptive = adaptive

    def client_update(
        self,
        cid: int,
        broadcast: Mapping[str, torch.Tensor],
        local_params: torch.Tensor,
        num_examples: int,
        local_steps: int,
        lr: float,
        client_state: Mapping[str, torch.Tensor],
        mean_grad: torch.Tensor | None = None,
    ) -> ClientUpdate:
        """Clipped delta (unweighted: every client counts once) and, with adaptive clipping,
        the centred, scaled clip bit. The weight is ``1``: the server divides by the number of
        contributors, which the protocol reveals anyway."""
        clip, bit_scale = (float(v) for v in broadcast["clip"])
        delta = local_params.to(torch.float32) - broadcast["params"]
        clipped, norm = clip_update(delta, clip)
        vectors: dict[str, torch.Tensor] = {"delta": clipped}
        if self.adaptive:
            bit = (1.0 if norm <= clip else 0.0) - 0.5
            vectors["unclipped"] = torch.tensor([bit * bit_scale], dtype=torch.float32)
        return ClientUpdate(vectors=vectors, weight=1.0)
