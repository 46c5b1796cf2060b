"""Threat models: YAML files naming an adversary, the defences it REQUIRES from a run config
and the audit criteria a run must pass (schema: ``threat_models/README.md``).

A defence is a check over the RESOLVED run config (every default written out) by dotted path::

    secure_aggregation.protocol in [masking, ckks]
    dp.target_epsilon <= 8
    fedddpm.upload != model or dp.level != none

Grammar: clauses ``PATH OP VALUE`` joined by ``and`` / ``or`` (``and`` binds tighter; no
parentheses). ``OP`` is one of ``== != < <= > >= in`` and ``not in``; ``VALUE`` is YAML
(``[masking, ckks]``, ``8``, ``null``, ``true``). A path into a section the config does not have
(e.g. ``fedddpm`` in a config written before FedDDPM existed) resolves to ``null``: the feature
is OFF, so ``fedddpm.upload != model`` holds and ``fedddpm.upload == model`` does not, and an
ordering comparison (``<=``) with ``null`` FAILS (a missing bound is no defence). A misspelt key
inside a section the config schema knows is an error when the threat model is loaded.

Derived values (``derived.*``), computed from the config:

- ``derived.clients_per_round``: ``max(min_fit_clients, round(fraction_fit * num_clients))``;
- ``derived.secagg_threshold_count``: the Shamir threshold as a count of a round's clients;
- ``derived.secagg_threshold_fraction``: that count over ``clients_per_round``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from securefed.audit.attacks import ATTACKS
from securefed.audit.metrics import ATTACK_METRICS
from securefed.config import ExperimentConfig
from securefed.errors import SecurefedError

__all__ = [
    "DERIVED",
    "Criterion",
    "DefenceCheck",
    "Requirement",
    "ThreatModel",
    "ThreatModelError",
    "check_config",
    "evaluate_expression",
    "list_threat_models",
    "load_threat_model",
    "resolve_path",
    "threat_models_dir",
]

OPS = ("==", "!=", "<=", ">=", "<", ">", "not in", "in")
_CLAUSE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s+(==|!=|<=|>=|<|>|not\s+in|in)\s+(.+?)\s*$")
DERIVED = ("clients_per_round", "secagg_threshold_count", "secagg_threshold_fraction")
TARGETS = ("global", "received", "clients", "synthetic")
#: what an INCONCLUSIVE criterion counts as (``audit.on_inconclusive`` or per criterion)
INCONCLUSIVE_RULES = ("fail", "pass")


class ThreatModelError(SecurefedError, ValueError):
    """A threat model file is malformed (the message names the file, the field and the fix)."""


@dataclass(frozen=True)
class Requirement:
    """A defence the threat model requires: ``check`` over the run config."""

    id: str
    check: str
    why: str = ""


@dataclass(frozen=True)
class Criterion:
    """An audit criterion: ``metric OP value`` (value: a number or another metric path)."""

    id: str
    metric: str
    op: str
    value: Any
    why: str = ""
    min_n: int | None = None
    on_inconclusive: str = "fail"


@dataclass(frozen=True)
class ThreatModel:
    """A loaded threat model (see ``threat_models/README.md``)."""

    name: str
    title: str
    path: str
    adversary: dict[str, Any]
    assets: list[str]
    targets: list[str]
    requires: list[Requirement]
    criteria: list[Criterion]
    notes: str = ""
    audit: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DefenceCheck:
    """Outcome of one required defence on one config."""

    id: str
    check: str
    passed: bool
    detail: str
    why: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def threat_models_dir() -> Path:
    """The shipped ``threat_models/`` folder (next to the package, in the repository)."""
    return Path(__file__).resolve().parents[2] / "threat_models"


def list_threat_models() -> list[str]:
    d = threat_models_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _find(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    cand = threat_models_dir() / f"{p.name}.yaml"
    if p.suffix == "" and cand.is_file():
        return cand
    raise ThreatModelError(
        f"--threat-model: {name_or_path!s} is neither a file nor a shipped threat model; "
        f"shipped: {', '.join(list_threat_models()) or '(none found)'}"
    )


# ----------------------------------------------------------------------------- expressions
def _split_top(text: str, word: str) -> list[str]:
    """Split on `` word `` outside brackets/quotes."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    pat = f" {word} "
    while i < len(text):
        c = text[i]
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        elif depth == 0 and text.startswith(pat, i):
            parts.append(text[start:i])
            i += len(pat)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_expression(text: str) -> list[list[tuple[str, str, Any]]]:
    """``a or b and c`` -> ``[[a], [b, c]]`` (OR of ANDs) of ``(path, op, value)`` clauses."""
    if not isinstance(text, str) or not text.strip():
        raise ThreatModelError(f"check: must be a non-empty string, got {text!r}")
    out = []
    for disj in _split_top(text, "or"):
        conj = []
        for clause in _split_top(disj, "and"):
            m = _CLAUSE.match(clause)
            if not m:
                raise ThreatModelError(
                    f"check {text!r}: cannot parse {clause!r}; write PATH OP VALUE with OP one "
                    f"of {', '.join(OPS)} (e.g. 'dp.target_epsilon <= 8')"
                )
            path, op, raw = m.group(1), re.sub(r"\s+", " ", m.group(2)), m.group(3)
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ThreatModelError(
                    f"check {text!r}: value {raw!r} is not YAML ({exc})"
                ) from None
            if op in ("in", "not in") and not isinstance(value, list):
                raise ThreatModelError(
                    f"check {text!r}: '{op}' needs a list value such as [masking, ckks], "
                    f"got {raw!r}"
                )
            conj.append((path, op, value))
        out.append(conj)
    return out


