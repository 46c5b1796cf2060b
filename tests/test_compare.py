"""experiments/compare.py: every grid cell is a valid config with equal client steps; tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from securefed.config import parse_config
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compare() -> Any:
    return load_script("compare")


def test_every_cell_of_the_grid_is_a_valid_config_with_equal_client_steps(compare: Any) -> None:
    sc = compare.SCALES["full"]
    for method in compare.METHODS:
        for part in compare.PARTITIONS:
            cfg = parse_config(compare.build_raw(method, part, 1, "full"))
            assert cfg.seed == 1 and cfg.federation.rounds == sc["rounds"]
            if method == "centralized":  # one client holding everything, 10x the local steps
                assert cfg.federation.num_clients == 1 and cfg.partition.kind == "iid"
                assert cfg.client.local_steps == 10 * sc["local_steps"]
                continue
            assert cfg.federation.num_clients == 10
            # fedavg_eq74: FedAvg at fedddpm_pre30's client compute (hetero regime), on purpose
            want_steps = 74 if method == "fedavg_eq74" else sc["local_steps"]
            assert cfg.client.local_steps == want_steps
            assert cfg.partition.kind == compare.PARTITIONS[part]["kind"]
            assert (cfg.dp.level == "record") == method.endswith("_dp")
            if cfg.dp.level == "record":
                assert cfg.dp.target_epsilon == 10
            assert cfg.fedddpm.enabled == method.startswith("fedddpm")
            assert cfg.pretrain.enabled == ("_pub" in method)
            assert cfg.feddiffuse.enabled == method.startswith("feddiffuse")
            if method.startswith("fedddpm"):
                want = "fedddpm_plus" if "plus" in method else "fedddpm"
                assert cfg.fedddpm.variant == want


def test_hetero_regime_cells(compare: Any) -> None:
    iid = parse_config(compare.build_raw("fedavg", "iid", 0, "hetero"))
    shards = parse_config(compare.build_raw("fedavg", "shards1", 0, "hetero"))
    assert (iid.federation.rounds, iid.client.local_steps) == (4, 40)  # equal client steps
    assert (shards.federation.rounds, shards.client.local_steps) == (4, 40)
    assert shards.partition.kind == "shards" and shards.partition.classes_per_client == 1
    good = parse_config(compare.build_raw("fedddpm_pre30_f10", "shards1", 0, "hetero"))
    fresh = parse_config(compare.build_raw("fedddpm_pre30_f10_fresh", "shards1", 0, "hetero"))
    assert good.fedddpm.pretrain_epochs == 30 and good.fedddpm.calibration_fraction == 0.1
    assert good.fedddpm.server_optimizer_state == "persistent"
    assert fresh.fedddpm.server_optimizer_state == "fresh"
    assert fresh.fedddpm.model_copy(update={"server_optimizer_state": "persistent"}) == good.fedddpm
    eq = parse_config(compare.build_raw("fedavg_eq74", "shards1", 0, "hetero"))
    # 10 x 4 x 74 client steps ~ 10 x 4 x 40 federated + 1,352 phase-0 steps of fedddpm_pre30
    assert abs(10 * 4 * eq.client.local_steps - (10 * 4 * 40 + 1352)) <= 10


def test_sweep_methods_override_one_knob(compare: Any) -> None:
    compare.register_sweep("fedddpm_cal30")
    compare.register_sweep("fedddpm_pre12")
    base = parse_config(compare.build_raw("fedddpm", "dir0.1", 0, "tiny"))
    cal = parse_config(compare.build_raw("fedddpm_cal30", "dir0.1", 0, "tiny"))
    pre = parse_config(compare.build_raw("fedddpm_pre12", "dir0.1", 0, "tiny"))
    assert cal.fedddpm.calibration_steps == 30 != base.fedddpm.calibration_steps
    assert pre.fedddpm.pretrain_epochs == 12 != base.fedddpm.pretrain_epochs
    assert pre.fedddpm.calibration_steps == base.fedddpm.calibration_steps
    with pytest.raises(SystemExit, match="unknown method 'fedddpm_calx'"):
        compare.register_sweep("fedddpm_calx")


def _rows() -> list[dict[str, Any]]:
    def row(method: str, part: str, seed: int, fid: float, **kw: Any) -> dict[str, Any]:
        return {"method": method, "partition": part, "seed": seed, "fid": fid,
                "fid_worst": kw.get("worst"), "precision": 0.5, "recall": 0.9,
                "server_steps": kw.get("steps", 0), "params_exchanged": kw.get("params", 100),
                "wall_seconds": 10.0, "fid_curve": [[4, fid * 2], [8, fid]]}

    return [
        row("fedavg", "dir0.1", 0, 1.0), row("fedavg", "dir0.1", 1, 3.0),
        row("feddiffuse_udec", "dir0.1", 0, 2.0, worst=4.0, params=44),
        row("centralized", "iid", 0, 0.5, params=10),
        row("fedddpm_plus", "dir0.1", 0, 1.5, steps=60),
    ]


def test_table_means_stds_and_exchange_ratio(compare: Any) -> None:
    table = compare.make_table(_rows(), list(compare.METHODS), ["dir0.1"])
    lines = {ln.split(" | ")[1]: ln for ln in table.splitlines()[2:]}
    assert "| 2.00 ± 1.41 |" in lines["fedavg"]  # mean and sample std over two seeds
    assert "| 0.44x |" in lines["feddiffuse_udec"] and "| 4.00 |" in lines["feddiffuse_udec"]
    assert "| 60 |" in lines["fedddpm_plus"]
    assert "| 0.50 |" in lines["centralized"]  # the IID centralized run is every partition's row
    assert "scaffold" not in lines  # no results: no row


def test_plot_is_written(compare: Any, tmp_path: Path) -> None:
    path = tmp_path / "fid.png"
    compare.plot_fid(_rows(), ["dir0.1", "iid"], path)
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_readme_block_is_replaced_and_a_missing_block_refused(compare: Any,
                                                              tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- compare:begin -->\nold\n<!-- compare:end -->\ntail\n")
    compare.update_readme(readme, "NEW TABLE")
    assert readme.read_text() == (
        "head\n<!-- compare:begin -->\nNEW TABLE\n<!-- compare:end -->\ntail\n"
    )
    other = tmp_path / "other.md"
    other.write_text("no block")
    with pytest.raises(SystemExit, match="compare:begin"):
        compare.update_readme(other, "x")
    assert other.read_text() == "no block"


def test_public_start_methods_share_the_quickstarts_public_model(compare: Any) -> None:
    import yaml

    quick = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    fa = parse_config(compare.build_raw("fedavg_pub_dp", "shards1", 0, "hetero"))
    fd = parse_config(compare.build_raw("fedddpm_pre10_f10_pub_dp", "shards1", 2, "hetero"))
    plain = parse_config(compare.build_raw("fedavg_dp", "shards1", 0, "hetero"))
    for cfg in (fa, fd):
        assert cfg.pretrain.enabled and cfg.dp.level == "record" and cfg.dp.target_epsilon == 10
        assert cfg.pretrain.data.name == "mnist5k" and cfg.pretrain.data.name != cfg.data.name
        for k in ("steps", "batch_size", "lr"):  # the quickstart's public pre-training
            assert getattr(cfg.pretrain, k) == quick["pretrain"][k]
    # the public start is the ONLY difference from the plain DP arm
    assert fa.model_copy(update={"pretrain": plain.pretrain, "name": plain.name}) == plain
    assert fd.fedddpm.pretrain_epochs == 10 and fd.fedddpm.calibration_fraction == 0.1


def test_calibration_budget_ablation_changes_only_the_fraction(compare: Any) -> None:
    ref = parse_config(compare.build_raw("fedddpm_pre30_f10", "shards1", 0, "hetero")).fedddpm
    for name, f in (("fedddpm_pre30_f05", 0.05), ("fedddpm_pre30_f20", 0.2)):
        fd = parse_config(compare.build_raw(name, "shards1", 0, "hetero")).fedddpm
        assert fd.calibration_fraction == f
        assert fd.model_copy(update={"calibration_fraction": 0.1}) == ref


def test_fedddpm_plus_w1_detector_fires_within_the_hetero_rounds(compare: Any) -> None:
    """The aux-holdout losses FedDDPM+ measured on shards1 seed 0 (hetero, rounds 1-4): the
    default detector (window 2, 2%) never fires on them, the ``_w1`` one (window 1, 5%) fires
    once at round 3; neither fires while the loss drops by >= 10% a round."""
    from securefed.strategies.fedddpm_plus import SlowLearningDetector, drive

    measured = [0.215412, 0.175866, 0.169497, 0.164199]
    steady = [1.0, 0.9, 0.8, 0.7]

    def fired(method: str, losses: list[float]) -> list[bool]:
        fd = parse_config(compare.build_raw(method, "shards1", 0, "hetero")).fedddpm
        det = SlowLearningDetector(fd.detector_window, fd.detector_threshold, fd.max_corrections)
        return [d.fire for d in drive(det, losses)]

    assert fired("fedddpm_plus_pre30", measured) == [False] * 4
    assert fired("fedddpm_plus_pre30_w1", measured) == [False, False, True, False]
    assert fired("fedddpm_plus_pre30_w1", steady) == [False] * 4
    assert fired("fedddpm_plus_pre30_w1c160", measured) == [False, False, True, False]
    c160 = parse_config(compare.build_raw("fedddpm_plus_pre30_w1c160", "shards1", 0, "hetero"))
    assert c160.fedddpm.correction_steps == 160  # fedddpm_pre30_f10's 4 x 40 server steps
