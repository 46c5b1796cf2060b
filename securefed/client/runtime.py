"""One client's local step of a round: the single implementation both transports run.

The in-process simulation (:class:`securefed.federation.simulation.Simulation`) and a deployed
site (:class:`securefed.deploy.node.Site`) call :func:`local_round`; neither re-implements seeding,
the trainer call, the strategy's client hooks or the charge-before-release rule, so the two paths
cannot drift apart (a deployed round equals the simulated one within the masking grid, with
equal ledgers: ``tests/test_deploy.py``, ``tests/test_flower_simulation.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from securefed.client.dp import DPLocalTrainer, train_private_charged
from securefed.client.trainer import LocalTrainer
from securefed.seeds import Purpose, derive_seed

if TYPE_CHECKING:
    import torch

    from securefed.client.trainer import LocalResult
    from securefed.config import ExperimentConfig
    from securefed.data import ImageDataset
    from securefed.diffusion import NoiseSchedule
    from securefed.strategies import ClientPolicy, ClientUpdate

__all__ = ["build_trainer", "local_round"]


def build_trainer(
    cfg: ExperimentConfig, model: torch.nn.Module, schedule: NoiseSchedule, device: torch.device
) -> Any:
    """The client trainer for ``cfg`` (one choice for every transport): DP-SGD
    (:class:`~securefed.client.dp.DPLocalTrainer`) when ``dp.level: record``, else the plain
    :class:`~securefed.client.trainer.LocalTrainer` (client-level DP clips and noises the update,
    not the steps)."""
    conditional = cfg.model.class_conditional
    if cfg.dp.level == "record":
        return DPLocalTrainer(model, schedule, cfg.client, cfg.dp, device, conditional)
    return LocalTrainer(model, schedule, cfg.client, device, conditional)


def local_round(
    cfg: ExperimentConfig,
    policy: ClientPolicy,
    trainer: Any,
    cid: int,
    data: ImageDataset,
    broadcast: Mapping[str, torch.Tensor],
    client_state: Mapping[str, torch.Tensor],
    rnd: int,
    privacy: Any | None,
    *,
    progress: object | None = None,
    canaries: Any | None = None,
    client_level_charge: float | None = None,
) -> tuple[ClientUpdate, LocalResult] | None:
    """Client ``cid``'s local training and update of round ``rnd``.

    - the training seed is ``derive_seed(cfg.seed, TRAIN, rnd, cid)`` (initial noise draws of the
      plain trainer); DP-SGD's Poisson coins and Gaussian noise come from the client-round's
      secret-keyed source ``privacy.noise_source(rnd, cid)``, never from the seed;
    - ``dp.level: record``: DP-SGD, charged and persisted at the noise multiplier and sample rate
      actually used BEFORE this returns (so before the update can leave the client); a replay of
      an already charged round is free only if it reproduces the released update's digest;
    - ``dp.level: client``: one participation charged at ``client_level_charge`` (the round
      noise plan's worst-case multiplier, sample rate 1), persisted before this returns.

    Args:
        policy: the strategy's client role (:attr:`Strategy.client`).
        broadcast: the round's broadcast vectors (name -> ``[D]``).
        client_state: the client's private persistent state (read; the new state is in the
            returned update and is committed by the caller only if the update was used).
        privacy: the client's :class:`~securefed.federation.simulation.PrivacyContext` or None.
        canaries: the audit's :class:`~securefed.privacy.canaries.ClientCanaries` hook for this
            client-round (record-level DP only), or None.

    Returns:
        ``(update, local_result)``, or None when the client must release nothing this round (a
        replayed round whose fresh-noise retrain its budget cannot pay for); the caller marks
        it exhausted.
    """
    start = policy.start_params(cid, broadcast, client_state)
    objective = policy.local_objective(cid, broadcast, client_state)
    seed = derive_seed(cfg.seed, Purpose.TRAIN, rnd, cid)
    if privacy is not None and privacy.level == "record":
        if not isinstance(trainer, DPLocalTrainer):  # pragma: no cover - wiring error
            raise TypeError("DP run without a DP trainer")
        result = train_private_charged(
            trainer, privacy.ledger, data, start, objective, seed, client_id=cid, round=rnd,
            noise_multiplier=privacy.noise_multipliers[cid],
            noise_source=privacy.noise_source(rnd, cid), progress=progress, canaries=canaries,
        )
        if result is None:
            return None
    else:
        result = trainer.train(data, start, objective, seed=seed, progress=progress)
    update = policy.client_update(
        cid, broadcast, result.params, result.num_examples, result.steps, cfg.client.lr,
        client_state, result.mean_grad,
    )
    if privacy is not None and privacy.level == "client":
        if client_level_charge is None:  # pragma: no cover - wiring error
            raise TypeError("dp.level client: pass the round's client_level_charge")
        # one participation, charged (and persisted) before the upload
        privacy.ledger.charge(
            cid, phase="round", round=rnd, steps=1, noise_multiplier=client_level_charge,
            sample_rate=1.0,
        )
    return update, result
