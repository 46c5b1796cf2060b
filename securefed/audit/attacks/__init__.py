"""Membership-inference attacks on diffusion models; registry keyed by the names used in
threat models and on the command line (``--attacks loss,pia``)."""

from __future__ import annotations

from typing import Any

from securefed.audit.attacks.base import Attack, AttackContext, AttackError, scaled_timestep
from securefed.audit.attacks.lira import LiRAAttack, ShadowTrainer
from securefed.audit.attacks.loss import LossAttack, denoising_losses
from securefed.audit.attacks.pia import PIAAttack, PIANAttack, pia_distance
from securefed.audit.attacks.secmi import SecMIAttack, ddim_map

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "AttackError",
    "LiRAAttack",
    "LossAttack",
    "PIAAttack",
    "PIANAttack",
    "SecMIAttack",
    "ShadowTrainer",
    "build_attack",
    "ddim_map",
    "denoising_losses",
    "pia_distance",
    "scaled_timestep",
]

#: attack name -> class (LiRA's two modes share a class)
ATTACKS: dict[str, type[Attack]] = {
    "loss": LossAttack,
    "secmi": SecMIAttack,
    "pia": PIAAttack,
    "pian": PIANAttack,
    "lira_offline": LiRAAttack,
    "lira_online": LiRAAttack,
}


def build_attack(
    name: str,
    ctx: AttackContext,
    params: dict[str, Any] | None = None,
    train_shadow: ShadowTrainer | None = None,
) -> Attack:
    """An attack by registry name with keyword settings (e.g. ``{"t": 20}`` for PIA)."""
    if name not in ATTACKS:
        raise AttackError(f"attack: unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    kwargs = dict(params or {})
    try:
        if name.startswith("lira"):
            return LiRAAttack(
                ctx, train_shadow=train_shadow, online=name == "lira_online", **kwargs
            )
        return ATTACKS[name](ctx, **kwargs)
    except TypeError as exc:
        raise AttackError(f"attack {name}: bad settings {kwargs}: {exc}") from None
