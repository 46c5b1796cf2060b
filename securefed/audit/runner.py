"""``run_audit``: attack a run's released artefacts and judge them against threat models.

For each requested attack and each target the threat models name (the released global model;
individual models the server received; per-client composed models), members are a seeded
subset of the clients' records and non-members a subset of the holdout of the same size. The
empirical epsilon comes from the run's canaries when it has them (one-run audit with fair
coins; Clopper-Pearson on a separate split) and otherwise from the natural members vs holdout
examples (approximate: see :class:`~securefed.audit.epsilon.OneRunAudit`). Memorisation is
measured on the run's auxiliary set when it has one, and on freshly generated samples
otherwise. Every required defence is checked on the run's resolved config; the audit passes
only if every defence and every criterion passes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from securefed.audit.attacks import ATTACKS, AttackContext, build_attack
from securefed.audit.epsilon import (
    ClopperPearsonAudit,
    OneRunAudit,
    clopper_pearson_audit,
    one_run_audit,
)
from securefed.audit.memorization import MemorizationReport, audit_memorization
from securefed.audit.metrics import AttackResult, attack_result
from securefed.audit.targets import AuditRun, find_synthetic, load_audit_run, make_shadow_trainer
from securefed.audit.threats import DefenceCheck, ThreatModel, check_config
from securefed.data import ImageDataset

__all__ = [
    "DEFAULT_ATTACKS",
    "AuditReport",
    "AuditSettings",
    "CriterionResult",
    "run_audit",
]

log = logging.getLogger(__name__)

DEFAULT_ATTACKS = ("loss", "secmi", "pia", "pian")


@dataclass(frozen=True)
class AuditSettings:
    """How much work the audit does (defaults fit a quickstart-size run in about a minute).

    Attributes:
        attacks: attacks to run; None = those the threat models' criteria name (the default
            four when a criterion reads ``attacks.max``).
        max_examples: members and non-members scored per target (each).
        seed: seeds every subset, noise draw and bootstrap.
        bootstrap: bootstrap resamples for the intervals.
        attack_params: attack name -> keyword settings (e.g. ``{"pia": {"t": 20}}``).
        num_samples / sampling_steps: generated samples for memorisation without an aux set.
        lira_shadows / shadow_steps: LiRA shadow models and their training steps.
        epsilon_attack: the attack whose scores feed the empirical epsilon.
        beta: 1 - confidence of the epsilon lower bounds.
        device: where models run.
        progress: show progress bars.
    """

    attacks: tuple[str, ...] | None = None
    max_examples: int = 512
    seed: int = 0
    bootstrap: int = 200
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_samples: int = 256
    sampling_steps: int = 25
    lira_shadows: int = 4
    shadow_steps: int | None = None
    epsilon_attack: str = "loss"
    beta: float = 0.05
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class CriterionResult:
    """One criterion of one threat model, judged."""

    threat_model: str
    id: str
    metric: str
    op: str
    threshold: float | None
    threshold_expr: Any
    actual: float | None
    passed: bool
    detail: str = ""


@dataclass
class AuditReport:
    """Everything ``securefed audit`` writes to ``audit/report.json``."""

    run_dir: str
    threat_models: list[str]
    passed: bool
    defences: dict[str, list[DefenceCheck]]
    criteria: list[CriterionResult]
    attacks: list[AttackResult]
    epsilon: dict[str, Any]
    memorization: MemorizationReport | None
    settings: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "threat_models": self.threat_models,
            "passed": self.passed,
            "defences": {k: [d.as_dict() for d in v] for k, v in self.defences.items()},
            "criteria": [asdict(c) for c in self.criteria],
            "attacks": [a.as_dict() for a in self.attacks],
            "epsilon": self.epsilon,
            "memorization": None if self.memorization is None else self.memorization.as_dict(),
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------- helpers
def _needed_attacks(tms: list[ThreatModel]) -> list[str]:
    names: list[str] = []
    for tm in tms:
        for c in tm.criteria:
            for m in (c.metric, c.value):
                if isinstance(m, str) and m.startswith("attacks."):
                    a = m.split(".")[1]
                    for n in DEFAULT_ATTACKS if a == "max" else (a,):
                        if n not in names:
                            names.append(n)
    return names


def _subset(ds: ImageDataset, k: int, rng: np.random.Generator) -> ImageDataset:
    if len(ds) <= k:
        return ds
    return ds.subset(np.sort(rng.choice(len(ds), size=k, replace=False)))


def _targets(run: AuditRun, kinds: set[str], notes: list[str]) -> list[tuple[str, Any, Any]]:
    """``(name, params [D], members)`` of every model target the threat models name."""
    out: list[tuple[str, Any, Any]] = [("global", run.released, run.members)]
    if "received" in kinds:
        if not run.received:
            notes.append(
                "no individual models the server received are stored in this run (received/); "
                "only the released global model was attacked"
            )
        for name, vec in run.received.items():
            members = run.members
            if name.startswith("client_") and name[7:].isdigit() and int(name[7:]) < len(run.parts):
                members = run.client_records(int(name[7:]))
            out.append((f"received:{name}", vec, members))
    if "clients" in kinds:
        for cid, vec in sorted(run.client_models.items()):
            out.append((f"client_{cid}", vec, run.client_records(cid)))
    return out


def _without_canaries(ds: ImageDataset, run: AuditRun) -> ImageDataset:
    """``ds`` minus any image that is one of the run's canaries (natural canaries are drawn
    from the holdout; an inserted one is a member, not a non-member)."""
    if run.canaries is None:
        return ds
    from securefed.audit.attacks.lira import _row_keys

    canary_keys = set(_row_keys(run.canaries.images))
    keep = [i for i, k in enumerate(_row_keys(ds.images)) if k not in canary_keys]
    return ds.subset(np.asarray(keep, dtype=np.int64))


def _generate(run: AuditRun, n: int, steps: int, seed: int, progress: bool) -> torch.Tensor:
    from securefed.diffusion import sample

    model = run.model(run.released)
    gen = torch.Generator(device=run.device).manual_seed(seed)
    return sample(
        model,
        run.schedule.to(run.device),
        n,
        run.members.image_shape,
        sampler="ddim",
        steps=min(steps, run.schedule.timesteps),
        generator=gen,
        device=run.device,
        progress=progress,
    ).cpu()


def _resolve(
    metric: str,
    attacks: list[AttackResult],
    epsilon: dict[str, Any],
    mem: MemorizationReport | None,
) -> tuple[float | None, str]:
    parts = metric.split(".")
    root = parts[0]
    if root == "attacks":
        name, m = parts[1], parts[2]
        rows = [a for a in attacks if name == "max" or a.attack == name]
        if not rows:
            return None, f"attack {name!r} was not run"
        vals = [(a.metric(m), a) for a in rows]
        v, worst = max(vals, key=lambda t: t[0])
        return v, f"worst: {worst.attack} on {worst.target}"
    if root == "epsilon":
        key = ".".join(parts[1:])
        ev = epsilon.get(key)
        return (None, f"epsilon.{key} not available") if ev is None else (float(ev), "")
    if root == "memorization":
        if mem is None:
            return None, "memorisation was not measured"
        try:
            return mem.metric(".".join(parts[1:])), f"on {mem.source}"
        except KeyError as exc:
            return None, str(exc)
    return None, f"unknown metric root {root!r}"


def _compare(a: float, op: str, b: float) -> bool:
    return {
        "==": a == b,
        "!=": a != b,
        "<": a < b,
        "<=": a <= b,
        ">": a > b,
        ">=": a >= b,
    }.get(op, False)


# ----------------------------------------------------------------------------- the audit
def run_audit(
    run_dir: str | Path,
    threat_models: list[ThreatModel],
    settings: AuditSettings | None = None,
) -> AuditReport:
    """Audit a run directory against ``threat_models`` (see module docstring).

    Returns the report; only the closest-pairs grid is written here (to ``RUN_DIR/audit/``),
    the rest by :func:`securefed.audit.report.write_audit`.
    """
    st = settings or AuditSettings()
    t_start = time.perf_counter()
    if not threat_models:
        raise ValueError("run_audit: give at least one threat model (--threat-model)")
    dev = torch.device(st.device)
    run = load_audit_run(run_dir, dev)
    notes: list[str] = []
    rng = np.random.default_rng(st.seed)
    cfg_dict = run.cfg.model_dump(mode="json")
    defences = {tm.name: check_config(tm, cfg_dict) for tm in threat_models}

    names = list(st.attacks) if st.attacks is not None else _needed_attacks(threat_models)
    for n in names:
        if n not in ATTACKS:
            raise ValueError(f"--attacks: unknown attack {n!r}; choose from {sorted(ATTACKS)}")
    kinds = {t for tm in threat_models for t in tm.targets}
    ctx = AttackContext(run.schedule.to(dev), dev, st.seed, 256, run.conditional)

    # ---- evaluation sets: the same non-members for every target; LiRA keeps half the holdout
    # as its reference (shadow) data and evaluates on the other half
    holdout = _without_canaries(run.holdout, run)
    if len(holdout) < len(run.holdout):
        notes.append(
            f"{len(run.holdout) - len(holdout)} holdout images served as canaries and are not "
            "used as non-members"
        )
    uses_lira = any(n.startswith("lira") for n in names)
    reference = None
    if uses_lira:
        perm = rng.permutation(len(holdout))
        half = len(holdout) // 2
        reference = holdout.subset(np.sort(perm[:half]))
        lira_nonmembers = holdout.subset(np.sort(perm[half:]))
    nonmembers = _subset(holdout, st.max_examples, rng)
    attacks: list[AttackResult] = []
    eps_scores: tuple[np.ndarray, np.ndarray] | None = None
    targets = _targets(run, kinds, notes) if any(k != "synthetic" for k in kinds) else []
    if targets and names:
        bar = tqdm(total=len(targets) * len(names), desc="attacks", disable=not st.progress)
        for tname, params, members_all in targets:
            model = run.model(params)
            k = min(st.max_examples, len(members_all), len(nonmembers))
            members = _subset(members_all, k, rng)
            nm = _subset(nonmembers, k, rng)
            for aname in names:
                t0 = time.perf_counter()
                params_a = dict(st.attack_params.get(aname) or {})
                if aname.startswith("lira"):
                    params_a.setdefault("num_shadows", st.lira_shadows)
                    params_a.setdefault("progress", st.progress)
                attack = build_attack(
                    aname,
                    ctx,
                    params_a,
                    train_shadow=make_shadow_trainer(run, st.shadow_steps) if uses_lira else None,
                )
                ev_members, ev_non = members, nm
                if aname.startswith("lira"):
                    if reference is None:  # pragma: no cover - set whenever a LiRA is asked
                        raise RuntimeError(f"{aname}: LiRA needs reference (shadow) data")
                    kk = min(k, len(lira_nonmembers))
                    ev_members = _subset(members, kk, rng)
                    ev_non = _subset(lira_nonmembers, kk, rng)
                    both = ImageDataset(
                        images=torch.cat([ev_members.images, ev_non.images]),
                        labels=torch.cat([ev_members.labels, ev_non.labels]),
                        num_classes=ev_members.num_classes,
                        name=ev_members.name,
                        class_names=ev_members.class_names,
                    )
                    attack.fit(reference, targets=both)
                s_m = attack.score(model, ev_members.images, ev_members.labels)
                s_n = attack.score(model, ev_non.images, ev_non.labels)
                attacks.append(
                    attack_result(
                        aname,
                        tname,
                        s_m,
                        s_n,
                        rng=rng,
                        bootstrap=st.bootstrap,
                        params=attack.params(),
                        seconds=time.perf_counter() - t0,
                    )
                )
                if tname == "global" and aname == st.epsilon_attack:
                    eps_scores = (s_m, s_n)
                bar.update(1)
        bar.close()

    # ---- empirical epsilon
    epsilon: dict[str, Any] = {
        "accountant": run.ledger.epsilon if np.isfinite(run.ledger.epsilon) else None,
        "accountant_level": run.ledger.level,
        "delta": run.ledger.delta,
    }
    one: OneRunAudit | None = None
    cp: ClopperPearsonAudit | None = None
    delta = run.ledger.delta
    if run.canaries is not None:
        attack = build_attack(st.epsilon_attack, ctx, st.attack_params.get(st.epsilon_attack))
        model = run.model(run.released)
        scores = attack.score(model, run.canaries.images, run.canaries.labels)
        inc = run.canaries.included
        one = one_run_audit(scores, inc, delta, beta=st.beta)
        cp = clopper_pearson_audit(scores, inc, delta, rng=rng, alpha=st.beta)
        epsilon["source"] = f"{len(inc)} {run.canaries.kind} canaries ({int(inc.sum())} inserted)"
        epsilon["canary_scores"] = {
            "included": scores[inc].tolist(),
            "excluded": scores[~inc].tolist(),
        }
    elif eps_scores is not None:
        s_m, s_n = eps_scores
        scores = np.concatenate([s_m, s_n])
        inc = np.r_[np.ones(s_m.size, bool), np.zeros(s_n.size, bool)]
        one = one_run_audit(scores, inc, delta, beta=st.beta, natural=True)
        cp = clopper_pearson_audit(scores, inc, delta, rng=rng, alpha=st.beta)
        epsilon["source"] = (
            f"natural examples: {s_m.size} members vs {s_n.size} holdout, {st.epsilon_attack} "
            "scores (membership is a seeded random split, not independent fair coins: approximate)"
        )
        notes.append(
            "the run has no canaries: eps_LB uses members vs holdout as natural canaries "
            "(approximate; insert canaries for a rigorous one-run audit)"
        )
    if one is not None and cp is not None:
        epsilon.update(
            eps_lb=max(one.eps_lb, cp.eps_lb),
            eps_lb_one_run=one.eps_lb,
            eps_lb_cp=cp.eps_lb,
            one_run=one.as_dict(),
            clopper_pearson=cp.as_dict(),
            attack=st.epsilon_attack,
            beta=st.beta,
        )
        if epsilon["accountant"] is None:
            epsilon["accountant"] = float("inf")
        acct = float(epsilon["accountant"])
        if epsilon["eps_lb"] > acct:
            notes.append(
                f"DP VIOLATION: empirical eps_LB {epsilon['eps_lb']:.3f} exceeds the accountant's "
                f"epsilon {acct:.3f}: the DP implementation or its accounting is wrong"
            )

    # ---- memorisation
    mem: MemorizationReport | None = None
    if "synthetic" in kinds:
        found = find_synthetic(run.run_dir, run.members.image_shape)
        if found is not None:
            synth, source = found
        else:
            synth = _generate(run, st.num_samples, st.sampling_steps, st.seed, st.progress)
            source = f"generated ({st.num_samples} DDIM samples, {st.sampling_steps} steps)"
        mem = audit_memorization(
            synth,
            run.members.images,
            holdout.images,
            rng,
            source=source,
            bootstrap=st.bootstrap,
            grid_path=Path(run.run_dir) / "audit" / "closest_pairs.png",
        )

    # ---- criteria
    results: list[CriterionResult] = []
    for tm in threat_models:
        for c in tm.criteria:
            actual, detail = _resolve(c.metric, attacks, epsilon, mem)
            if isinstance(c.value, str):
                thr, _ = _resolve(c.value, attacks, epsilon, mem)
                detail = f"{detail}; {c.value} = {thr}" if detail else f"{c.value} = {thr}"
            else:
                thr = float(c.value)
            ok = actual is not None and thr is not None and _compare(actual, c.op, thr)
            if actual is None:
                detail = f"NOT EVALUATED ({detail}): a criterion that was not measured fails"
            results.append(
                CriterionResult(tm.name, c.id, c.metric, c.op, thr, c.value, actual, ok, detail)
            )
    passed = all(r.passed for r in results) and all(d.passed for v in defences.values() for d in v)
    settings_dict = asdict(st)
    settings_dict["attacks"] = names
    return AuditReport(
        run_dir=str(run.run_dir),
        threat_models=[tm.name for tm in threat_models],
        passed=passed,
        defences=defences,
        criteria=results,
        attacks=attacks,
        epsilon=epsilon,
        memorization=mem,
        settings=settings_dict,
        seconds=time.perf_counter() - t_start,
        notes=notes,
    )
