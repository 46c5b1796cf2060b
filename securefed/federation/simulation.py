"""In-process federated round loop with dropouts, checkpoints and exact resume.

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
from securefed.client.runtime import local_round
from securefed.client.update import get_flat
from securefed.config import ExperimentConfig
from securefed.data import ImageDataset
from securefed.diffusion import NoiseSchedule, diffusion_loss
from securefed.federation.checkpoint import Checkpoint, save_checkpoint
from securefed.secagg import AggregationAbortedError, AggregationProtocol
from securefed.seeds import Purpose, derive_seed
from securefed.strategies import CohortSum, Strategy, pack_update, unpack_sum

__all__ = ["PrivacyContext", "RoundRecord", "SimClient", "Simulation"]

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


@dataclass(frozen=True)
class RoundRecord:
    """One line of ``metrics.jsonl``."""

    values: dict[str, Any]


class Simulation:
    """Drives rounds: plan -> local training -> secure sum -> strategy -> evaluate -> checkpoint.

    Args:
        cfg: the experiment.
        model: the denoiser (one instance, reloaded per client).
        schedule: noise schedule.
        clients: the simulated clients, ids 0..K-1.
        holdout: non-member examples (never reach a client): eval loss and FID reference.
        strategy: server rule. protocol: aggregation protocol.
        device: where training runs.
        evaluate_quality: callable(round, params) -> dict of quality metrics (FID ...), or None.
        on_samples: callable(round, params) -> None that writes a sample grid, or None.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        model: torch.nn.Module,
        schedule: NoiseSchedule,
        clients: list[SimClient],
        holdout: ImageDataset,
        strategy: Strategy,
        protocol: AggregationProtocol,
        device: torch.device,
        *,
        evaluate_quality: Callable[[int, torch.Tensor], dict[str, Any]] | None = None,
        on_samples: Callable[[int, torch.Tensor], None] | None = None,
        progress: bool = True,
        privacy: PrivacyContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.schedule = schedule.to(device)
        self.clients = clients
        self.holdout = holdout
        self.strategy = strategy
        self.protocol = protocol
        self.device = device
        self.evaluate_quality = evaluate_quality
        self.on_samples = on_samples
        self.progress = progress
        self.conditional = cfg.model.class_conditional
        self.privacy = privacy
        self.trainer: LocalTrainer
        if privacy is not None and privacy.level == "record":
            from securefed.client.dp import DPLocalTrainer

            self.trainer = DPLocalTrainer(
                model, schedule, cfg.client, cfg.dp, device, self.conditional
            )
        else:
            self.trainer = LocalTrainer(model, schedule, cfg.client, device, self.conditional)
        self.global_params = get_flat(model)
        self.round = 0
        self._canary_eps_cache: dict[tuple[float, ...], float] = {}

    # ------------------------------------------------------------------ state
    def checkpoint(self, meta: Mapping[str, Any]) -> Checkpoint:
        return Checkpoint(
            round=self.round,
            global_params=self.global_params.clone(),
            strategy=self.strategy.state_dict(),
            clients={c.cid: dict(c.state) for c in self.clients if c.state},
            meta=dict(meta),
        )

    def restore(self, ckpt: Checkpoint) -> None:
        if ckpt.global_params.shape != self.global_params.shape:
            raise ValueError(
                f"checkpoint has {ckpt.global_params.numel()} parameters, the configured model "
                f"has {self.global_params.numel()}: the config changed since the checkpoint"
            )
        self.round = ckpt.round
        self.global_params = ckpt.global_params.clone()
        self.strategy.load_state_dict(ckpt.strategy)
        for c in self.clients:
            c.state = dict(ckpt.clients.get(c.cid, {}))

    # ------------------------------------------------------------------ evaluation
    def holdout_loss(self, params: torch.Tensor) -> float:
        """Mean denoising loss of ``params`` on a fixed holdout slice with fixed noise."""
        n = min(len(self.holdout), self.cfg.evaluation.holdout_loss_examples)
        x0 = self.holdout.images[:n].to(self.device)
        y = self.holdout.labels[:n].to(self.device) if self.conditional else None
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

    # ------------------------------------------------------------------ one round
    def run_round(self, rnd: int) -> dict[str, Any]:
        """Run round ``rnd`` (1-based) and return its metrics line."""
        cfg = self.cfg
        seconds: dict[str, float] = {}
        rng = np.random.default_rng(derive_seed(cfg.seed, Purpose.SELECT, rnd))
        plan = self.strategy.configure_round(
            rnd,
            self.global_params,
            [c.cid for c in self.clients],
            cfg.federation.fraction_fit,
            cfg.federation.min_fit_clients,
            rng,
        )
        stages = self.protocol.dropout_stages
        dropouts: dict[int, str] = {}
        for cid in plan.clients:
            if cfg.federation.dropout_prob > 0 and rng.random() < cfg.federation.dropout_prob:
                dropouts[cid] = stages[int(rng.integers(len(stages)))]
        exhausted: list[int] = []
        if self.privacy is not None:
            ledger = self.privacy.ledger
            for cid in plan.clients:
                if cid not in dropouts and self._would_exceed(cid, rnd):
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
        for cid in list(trainers):
            client = self.clients[cid]
            hook = None
            if self.privacy is not None and self.privacy.level == "record" and canaries is not None:
                from securefed.client.dp import sample_rate_for

                hook = canaries.for_client(
                    rnd, cid, self.trainer.model, sample_rate_for(cfg.client, len(client.data)),
                    cfg.dp.max_grad_norm,
                )
            out = local_round(
                cfg, self.strategy, self.trainer, cid, client.data, plan.broadcast,
                client.state, rnd, self.privacy, progress=bar, canaries=hook,
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
        canary_round = self._canary_clients_round(rnd, len(plan.clients))
        seconds["train"] = time.perf_counter() - t0

        # ---- secure aggregation: only the SUM reaches the strategy (one protocol session per
        # upload cohort: clients of a cohort send the same vector keys; normally one cohort)
        t0 = time.perf_counter()
        cohorts = self.strategy.upload_cohorts(rnd, updates) if updates else {}
        down_numel = {
            cid: self.strategy.download_numel(plan.broadcast, self.clients[cid].state)
            for cid in plan.clients
        }
        down_bytes = 4 * sum(down_numel.values())
        line: dict[str, Any] = {
            "round": rnd,
            "selected": list(plan.clients),
            "trained": trainers,
            "mean_local_loss": float(np.mean(losses)) if losses else None,
        }
        if self.privacy is not None:
            line["epsilon"] = {
                str(c.cid): round(float(self.privacy.ledger.epsilon(c.cid)), 6)
                for c in self.clients
            }
            line["budget_exhausted"] = exhausted
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
                    noise = self._client_dp().current_noise()
                agg = self.protocol.aggregate(rnd, inputs, drops, noise=noise)
            except AggregationAbortedError as exc:
                aborted.append(f"{name}: {exc}" if len(cohorts) > 1 else str(exc))
                continue
            if not agg.survivors:
                continue
            total = agg.total
            if canary_round is not None:  # canary clients' S u_i join the clipped-delta sum
                off, n = _block(members, keys, "delta")
                total = canary_round.add_to(total, off, n)
            sums, total_weight = unpack_sum(total, keys, members)
            if canary_round is not None:
                canary_round.observe(sums["delta"].numpy())
            results[name] = CohortSum(sums, total_weight, len(agg.survivors))
            survivors.update(agg.survivors)
            up_bytes += int(sum(agg.bytes_up.values()))
            proto_down += int(sum(agg.bytes_down.values()))
            params_up += len(agg.survivors) * int(next(iter(inputs.values())).shape[0])
            infos[name] = dict(agg.info)
        if canary_round is not None:
            canary_round.commit()  # audit-only, 0600; a replayed round rewrites its file
        seconds["aggregate"] = time.perf_counter() - t0

        if results:
            t0 = time.perf_counter()
            self.global_params = self.strategy.aggregate_cohorts(
                rnd, self.global_params, results
            ).to(torch.float32)
            seconds["server_update"] = time.perf_counter() - t0
            for cid in sorted(survivors):  # private state commits only if the update was used
                self.clients[cid].state.update(updates[cid].new_state)
            line.update(
                participants=sorted(survivors),
                dropped=sorted(dropouts),
                bytes_up=up_bytes,
                bytes_down=int(down_bytes + proto_down),
                protocol=self.protocol.name,
                protocol_info=infos["all"] if set(infos) == {"all"} else infos,
            )
            if aborted:
                line["cohorts_abandoned"] = aborted
            if self.privacy is not None and self.privacy.level == "client" and agg is not None:
                line["client_dp"] = self._client_dp().round_summary(agg.info)
            server = self.strategy.round_metrics()
            if server:
                line["server"] = server
        else:
            reason = "; ".join(aborted) or "every selected client dropped out"
            log.warning("round %d abandoned: %s; the global model is unchanged", rnd, reason)
            line.update(
                participants=[],
                dropped=sorted(dropouts),
                bytes_up=0,
                bytes_down=int(down_bytes),
                protocol=self.protocol.name,
                abandoned=reason,
            )
        line["exchange"] = {
            "params_up": int(params_up),
            "params_down": int(sum(down_numel.values())),
        }
        self.round = rnd

        # ---- evaluation on schedule
        ev = cfg.evaluation
        last = rnd == cfg.federation.rounds
        eval_params = self.strategy.eval_params(self.global_params)
        personal = self.personal_models()
        if personal:  # no single global model: each client's composed model is evaluated
            eval_params = personal[min(personal)]
        if rnd % ev.every == 0 or last:
            t0 = time.perf_counter()
            if personal:
                per = {c: self.holdout_loss(p) for c, p in personal.items()}
                line["holdout_loss"] = float(np.mean(list(per.values())))
                line["holdout_loss_clients"] = {str(c): v for c, v in per.items()}
            else:
                line["holdout_loss"] = self.holdout_loss(eval_params)
            seconds["eval_loss"] = time.perf_counter() - t0
            if self.on_samples is not None:
                t0 = time.perf_counter()
                self.on_samples(rnd, eval_params)
                seconds["samples"] = time.perf_counter() - t0
        fid_due = last or (ev.fid_every > 0 and rnd % ev.fid_every == 0)
        if ev.fid and fid_due and self.evaluate_quality is not None:
            t0 = time.perf_counter()
            if personal:
                line.update(self._personal_quality(rnd, personal))
            else:
                line.update(self.evaluate_quality(rnd, eval_params))
            seconds["fid"] = time.perf_counter() - t0
        line["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
        return line

    def personal_models(self) -> dict[int, torch.Tensor]:
        """Client id -> its composed ``[D]`` model when the strategy keeps client-local parts
        (FedDiffuse UDEC/ULATDEC); empty when there is one global model."""
        out = {}
        for c in self.clients:
            p = self.strategy.personal_params(self.global_params, c.state)
            if p is not None:
                out[c.cid] = p
        return out

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

    def _canary_clients_round(self, rnd: int, selected: int) -> Any:
        """The round's canary clients (``dp.level: client`` with ``canaries.enabled``), sampled
        at the real clients' rate ``selected / num_clients`` under the same budget rule, or
        None (:class:`~securefed.privacy.canaries.ClientCanaryRound`)."""
        pc = self.privacy
        if pc is None or pc.level != "client" or pc.canaries is None or pc.canary_dir is None:
            return None
        from securefed.privacy.canaries import ClientCanaryRound

        plan = pc.ledger.get_plan(self.clients[0].cid)
        cur = self._client_dp().current
        return ClientCanaryRound(
            pc.canaries, pc.canary_dir, rnd, selected / max(1, len(self.clients)), cur.clip,
            cur.charged_multiplier, plan.target_epsilon, plan.delta, plan.accountant,
            self._canary_eps_cache,
        )

    def _client_dp(self) -> Any:
        from securefed.privacy.client_level import ClientLevelDP

        if not isinstance(self.strategy, ClientLevelDP):  # pragma: no cover - wiring error
            raise TypeError("dp.level client needs a ClientLevelDP strategy")
        return self.strategy

    def _would_exceed(self, cid: int, rnd: int | None = None) -> bool:
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
                    cid, 1, noise_multiplier=self._client_dp().current_charge(), sample_rate=1.0
                )
            )
        steps = local_steps_for(self.cfg.client, len(self.clients[cid].data))
        return bool(ledger.would_exceed(cid, steps))

    def can_continue(self) -> bool:
        """False when DP is on and no client can afford another round."""
        if self.privacy is None:
            return True
        if self.privacy.level == "client":
            # the charge per participation is the calibrated z at the worst-case survivors
            z = self._client_dp().z
            return any(
                not self.privacy.ledger.would_exceed(
                    c.cid, 1, noise_multiplier=z, sample_rate=1.0
                )
                for c in self.clients
            )
        return any(not self._would_exceed(c.cid, self.round + 1) for c in self.clients)

    def save(self, ckpt_dir: Path, meta: Mapping[str, Any]) -> None:
        save_checkpoint(ckpt_dir, self.checkpoint(meta), self.cfg.checkpoint.keep_last)


def _block(members: Mapping[int, Any], keys: list[str], key: str) -> tuple[int, int]:
    """Offset and length of vector ``key`` inside a packed protocol input (``keys`` order)."""
    some = next(iter(members.values())).vectors
    off = 0
    for k in keys:
        if k == key:
            return off, int(some[k].numel())
        off += int(some[k].numel())
    raise KeyError(f"packed update has no {key!r} vector (keys {keys})")
