"""Config: every shipped experiment loads; bad input names the path, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from securefed.config import ConfigError, dump_config, load_config, parse_config

_ALL = sorted(Path(__file__).parent.parent.joinpath("experiments").glob("*.yaml"))
# audit_*.yaml are audit specs (a base ExperimentConfig + variants), checked separately below
EXPERIMENTS = [p for p in _ALL if not p.name.startswith("audit_")]
AUDIT_SPECS = [p for p in _ALL if p.name.startswith("audit_")]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path: Path) -> None:
    cfg = load_config(path)
    again = parse_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("path", AUDIT_SPECS, ids=lambda p: p.name)
def test_shipped_audit_specs_give_valid_configs(path: Path) -> None:
    from securefed.audit.experiment import _variant_config

    spec = yaml.safe_load(path.read_text())
    assert spec["variants"], f"{path.name}: no variants"
    for v in spec["variants"]:
        cfg = _variant_config(spec["base"], v, float(spec.get("delta", 1e-5)))
        assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_required_experiments_exist() -> None:
    names = {p.name for p in EXPERIMENTS}
    assert {"quickstart.yaml", "centralized_digits.yaml", "fedavg_dirichlet.yaml"} <= names


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"partition": {"alpha": -1}}, "partition.alpha: Input should be greater than 0, got -1"),
        ({"federation": {"num_clients": 0}}, "federation.num_clients"),
        ({"colour": "red"}, "colour: unknown key"),
        ({"model": {"widths": [1]}}, "model.widths: unknown key"),
        ({"client": {"lr": "fast"}}, "client.lr"),
        ({"data": {"name": "imagenet"}}, "data.name"),
        ({"data": {"name": "mnist"}}, "data.root: dataset 'mnist' is loaded from local files"),
        ({"client": {"local_steps": 5, "local_epochs": 1}}, "exactly one of local_steps"),
        ({"model": {"attention_levels": [3]}}, "model.attention_levels: level 3 does not exist"),
        ({"model": {"base_channels": 30, "norm_groups": 8}}, "model.norm_groups"),
        ({"diffusion": {"beta_start": 0.1, "beta_end": 0.01}}, "diffusion.beta_end"),
        ({"partition": {"kind": "site"}}, "partition.kind: 'site' needs data.name 'image_folder'"),
        ({"federation": {"num_clients": 2, "min_fit_clients": 3}}, "federation.min_fit_clients"),
        ({"secure_aggregation": {"threshold": 2.5}}, "secure_aggregation.threshold"),
        ({"secure_aggregation": {"neighbours": 1}}, "secure_aggregation.neighbours"),
    ],
)
def test_bad_values_name_the_path(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert needle in str(info.value)


def test_config_is_frozen() -> None:
    cfg = parse_config({})
    with pytest.raises(Exception, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]


def test_load_config_errors_and_overrides(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    good = tmp_path / "good.yaml"
    good.write_text("federation:\n  rounds: 3\n")
    cfg = load_config(good, {"partition.kind": "dirichlet", "partition.alpha": 0.1})
    assert cfg.federation.rounds == 3 and cfg.partition.alpha == 0.1
