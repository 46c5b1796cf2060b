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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from securefed.artefacts.rundir import RunDir
from securefed.audit.attacks import ATTACKS, AttackContext, build_attack
from securefed.audit.attacks.lira import _row_keys
from securefed.audit.epsilon import (
    clopper_pearson_audit,
    federated_canary_audit,
    gaussian_fit_epsilon,
    one_run_audit,
    one_run_ceiling,
)
from securefed.audit.memorization import MemorizationReport, audit_memorization
from securefed.audit.metrics import LOW_FPR_TARGETS, AttackResult, attack_result
from securefed.audit.targets import AuditRun, find_synthetic, load_audit_run, make_shadow_trainer
from securefed.audit.threats import DefenceCheck, ThreatModel, check_config
from securefed.audit.verdict import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Measurement,
    Outcome,
    judge,
    min_n_for,
)
from securefed.data import ImageDataset
from securefed.diffusion import sample
from securefed.privacy import PrivacyLedger, epsilon_of

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
        epsilon_attack: the attack whose scores feed the empirical epsilon from input canaries.
        beta: 1 - confidence of the empirical epsilon (split evenly between its bounds).
        audit_delta: the delta at which the one-run bound is computed AND the accountant's
            epsilon is recomputed from the ledger (like with like). It must be small: the
            bound's delta term caps it (with the ledger's 1 / (10 n) it stays near 2 even for
            perfect separation).
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
    audit_delta: float = 1e-6
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
    outcome: Outcome = FAIL
    low: float | None = None
    high: float | None = None
    n: int | None = None
    min_n: int = 0


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
                "target 'received': no individual model reached the server in this run (no "
                "FedDDPM model uploads; updates only as secure-aggregation sums)"
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

    canary_keys = set(_row_keys(run.canaries.images))
    keep = [i for i, k in enumerate(_row_keys(ds.images)) if k not in canary_keys]
    return ds.subset(np.asarray(keep, dtype=np.int64))


def _generate(run: AuditRun, n: int, steps: int, seed: int, progress: bool) -> torch.Tensor:
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


def _attack_measurement(rows: list[AttackResult], m: str) -> Measurement:
    """The worst (largest) value of metric ``m`` over ``rows``, its bounds and N."""
    is_bound = m.endswith(("_ci_high", "_ci_low"))
    base = m.removesuffix("_ci_high").removesuffix("_ci_low")
    vals, lows, highs, ns = [], [], [], []
    unfit = ""
    for a in rows:
        v = a.metric(m)
        vals.append((v, a))
        ci = None if is_bound else a.interval(base)
        if ci is None and not is_bound:
            unfit = (
                "no bootstrap interval (run the audit with --bootstrap > 0): a point estimate "
                "cannot PASS"
            )
        lows.append(v if ci is None else ci.low)
        highs.append(v if ci is None else ci.high)
        ns.append(
            a.num_nonmembers
            if base in LOW_FPR_TARGETS
            else min(a.num_members, a.num_nonmembers)
        )
    v, worst = max(vals, key=lambda t: t[0])
    return Measurement(
        value=v,
        low=max(lows),
        high=max(highs),
        n=min(ns),
        min_n=min_n_for(f"attacks.x.{m}"),
        detail=f"worst: {worst.attack} on {worst.target}",
        unfit=unfit,
    )


