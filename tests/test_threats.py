"""Threat models: loading, the check language, and every required defence is enforced."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from securefed.audit.threats import (
    ThreatModelError,
    check_config,
    evaluate_expression,
    list_threat_models,
    load_threat_model,
)
from securefed.cli import main
from securefed.config import parse_config

REQUIRED = {
    "honest_but_curious_server",
    "malicious_server",
    "colluding_server_clients",
    "external_released_model",
    "external_released_synthetic",
    "network_attacker",
}

#: a config meeting every defence of every shipped threat model
STRONG: dict[str, Any] = {
    "federation": {"num_clients": 6, "min_fit_clients": 5},
    "secure_aggregation": {"protocol": "masking", "threshold": 0.8, "keys_dir": "keys"},
    "dp": {"level": "record", "target_epsilon": 4},
}

#: for each defence id, a change to STRONG that removes that defence
BREAK: dict[str, dict[str, Any]] = {
    "secure-aggregation": {"secure_aggregation": {"protocol": "plain"}},
    "updates-not-in-clear": {"secure_aggregation": {"protocol": "plain"}},
    "masking": {"secure_aggregation": {"protocol": "ckks"}},
    "differential-privacy": {"dp": {"level": "none", "target_epsilon": None}},
    "client-side-noise": {"dp": {"level": "none", "target_epsilon": None}},
    "record-level-dp": {"dp": {"level": "client"}},
    "epsilon-budget": {"dp": {"target_epsilon": 16}},
    "two-thirds-threshold": {"secure_aggregation": {"threshold": 0.6}},
    "authenticated-keys": {"secure_aggregation": {"keys_dir": None}},
    "threshold-above-colluders": {"secure_aggregation": {"threshold": 2}},
    "honest-client-in-every-sum": {"federation": {"min_fit_clients": 2}},
    "uploads-private": {
        "dp": {"level": "client"},
        "fedddpm": {"enabled": True, "upload": "model", "allow_non_dp_uploads": True},
    },
}


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for sec, vals in change.items():
        out.setdefault(sec, {}).update(vals)
    return out


def _resolved(raw: dict[str, Any]) -> dict[str, Any]:
    return parse_config(raw).model_dump(mode="json")


def test_the_six_threat_models_ship_and_load() -> None:
    assert REQUIRED <= set(list_threat_models())
    for name in REQUIRED:
        tm = load_threat_model(name)
        assert tm.requires and tm.assets and tm.adversary["capabilities"]
        assert all(c.op in ("<=", "==", ">=", "<", ">", "!=") for c in tm.criteria)


def test_strong_config_meets_every_threat_model() -> None:
    cfg = _resolved(STRONG)
    for name in REQUIRED:
        failed = [c.id for c in check_config(load_threat_model(name), cfg) if not c.passed]
        assert failed == [], (name, failed)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_each_required_defence_removed_in_turn_is_reported(name: str) -> None:
    tm = load_threat_model(name)
    for req in tm.requires:
        assert req.id in BREAK, f"no breaking change known for defence {req.id} of {name}"
        cfg = _resolved(_merge(STRONG, BREAK[req.id]))
        failed = {c.id for c in check_config(tm, cfg) if not c.passed}
        assert req.id in failed, (name, req.id, failed)


def test_absent_section_is_feature_off() -> None:
    cfg = {"dp": {"level": "none"}}  # no fedddpm section at all (older config)
    ok, detail = evaluate_expression("fedddpm.upload != model or dp.level == record", cfg)
    assert ok and "absent" in detail
    ok, _ = evaluate_expression("fedddpm.upload == model", cfg)
    assert not ok
    ok, _ = evaluate_expression("secure_aggregation.protocol in [masking, ckks]", cfg)
    assert not ok  # a missing defence is not a defence
    ok, _ = evaluate_expression("dp.target_epsilon <= 8", {"dp": {"target_epsilon": None}})
    assert not ok  # no budget is not a small budget
    ok, _ = evaluate_expression("a.b <= 8 and c.d == x or e.f > 1", {"a": {"b": 3}, "e": {"f": 2}})
    assert ok


def _write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    p = tmp_path / "tm.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


BASE_TM = {
    "name": "t",
    "adversary": {"capabilities": ["x"]},
    "assets": ["records"],
    "requires": [{"id": "sa", "check": "secure_aggregation.protocol == masking"}],
    "criteria": [{"id": "auc", "metric": "attacks.pia.auc", "op": "<=", "value": 0.6}],
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"requires": [{"id": "x", "check": "secure_aggregation.protocl == masking"}]}, "protocl"),
        ({"requires": [{"id": "x", "check": "dp.level ~ record"}]}, "cannot parse"),
        ({"requires": [{"id": "x", "check": "dp.level in record"}]}, "list value"),
        ({"criteria": [{"id": "a", "metric": "attacks.nope.auc", "op": "<=", "value": 1}]}, "nope"),
        ({"criteria": [{"id": "a", "metric": "attacks.pia.auc", "op": "=<", "value": 1}]}, "op"),
        ({"criteria": [{"id": "sa", "metric": "epsilon.eps_lb", "op": "<=", "value": 1}]}, "dup"),
        ({"targets": ["everything"]}, "targets"),
        ({"extra": 1}, "unknown keys"),
        ({"assets": []}, "assets"),
    ],
)
def test_malformed_threat_models_name_the_problem(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ThreatModelError, match=message):
        load_threat_model(_write(tmp_path, {**BASE_TM, **change}))


def test_unknown_section_is_allowed_for_features_not_yet_in_the_schema(tmp_path: Path) -> None:
    doc = {**BASE_TM, "requires": [{"id": "f", "check": "futurefeature.mode != leaky"}]}
    tm = load_threat_model(_write(tmp_path, doc))
    assert check_config(tm, _resolved({}))[0].passed


def test_cli_threats_check_and_run_refuse_before_training(tmp_path: Path, capsys: Any) -> None:
    weak = tmp_path / "weak.yaml"
    weak.write_text(yaml.safe_dump({"name": "weak", "dp": {"level": "none"}}))
    assert main(["threats", "check", str(weak), "--threat-model", "external_released_model"]) == 1
    err = capsys.readouterr().err
    assert "differential-privacy" in err and "epsilon-budget" in err
    strong = tmp_path / "strong.yaml"
    strong.write_text(yaml.safe_dump(STRONG))
    assert main(["threats", "check", str(strong), "--threat-model", "malicious_server"]) == 0
    out_dir = tmp_path / "run"
    rc = main(
        ["run", str(weak), "--out", str(out_dir), "--threat-model", "honest_but_curious_server"]
    )
    assert rc == 1 and not out_dir.exists()  # refused before anything was trained or written
    assert "secure-aggregation" in capsys.readouterr().err
    assert main(["threats", "check", str(weak), "--threat-model", "no_such_model"]) == 2
