"""The in-process transport of the round engine: simulated clients, dropouts, exact resume.

:class:`InProcessClients` is the :class:`~securefed.federation.engine.ClientTransport` of a
simulation (the Flower deployment is the other one); :class:`SimulationEvaluation` is its
per-round evaluation. The round loop itself is :class:`~securefed.federation.engine.RoundEngine`.

Roles are kept apart: each :class:`SimClient` owns only its own examples and private state; the
server side (strategy + aggregation protocol) receives only the protocol's SUM. Every public random
draw is derived from ``(seed, purpose, round, client, phase)`` (:mod:`securefed.seeds`); DP
noise and Poisson sampling come from the secret run key. A run resumed from the checkpoint after
round k replays rounds k+1.. and keeps a replayed round's charge unless the replay reproduces the
released update's digest (see ``PrivacyLedger``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from securefed.client import LocalTrainer, local_steps_for, set_flat
from securefed.client.dp import sample_rate_for
from securefed.client.runtime import build_trainer, local_round
from securefed.config import ExperimentConfig
from securefed.data import ImageDataset
from securefed.diffusion import NoiseSchedule, diffusion_loss
from securefed.federation.engine import ClientRound, ClientTransport
from securefed.privacy.canaries import ClientCanaryRound
from securefed.privacy.client_level import ClientLevelDP
from securefed.secagg import AggregationAbortedError, AggregationProtocol
from securefed.seeds import Purpose, derive_seed
from securefed.strategies import CohortSum, RoundPlan, Strategy, pack_update, unpack_sum

__all__ = ["InProcessClients", "PrivacyContext", "SimClient", "SimulationEvaluation"]

log = logging.getLogger(__name__)


@dataclass
class SimClient:
    """One simulated site: its own examples and private persistent state only."""

    cid: int
    data: ImageDataset
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PrivacyContext:
    """DP state of the simulated clients (``dp.level: record`` or ``client``).

    Attributes:
        ledger: the persistent privacy ledger (``privacy_ledger.json``).
        noise_multipliers: client id -> noise multiplier calibrated once for its whole plan.
        noise_source: callable ``(round, client) -> noise source`` with ``.normal(shape, std,
            device)``; derived per client-round so a resumed run replays identical noise.
        level: ``record`` (DP-SGD on every client) or ``client`` (DP-FedAvg: the strategy is a
            :class:`~securefed.privacy.client_level.ClientLevelDP` and each participation is
            charged one step at its noise plan's worst-case multiplier, sample rate 1).
        phase_noise_source: callable ``(round, client, phase) -> noise source`` for mechanisms
            other than DP-SGD (phase >= 1, e.g. FedDDPM's histogram release): independent of
            ``noise_source(round, client)``.
    """

    ledger: Any
    noise_multipliers: dict[int, float]
    noise_source: Callable[[int, int], Any]
    level: str = "record"
    phase_noise_source: Callable[[int, int, int], Any] | None = None
    #: audit (``canaries.enabled``): the run's gradient canaries (record level) or canary
    #: clients (client level, :class:`~securefed.privacy.canaries.CanaryClients`) and their folder
    canaries: Any | None = None
    canary_dir: Path | None = None


class InProcessClients(ClientTransport):
    """The simulation's transport: every client in this process, the protocol run in-process.

    Dropouts are simulated from the round's public selection stream (``federation.dropout_prob``:
    a client drops at a uniformly chosen protocol stage); a DP client whose next round would
    exceed its budget does not train. Each client's local step is
    :func:`securefed.client.runtime.local_round` (the deployment's sites run the same).

    Args:
        cfg: the experiment.
        model: the denoiser (one instance, reloaded per client).
        schedule: noise schedule.
        clients: the simulated clients, ids 0..K-1.
        protocol: the aggregation protocol.
        device: where training runs.
        progress: show a progress bar of local steps.
        privacy: the DP state of the clients, or None.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        model: torch.nn.Module,
        schedule: NoiseSchedule,
        clients: list[SimClient],
        protocol: AggregationProtocol,
        device: torch.device,
        *,
        progress: bool = True,
        privacy: PrivacyContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.schedule = schedule.to(device)
        self.clients = clients
        self.protocol = protocol
        self.device = device
        self.progress = progress
        self.privacy = privacy
        # the one trainer choice (DP-SGD for dp.level record); privacy None means no DP here
        self.trainer: LocalTrainer = build_trainer(cfg, model, schedule, device)
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._canary_eps_cache: dict[tuple[float, ...], float] = {}

    def client_ids(self) -> list[int]:
        return [c.cid for c in self.clients]

    def client_states(self) -> dict[int, dict[str, torch.Tensor]]:
        return {c.cid: dict(c.state) for c in self.clients}

    def load_client_states(self, states: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        for c in self.clients:
            c.state = dict(states.get(c.cid, {}))

    def commit(self, rnd: int, participants: list[int]) -> None:
        for cid in sorted(participants):  # private state commits only if the update was used
            self.clients[cid].state.update(self._pending.pop(cid, {}))
        self._pending.clear()

    # ------------------------------------------------------------------ one round
    def run_clients(
        self, rnd: int, plan: RoundPlan, strategy: Strategy, rng: np.random.Generator
    ) -> ClientRound:
        cfg = self.cfg
        seconds: dict[str, float] = {}
        stages = self.protocol.dropout_stages
        dropouts: dict[int, str] = {}
        for cid in plan.clients:
            if cfg.federation.dropout_prob > 0 and rng.random() < cfg.federation.dropout_prob:
                dropouts[cid] = stages[int(rng.integers(len(stages)))]
        exhausted: list[int] = []
        if self.privacy is not None:
            ledger = self.privacy.ledger
            for cid in plan.clients:
                if cid not in dropouts and self._would_exceed(strategy, cid, rnd):
                    # its next round would exceed target_epsilon: it does not train at all
                    ledger.mark_exhausted(cid, rnd)
                    exhausted.append(cid)
                    dropouts[cid] = stages[0]
        trainers = [c for c in plan.clients if dropouts.get(c) != stages[0]]

        # ---- local training (each client sees only its own data)
        t0 = time.perf_counter()
        updates: dict[int, Any] = {}
        losses: list[float] = []
        total_steps = sum(local_steps_for(cfg.client, len(self.clients[c].data)) for c in trainers)
        canaries = None if self.privacy is None else self.privacy.canaries
        canary_scores = np.zeros(0 if canaries is None else len(canaries))
        bar = tqdm(
            total=total_steps,
            desc=f"round {rnd} local steps",
            leave=False,
            disable=not self.progress,
            unit="step",
        )
        charge = None
        if self.privacy is not None and self.privacy.level == "client":
            charge = _client_dp(strategy).current_charge()
        for cid in list(trainers):
            client = self.clients[cid]
            hook = None
            if self.privacy is not None and self.privacy.level == "record" and canaries is not None:
                hook = canaries.for_client(
                    rnd, cid, self.trainer.model, sample_rate_for(cfg.client, len(client.data)),
                    cfg.dp.max_grad_norm,
                )
            out = local_round(
                cfg, strategy.client, self.trainer, cid, client.data, plan.broadcast,
                client.state, rnd, self.privacy, progress=bar, canaries=hook,
                client_level_charge=charge,
            )
            if out is None:  # a replayed round whose fresh-noise retrain exceeds its budget
                if self.privacy is not None:
                    self.privacy.ledger.mark_exhausted(cid, rnd)
                exhausted.append(cid)
                dropouts[cid] = stages[0]
                trainers.remove(cid)
                continue
            updates[cid], result = out
            if hook is not None:
                canary_scores[hook.selected] += hook.scores
            losses.append(result.mean_loss)
        bar.close()
        record_canaries = self.privacy is not None and self.privacy.level == "record"
        if canaries is not None and record_canaries and self.privacy and self.privacy.canary_dir:
            canaries.commit(self.privacy.canary_dir, rnd, canary_scores)  # audit-only, 0600
        canary_round = self._canary_clients_round(strategy, rnd, len(plan.clients))
        seconds["train"] = time.perf_counter() - t0

        # ---- secure aggregation: only the SUM reaches the strategy (one protocol session per
        # upload cohort: clients of a cohort send the same vector keys; normally one cohort)
        t0 = time.perf_counter()
        cohorts = strategy.upload_cohorts(rnd, updates) if updates else {}
        down_numel = {
            cid: strategy.client.download_numel(cid, plan.broadcast, self.clients[cid].state)
            for cid in plan.clients
        }
        aborted: list[str] = []
        results: dict[str, CohortSum] = {}
        survivors: set[int] = set()
        up_bytes = proto_down = params_up = 0
        infos: dict[str, Any] = {}
        agg = None
        if not cohorts:
            aborted.append("no client trained this round")
        for name, members in cohorts.items():
            keys = sorted(next(iter(members.values())).vectors)
            inputs = {cid: pack_update(u.vectors, keys, u.weight) for cid, u in members.items()}
            drops = (
                dropouts if len(cohorts) == 1
                else {c: st for c, st in dropouts.items() if c in members}
            )
            try:
                noise = None
                if self.privacy is not None and self.privacy.level == "client":
                    noise = _client_dp(strategy).current_noise()
                agg = self.protocol.aggregate(rnd, inputs, drops, noise=noise)
            except AggregationAbortedError as exc:
                aborted.append(f"{name}: {exc}" if len(cohorts) > 1 else str(exc))
                continue
            if not agg.survivors:
                continue
            if canary_round is not None:  # canary clients' S u_i join the clipped-delta sum
                sums, total_weight = canary_round.release(agg.total, keys, members)
            else:
                sums, total_weight = unpack_sum(agg.total, keys, members)
            results[name] = CohortSum(sums, total_weight, len(agg.survivors))
            survivors.update(agg.survivors)
            up_bytes += int(sum(agg.bytes_up.values()))
            proto_down += int(sum(agg.bytes_down.values()))
            params_up += len(agg.survivors) * int(next(iter(inputs.values())).shape[0])
            infos[name] = dict(agg.info)
        if canary_round is not None:
            canary_round.commit()  # audit-only, 0600; a replayed round rewrites its file
        seconds["aggregate"] = time.perf_counter() - t0
        self._pending = {cid: dict(updates[cid].new_state) for cid in survivors}

        result_round = ClientRound(
            sums=results,
            trained=trainers,
            participants=sorted(survivors),
            dropped=sorted(dropouts),
            protocol=self.protocol.name,
            mean_local_loss=float(np.mean(losses)) if losses else None,
            exchange={
                "params_up": int(params_up),
                "params_down": int(sum(down_numel.values())),
            },
            seconds=seconds,
        )
        if self.privacy is not None:
            result_round.epsilon = {
                str(c.cid): round(float(self.privacy.ledger.epsilon(c.cid)), 6)
                for c in self.clients
            }
            result_round.budget_exhausted = exhausted
        down_bytes = 4 * sum(down_numel.values())
        if results:
            result_round.bytes_up = up_bytes
            result_round.bytes_down = int(down_bytes + proto_down)
            result_round.protocol_info = infos["all"] if set(infos) == {"all"} else infos
            if aborted:
                result_round.transport["cohorts_abandoned"] = aborted
            if self.privacy is not None and self.privacy.level == "client" and agg is not None:
                result_round.transport["client_dp"] = _client_dp(strategy).round_summary(agg.info)
        else:
            result_round.bytes_down = int(down_bytes)
            result_round.abandoned = "; ".join(aborted) or "every selected client dropped out"
        return result_round

    def _canary_clients_round(self, strategy: Strategy, rnd: int, selected: int) -> Any:
        """The round's canary clients (``dp.level: client`` with ``canaries.enabled``), sampled
        at the real clients' rate ``selected / num_clients`` under the same budget rule, or
        None (:class:`~securefed.privacy.canaries.ClientCanaryRound`)."""
        pc = self.privacy
        if pc is None or pc.level != "client" or pc.canaries is None or pc.canary_dir is None:
            return None

        plan = pc.ledger.get_plan(self.clients[0].cid)
        return ClientCanaryRound.for_round(
            pc.canaries, pc.canary_dir, rnd, selected, len(self.clients), _client_dp(strategy),
            plan.target_epsilon, plan.delta, plan.accountant, self._canary_eps_cache,
        )

    def _would_exceed(self, strategy: Strategy, cid: int, rnd: int | None = None) -> bool:
        """Would the client's next round take its epsilon over the target?"""
        if self.privacy is None:
            return False
        ledger = self.privacy.ledger
        if self.privacy.level == "record" and rnd is not None:
            if ledger.charges_for(cid, "round", rnd):
                # a resumed replay of a charged round: an exact replay costs nothing; a differing
                # one is checked before its fresh-noise retrain (train_private_charged)
                return False
        if self.privacy.level == "client":
            return bool(
                ledger.would_exceed(
                    cid, 1, noise_multiplier=_client_dp(strategy).current_charge(),
                    sample_rate=1.0,
                )
            )
        steps = local_steps_for(self.cfg.client, len(self.clients[cid].data))
        return bool(ledger.would_exceed(cid, steps))

    def can_continue(self, next_round: int, strategy: Strategy) -> str | None:
        """None while some client can afford round ``next_round`` (DP), else the reason."""
        if self.privacy is None:
            return None
        if self.privacy.level == "client":
            # the charge per participation is the calibrated z at the worst-case survivors
            z = _client_dp(strategy).z
            ok = any(
                not self.privacy.ledger.would_exceed(
                    c.cid, 1, noise_multiplier=z, sample_rate=1.0
                )
                for c in self.clients
            )
        else:
            ok = any(not self._would_exceed(strategy, c.cid, next_round) for c in self.clients)
        if ok:
            return None
        return (
            f"every client's privacy budget (dp.target_epsilon={self.cfg.dp.target_epsilon}) is "
            f"exhausted after round {next_round - 1}; the run ends here"
        )


class SimulationEvaluation:
    """The simulation's per-round evaluation (:data:`~securefed.federation.engine.Evaluation`):
    holdout denoising loss every ``evaluation.every`` rounds (and the last), a sample grid, and
    FID etc. every ``evaluation.fid_every`` rounds (and the last). A strategy with client-local
    parts (FedDiffuse UDEC/ULATDEC) is evaluated per client on its composed model.

    Args:
        cfg: the experiment. clients: the transport's clients (their private state composes a
            personalised model). holdout: non-member examples (never reach a client).
        model / schedule / device: for the loss.
        evaluate_quality: ``(round, params) -> dict`` of quality metrics (FID ...), or None.
        on_samples: ``(round, params) -> None`` that writes a sample grid, or None.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        clients: list[SimClient],
        holdout: ImageDataset,
        model: torch.nn.Module,
        schedule: NoiseSchedule,
        device: torch.device,
        *,
        evaluate_quality: Callable[[int, torch.Tensor], dict[str, Any]] | None = None,
        on_samples: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.clients = clients
        self.holdout = holdout
        self.model = model
        self.schedule = schedule.to(device)
        self.device = device
        self.evaluate_quality = evaluate_quality
        self.on_samples = on_samples

    def holdout_loss(self, params: torch.Tensor) -> float:
        """Mean denoising loss of ``params`` on a fixed holdout slice with fixed noise."""
        n = min(len(self.holdout), self.cfg.evaluation.holdout_loss_examples)
        x0 = self.holdout.images[:n].to(self.device)
        y = (
            self.holdout.labels[:n].to(self.device) if self.cfg.model.class_conditional else None
        )
        gen = torch.Generator(device=self.device).manual_seed(
            derive_seed(self.cfg.seed, Purpose.EVAL_LOSS)
        )
        set_flat(self.model, params)
        self.model.eval()
        with torch.no_grad():
            losses = [
                diffusion_loss(
                    self.model,
                    self.schedule,
                    x0[i : i + 256],
                    None if y is None else y[i : i + 256],
                    generator=gen,
                )
                for i in range(0, n, 256)
            ]
        return float(torch.cat(losses).mean())

    def personal_models(
        self, strategy: Strategy, global_params: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """Client id -> its composed ``[D]`` model when the strategy keeps client-local parts
        (FedDiffuse UDEC/ULATDEC); empty when there is one global model."""
        out = {}
        for c in self.clients:
            p = strategy.personal_params(global_params, c.state)
            if p is not None:
                out[c.cid] = p
        return out

    def __call__(
        self, rnd: int, global_params: torch.Tensor, strategy: Strategy, last: bool
    ) -> tuple[dict[str, Any], dict[str, float]]:
        ev = self.cfg.evaluation
        values: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        eval_params = strategy.eval_params(global_params)
        personal = self.personal_models(strategy, global_params)
        if personal:  # no single global model: each client's composed model is evaluated
            eval_params = personal[min(personal)]
        if rnd % ev.every == 0 or last:
            t0 = time.perf_counter()
            if personal:
                per = {c: self.holdout_loss(p) for c, p in personal.items()}
                values["holdout_loss"] = float(np.mean(list(per.values())))
                values["holdout_loss_clients"] = {str(c): v for c, v in per.items()}
            else:
                values["holdout_loss"] = self.holdout_loss(eval_params)
            seconds["eval_loss"] = time.perf_counter() - t0
            if self.on_samples is not None:
                t0 = time.perf_counter()
                self.on_samples(rnd, eval_params)
                seconds["samples"] = time.perf_counter() - t0
        fid_due = last or (ev.fid_every > 0 and rnd % ev.fid_every == 0)
        if ev.fid and fid_due and self.evaluate_quality is not None:
            t0 = time.perf_counter()
            if personal:
                values.update(self._personal_quality(rnd, personal))
            else:
                values.update(self.evaluate_quality(rnd, eval_params))
            seconds["fid"] = time.perf_counter() - t0
        return values, seconds

    def _personal_quality(self, rnd: int, personal: Mapping[int, torch.Tensor]) -> dict[str, Any]:
        """FID etc. of every client's composed model: means, worst FID, per-client values."""
        if self.evaluate_quality is None:  # pragma: no cover - guarded by the caller
            return {}
        reports = {c: self.evaluate_quality(rnd, p) for c, p in personal.items()}
        out: dict[str, Any] = {}
        keys = set.intersection(*(set(r) for r in reports.values()))
        for k in sorted(keys):
            vals = [r[k] for r in reports.values()]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                out[k] = float(np.mean(vals))
        if "fid" in keys:
            fids = {str(c): float(r["fid"]) for c, r in reports.items()}
            out["fid_worst"] = max(fids.values())
            out["fid_clients"] = fids
        return out


def _client_dp(strategy: Strategy) -> Any:
    if not isinstance(strategy, ClientLevelDP):  # pragma: no cover - wiring error
        raise TypeError("dp.level client needs a ClientLevelDP strategy")
    return strategy