def _resolve(
    metric: str,
    attacks: list[AttackResult],
    epsilon: dict[str, Any],
    mem: MemorizationReport | None,
) -> Measurement:
    parts = metric.split(".")
    root = parts[0]
    if root == "attacks":
        name, m = parts[1], parts[2]
        rows = [a for a in attacks if name == "max" or a.attack == name]
        if not rows:
            return Measurement(None, detail=f"attack {name!r} was not run")
        try:
            return _attack_measurement(rows, m)
        except KeyError as exc:
            return Measurement(None, detail=str(exc).strip("'\""))
    if root == "epsilon":
        key = ".".join(parts[1:])
        ev = epsilon.get(key)
        if ev is None:
            return Measurement(None, detail=f"epsilon.{key} not available")
        unfit = str(epsilon.get("unfit") or "") if key.startswith("eps_lb") else ""
        n = epsilon.get("m") if key.startswith("eps_lb") else None
        return Measurement(float(ev), n=n, detail=str(epsilon.get("source", "")), unfit=unfit)
    if root == "memorization":
        if mem is None:
            return Measurement(None, detail="memorisation was not measured")
        name = ".".join(parts[1:])
        try:
            v = mem.metric(name)
        except KeyError as exc:
            return Measurement(None, detail=str(exc).strip("'\""))
        low = high = v
        if name == "dcr_share":
            low, high = (float(x) for x in mem.dcr_share_ci)
        return Measurement(
            v, low, high, n=mem.num_samples, min_n=min_n_for(metric), detail=f"on {mem.source}"
        )
    return Measurement(None, detail=f"unknown metric root {root!r}")


def _missing_targets(tm: ThreatModel, run: AuditRun, st: AuditSettings) -> list[CriterionResult]:
    """A FAIL row for every target ``tm`` names that the run should hold but does not (an
    attack that silently falls back to another target would pass a model never attacked)."""
    out = []
    cfg = run.cfg
    for t in tm.targets:
        expected, have, what = False, True, ""
        if t == "received":
            fd = getattr(cfg, "fedddpm", None)
            expected = bool(fd is not None and fd.enabled and fd.upload == "model")
            have = bool(run.received)
            what = "FedDDPM model uploads (RUN_DIR/received/client_<i>.pt)"
        elif t == "clients":
            fdf = getattr(cfg, "feddiffuse", None)
            expected = bool(
                fdf is not None and fdf.enabled and fdf.variant in ("udec", "ulatdec")
            )
            have = bool(run.client_models)
            what = "per-client composed models (FedDiffuse local groups in the checkpoint)"
        if expected and not have:
            out.append(
                CriterionResult(
                    tm.name,
                    f"target-{t}",
                    f"target.{t}",
                    "present",
                    None,
                    None,
                    None,
                    False,
                    f"the threat model names target {t!r} and this run's config produces {what}, "
                    "but none are stored: the target cannot be attacked (rerun with a securefed "
                    "that keeps them, or audit against a threat model without this target)",
                    outcome=FAIL,
                )
            )
    return out


def _accountant_at(run: AuditRun, delta: float) -> float:
    """The accountant's epsilon at ``delta``, recomputed from the ledger's history (worst
    client); inf without DP."""
    path = RunDir(Path(run.run_dir)).ledger
    if run.cfg.dp.level == "none" or not path.exists():
        return float("inf")

    led = PrivacyLedger.load(path)
    eps = [
        float(epsilon_of(led.history(c), delta, led.get_plan(c).accountant)) for c in led.clients
    ]
    return max(eps) if eps else float("inf")


def _canary_clients_accountant_at(run: AuditRun, delta: float) -> float | None:
    """The accountant's epsilon at ``delta`` of the worst canary client: one Gaussian step at
    the round's charged multiplier (sample rate 1) per round it took part in, exactly what the
    ledger charges a real client for the same participations; None without canary clients."""
    if not run.canary_histories:
        return None

    accountant: str = run.cfg.dp.accountant
    path = RunDir(Path(run.run_dir)).ledger
    if path.exists():
        led = PrivacyLedger.load(path)
        if led.clients:
            accountant = led.get_plan(led.clients[0]).accountant
    seen: dict[tuple[float, ...], float] = {}
    worst = 0.0
    for hists in run.canary_histories.values():
        for h in hists:
            t = tuple(sorted(h))
            if t not in seen:
                seen[t] = float(epsilon_of([(z, 1.0, 1) for z in t], delta, accountant))
            worst = max(worst, seen[t])
    return worst


