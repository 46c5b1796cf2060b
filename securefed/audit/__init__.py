"""Privacy audits: membership-inference attacks, synthetic-data memorisation, empirical epsilon
lower bounds (canaries), machine-checked threat models and the ``securefed audit`` report."""

from __future__ import annotations

from securefed.audit.attacks import ATTACKS, Attack, AttackContext, AttackError, build_attack
from securefed.audit.canaries import CanarySet, draw_canaries, insert_canaries, load_canaries
from securefed.audit.epsilon import (
    clopper_pearson_audit,
    clopper_pearson_epsilon,
    federated_canary_audit,
    one_run_audit,
    one_run_epsilon,
)
from securefed.audit.memorization import MemorizationReport, audit_memorization
from securefed.audit.metrics import AttackResult, attack_result, roc_auc, roc_curve, tpr_at_fpr
from securefed.audit.threats import (
    ThreatModel,
    ThreatModelError,
    check_config,
    load_threat_model,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "AttackError",
    "AttackResult",
    "CanarySet",
    "MemorizationReport",
    "ThreatModel",
    "ThreatModelError",
    "attack_result",
    "audit_memorization",
    "build_attack",
    "check_config",
    "clopper_pearson_audit",
    "clopper_pearson_epsilon",
    "draw_canaries",
    "federated_canary_audit",
    "insert_canaries",
    "load_canaries",
    "load_threat_model",
    "one_run_audit",
    "one_run_epsilon",
    "roc_auc",
    "roc_curve",
    "tpr_at_fpr",
]