def _derived(cfg: Mapping[str, Any]) -> dict[str, Any]:
    fed = cfg.get("federation") or {}
    sec = cfg.get("secure_aggregation") or {}
    n = int(fed.get("num_clients", 1) or 1)
    per_round = min(
        n,
        max(
            int(fed.get("min_fit_clients", 1) or 1), round(float(fed.get("fraction_fit", 1.0)) * n)
        ),
    )
    thr = sec.get("threshold")
    count: int | None = None
    if thr is not None:
        thr = float(thr)
        count = int(thr) if thr > 1 else max(2, math.ceil(thr * per_round))
        count = min(count, per_round) if per_round >= 2 else count
    return {
        "clients_per_round": per_round,
        "secagg_threshold_count": count,
        "secagg_threshold_fraction": None if count is None else count / max(per_round, 1),
    }


def resolve_path(cfg: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    """``(present, value)`` of a dotted path in a config dict; ``derived.*`` is computed."""
    parts = path.split(".")
    if parts[0] == "derived":
        d = _derived(cfg)
        if len(parts) != 2 or parts[1] not in d:
            raise ThreatModelError(f"{path}: unknown derived value; choose one of {list(DERIVED)}")
        return True, d[parts[1]]
    node: Any = cfg
    for p in parts:
        if not isinstance(node, Mapping) or p not in node:
            return False, None
        node = node[p]
    return True, node


def _compare(actual: Any, op: str, value: Any) -> bool:
    if op == "==":
        return bool(actual == value)
    if op == "!=":
        return bool(actual != value)
    if op == "in":
        return actual in value
    if op == "not in":
        return actual not in value
    if actual is None or value is None or isinstance(actual, bool):
        return False
    try:
        a, b = float(actual), float(value)
    except (TypeError, ValueError):
        return False
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def evaluate_expression(text: str, cfg: Mapping[str, Any]) -> tuple[bool, str]:
    """Evaluate a check on a config dict; returns ``(passed, detail)`` where ``detail`` names
    every path's actual value (``absent`` for a section the config lacks)."""
    parsed = parse_expression(text)
    seen: dict[str, str] = {}
    result = False
    for conj in parsed:
        ok = True
        for path, op, value in conj:
            present, actual = resolve_path(cfg, path)
            seen[path] = repr(actual) if present else "absent (feature off)"
            ok = ok and _compare(actual, op, value)
        result = result or ok
    return result, ", ".join(f"{p} = {v}" for p, v in seen.items())


# ----------------------------------------------------------------------------- loading
def _schema_sections() -> dict[str, set[str]]:
    """Known config sections -> their keys (from the pydantic schema)."""
    out: dict[str, set[str]] = {}
    for name, f in ExperimentConfig.model_fields.items():
        ann = f.annotation
        sub = getattr(ann, "model_fields", None)
        out[name] = set(sub) if isinstance(sub, dict) else set()
    return out


def _validate_path(path: str, where: str) -> None:
    parts = path.split(".")
    if parts[0] == "derived":
        if len(parts) != 2 or parts[1] not in DERIVED:
            raise ThreatModelError(
                f"{where}: unknown derived value {path!r}; choose one of {list(DERIVED)}"
            )
        return
    schema = _schema_sections()
    if (
        parts[0] in schema
        and len(parts) > 1
        and schema[parts[0]]
        and parts[1] not in schema[parts[0]]
    ):
        raise ThreatModelError(
            f"{where}: {path!r} names no key of the config section {parts[0]!r} (known keys: "
            f"{', '.join(sorted(schema[parts[0]]))}); fix the spelling"
        )


def _req_str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ThreatModelError(f"{where}.{key}: required non-empty string, got {v!r}")
    return v


def load_threat_model(name_or_path: str | Path) -> ThreatModel:
    """Load and validate a threat model by file path or by shipped name
    (``honest_but_curious_server`` -> ``threat_models/honest_but_curious_server.yaml``)."""
    path = _find(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ThreatModelError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ThreatModelError(f"{path}: the top level must be a mapping")
    allowed = {
        "name",
        "title",
        "adversary",
        "assets",
        "targets",
        "requires",
        "criteria",
        "notes",
        "audit",
    }
    extra = set(raw) - allowed
    if extra:
        raise ThreatModelError(f"{path}: unknown keys {sorted(extra)}; allowed: {sorted(allowed)}")
    name = _req_str(raw, "name", str(path))
    adversary = raw.get("adversary")
    if not isinstance(adversary, dict) or "capabilities" not in adversary:
        raise ThreatModelError(f"{path}: adversary must be a mapping with at least 'capabilities'")
    assets = raw.get("assets") or []
    if not isinstance(assets, list) or not assets:
        raise ThreatModelError(f"{path}: assets must be a non-empty list of what is protected")
    targets = raw.get("targets", ["global"])
    if not isinstance(targets, list) or any(t not in TARGETS for t in targets):
        raise ThreatModelError(
            f"{path}: targets must be a list drawn from {list(TARGETS)}, got {targets!r}"
        )
    reqs = []
    for i, r in enumerate(raw.get("requires") or []):
        where = f"{path}: requires[{i}]"
        if not isinstance(r, dict):
            raise ThreatModelError(f"{where}: must be a mapping with id and check")
        check = _req_str(r, "check", where)
        for conj in parse_expression(check):
            for p, _, _ in conj:
                _validate_path(p, where)
        reqs.append(Requirement(_req_str(r, "id", where), check, str(r.get("why", ""))))
    audit = raw.get("audit") or {}
    if not isinstance(audit, dict):
        raise ThreatModelError(f"{path}: audit must be a mapping of audit settings")
    default_inc = audit.get("on_inconclusive", "fail")
    if default_inc not in INCONCLUSIVE_RULES:
        raise ThreatModelError(
            f"{path}: audit.on_inconclusive: {default_inc!r} is not one of "
            f"{list(INCONCLUSIVE_RULES)}"
        )
    if not raw.get("criteria"):
        raise ThreatModelError(
            f"{path}: criteria: a threat model needs at least one audit criterion (an audit with "
            "nothing to judge would pass anything); add e.g. {id: dp-holds, metric: "
            "epsilon.eps_lb, op: '<=', value: epsilon.accountant}"
        )
    crits = []
    for i, c in enumerate(raw.get("criteria") or []):
        where = f"{path}: criteria[{i}]"
        if not isinstance(c, dict):
            raise ThreatModelError(f"{where}: must be a mapping with id, metric, op and value")
        op = _req_str(c, "op", where)
        if op not in OPS:
            raise ThreatModelError(f"{where}.op: {op!r} is not one of {list(OPS)}")
        if "value" not in c:
            raise ThreatModelError(f"{where}.value: required (a number or a metric path)")
        metric = _req_str(c, "metric", where)
        _validate_metric(metric, where)
        if isinstance(c["value"], str):
            _validate_metric(c["value"], where)
        extra_c = set(c) - {"id", "metric", "op", "value", "why", "min_n", "on_inconclusive"}
        if extra_c:
            raise ThreatModelError(
                f"{where}: unknown keys {sorted(extra_c)}; allowed: id, metric, op, value, why, "
                "min_n, on_inconclusive"
            )
        min_n = c.get("min_n")
        if min_n is not None and (
            isinstance(min_n, bool) or not isinstance(min_n, int) or min_n < 1
        ):
            raise ThreatModelError(f"{where}.min_n: must be a positive integer, got {min_n!r}")
        on_inc = c.get("on_inconclusive", default_inc)
        if on_inc not in INCONCLUSIVE_RULES:
            raise ThreatModelError(
                f"{where}.on_inconclusive: {on_inc!r} is not one of {list(INCONCLUSIVE_RULES)}"
            )
        crits.append(
            Criterion(
                _req_str(c, "id", where),
                metric,
                op,
                c["value"],
                str(c.get("why", "")),
                min_n,
                str(on_inc),
            )
        )
    ids = [r.id for r in reqs] + [c.id for c in crits]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ThreatModelError(
            f"{path}: duplicate ids {dup}; every requirement and criterion needs its own id"
        )
    return ThreatModel(
        name=name,
        title=str(raw.get("title", name)),
        path=str(path),
        adversary=dict(adversary),
        assets=[str(a) for a in assets],
        targets=[str(t) for t in targets],
        requires=reqs,
        criteria=crits,
        notes=str(raw.get("notes", "")),
        audit=dict(audit),
    )


_METRIC_ROOTS = ("attacks", "epsilon", "memorization")


def _validate_metric(metric: str, where: str) -> None:
    parts = metric.split(".")
    if parts[0] not in _METRIC_ROOTS or len(parts) < 2:
        raise ThreatModelError(
            f"{where}: metric {metric!r} must start with one of {list(_METRIC_ROOTS)} (e.g. "
            "attacks.pia.auc, epsilon.eps_lb, memorization.flagged)"
        )
    if parts[0] == "attacks":
        if len(parts) != 3 or (parts[1] not in ATTACKS and parts[1] != "max"):
            raise ThreatModelError(
                f"{where}: {metric!r} must be attacks.<attack>.<metric> with <attack> one of "
                f"{[*sorted(ATTACKS), 'max']}"
            )
        base = parts[2].removesuffix("_ci_high").removesuffix("_ci_low")
        if base not in ATTACK_METRICS:
            raise ThreatModelError(
                f"{where}: {metric!r}: unknown attack metric {parts[2]!r}; choose one of "
                f"{list(ATTACK_METRICS)} (optionally with _ci_high / _ci_low)"
            )


def check_config(tm: ThreatModel, cfg: Mapping[str, Any]) -> list[DefenceCheck]:
    """Every required defence of ``tm`` evaluated on the resolved config dict ``cfg``."""
    out = []
    for r in tm.requires:
        ok, detail = evaluate_expression(r.check, cfg)
        out.append(DefenceCheck(r.id, r.check, ok, detail, r.why))
    return out