def _epsilon_section(
    run: AuditRun,
    st: AuditSettings,
    ctx: AttackContext,
    eps_scores: tuple[np.ndarray, np.ndarray] | None,
    rng: np.random.Generator,
    notes: list[str],
) -> dict[str, Any]:
    """Empirical epsilon at the audit delta, the accountant's epsilon at the same delta, and
    diagnostics (see :class:`AuditSettings`)."""
    delta = st.audit_delta
    acct_clients = _accountant_at(run, delta)
    acct_canaries = _canary_clients_accountant_at(run, delta)
    # the claim the canaries are held to: the accountant's epsilon of the real clients' worst
    # history and of the canary clients' own participations (same accountant, same charges)
    acct = max(acct_clients, acct_canaries) if acct_canaries is not None else acct_clients
    epsilon: dict[str, Any] = {
        "accountant": acct,
        "accountant_clients": acct_clients,
        "accountant_canary_clients": acct_canaries,
        "canary_participations_max": max(
            (len(h) for hs in run.canary_histories.values() for h in hs), default=None
        ),
        "accountant_level": run.ledger.level,
        "delta": delta,
        "accountant_ledger": run.ledger.epsilon if np.isfinite(run.ledger.epsilon) else None,
        "ledger_delta": run.ledger.delta,
    }
    # every source with a theorem behind it gets a one-run bound; the confidence 1 - beta is
    # split evenly between them (Bonferroni), so the max of the bounds holds at 1 - beta
    sources: list[tuple[str, np.ndarray, np.ndarray, bool]] = []
    for name, (scores, inc) in run.canary_scores.items():
        sources.append((name, np.asarray(scores, np.float64), np.asarray(inc, bool), False))
    if run.canaries is not None:
        attack = build_attack(st.epsilon_attack, ctx, st.attack_params.get(st.epsilon_attack))
        model = run.model(run.released)
        scores = attack.score(model, run.canaries.images, run.canaries.labels)
        inc = run.canaries.included
        sources.append(
            (
                f"{len(inc)} {run.canaries.kind} input canaries ({int(inc.sum())} inserted), "
                f"{st.epsilon_attack} scores on the released model",
                scores,
                inc,
                False,
            )
        )
        epsilon["canary_scores"] = {
            "included": scores[inc].tolist(),
            "excluded": scores[~inc].tolist(),
        }
    if not sources and eps_scores is not None:
        s_m, s_n = eps_scores
        sources.append(
            (
                f"natural examples: {s_m.size} members vs {s_n.size} holdout, {st.epsilon_attack} "
                "scores (membership is a seeded random split, not independent fair coins: "
                "approximate)",
                np.concatenate([s_m, s_n]),
                np.r_[np.ones(s_m.size, bool), np.zeros(s_n.size, bool)],
                True,
            )
        )
        notes.append(
            "the run has no canaries: eps_LB uses members vs holdout as natural canaries "
            "(approximate, no theorem: dp-holds is INCONCLUSIVE; run with a `canaries:` section)"
        )
    if not sources:
        return epsilon
    beta_each = st.beta / len(sources)
    bounds = []
    for name, scores, inc, natural in sources:
        one = one_run_audit(scores, inc, delta, beta=beta_each, natural=natural)
        ceiling = one_run_ceiling(len(inc), delta, beta=beta_each)
        row: dict[str, Any] = {
            "source": name,
            "eps_lb": one.eps_lb,
            "ceiling": ceiling,
            "beta": beta_each,
            "one_run": one.as_dict(),
            "natural": natural,
        }
        if inc.any() and not inc.all() and inc.size >= 4:
            # diagnostics, never the verdict: Clopper-Pearson has no theorem for dependent
            # canaries in one model; the Gaussian fit assumes Gaussian scores
            row["clopper_pearson"] = clopper_pearson_audit(
                scores, inc, delta, rng=rng, alpha=st.beta
            ).as_dict()
            row["gaussian_fit"] = gaussian_fit_epsilon(
                scores, inc, delta, rng=rng, bootstrap=st.bootstrap
            )
        cos = run.canary_cosines.get(name)
        if cos is not None and int(cos[1].sum()) >= 2 and int((~cos[1]).sum()) >= 2:
            # Andrew et al. (2024): Gaussian fit to the final-delta cosines (an ESTIMATE)
            row["andrew_cosine"] = federated_canary_audit(
                cos[0][cos[1]], cos[0][~cos[1]], delta
            ).as_dict()
        bounds.append(row)
    best = max(bounds, key=lambda b: b["eps_lb"])
    epsilon.update(
        eps_lb=best["eps_lb"],
        eps_lb_one_run=best["eps_lb"],
        eps_lb_cp=(best.get("clopper_pearson") or {}).get("eps_lb"),
        eps_est=(best.get("gaussian_fit") or {}).get("eps_est"),
        one_run=best["one_run"],
        clopper_pearson=best.get("clopper_pearson"),
        gaussian_fit=best.get("gaussian_fit"),
        andrew_cosine=best.get("andrew_cosine"),
        source=best["source"],
        ceiling=max(b["ceiling"] for b in bounds),
        m=max(b["one_run"]["m"] for b in bounds),
        bounds=bounds,
        attack=st.epsilon_attack,
        beta=st.beta,
    )
    unfit = ""
    if all(b["natural"] for b in bounds):
        unfit = (
            "eps_LB comes from members vs holdout (no canaries): not a theorem, so it cannot "
            "certify that DP holds; run with a `canaries:` section"
        )
    elif epsilon["ceiling"] <= acct:
        notes.append(
            f"limited power: even perfect canary separation gives eps_LB <= "
            f"{epsilon['ceiling']:.3f}, below the accountant's {acct:.3f} at delta {delta:g}: "
            "a violation smaller than that gap cannot be seen (more canaries raise the ceiling)"
        )
    epsilon["unfit"] = unfit
    if run.released_canary_scores is not None:
        # diagnostic: what the released model ALONE reveals about the gradient canaries
        # (-s_i (theta_T - theta_0)[j_i]; Adam and the later rounds are post-processing)
        rs, ri = run.released_canary_scores
        epsilon["released_model_canaries"] = one_run_audit(rs, ri, delta, beta=st.beta).as_dict()
    if best["eps_lb"] > acct:
        notes.append(
            f"DP VIOLATION: empirical eps_LB {best['eps_lb']:.3f} exceeds the accountant's "
            f"epsilon {acct:.3f} at delta {delta:g}: the DP implementation or its accounting is "
            "wrong"
        )
    return epsilon


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
    if not 0.0 < st.audit_delta < 1.0:
        raise ValueError(
            f"audit_delta: must be in (0, 1), got {st.audit_delta} (e.g. 1e-6)"
        )
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
    epsilon = _epsilon_section(run, st, ctx, eps_scores, rng, notes)

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
        results += _missing_targets(tm, run, st)
        for c in tm.criteria:
            meas = _resolve(c.metric, attacks, epsilon, mem)
            if c.min_n is not None:
                meas = replace(meas, min_n=c.min_n)
            detail = meas.detail
            if isinstance(c.value, str):
                thr = _resolve(c.value, attacks, epsilon, mem).value
                detail = f"{detail}; {c.value} = {thr}" if detail else f"{c.value} = {thr}"
            else:
                thr = float(c.value)
            outcome, why = judge(meas, c.op, thr)
            passed = outcome == PASS or (outcome == INCONCLUSIVE and c.on_inconclusive == "pass")
            results.append(
                CriterionResult(
                    tm.name,
                    c.id,
                    c.metric,
                    c.op,
                    thr,
                    c.value,
                    meas.value,
                    passed,
                    f"{why}; {detail}" if detail else why,
                    outcome=outcome,
                    low=meas.low,
                    high=meas.high,
                    n=meas.n,
                    min_n=meas.min_n,
                )
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
