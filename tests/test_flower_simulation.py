"""The deployment's ServerApp/ClientApp under Flower's Simulation Runtime (Ray backend).

The same experiment runs twice: through ``flwr run`` on 3 virtual SuperNodes hosted by Ray
(real SuperLink in simulation mode, real coordinator, real masking protocol, real site handlers
with their own ledgers) and in-process (``securefed run``). The global models agree within the
masking grid and every site's ledger equals the simulation's entries for that client.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from securefed.deploy.simulation_runtime import SIMULATION_ENV, SITE_CONFIG_ENV, site_node_config
from tests.deploy_helpers import (
    assert_matches_simulation,
    ckpt_params,
    deploy_cfg,
    write_cfg,
)
from tests.helpers import metrics_rows

#: deployment tests (Flower processes, sites, the deploy protocol): in `make test`, left out
#: of `make test-unit`
pytestmark = pytest.mark.deploy


def test_a_real_supernode_never_takes_its_folders_from_the_run_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outside the Simulation Runtime a coordinator cannot point a site's ledger elsewhere."""
    virtual = {"partition-id": 1, "num-partitions": 3}
    rc = {"sim-state-root": "/coordinator/chosen", "sim-keys-dir": "/coordinator/keys"}
    monkeypatch.delenv(SIMULATION_ENV, raising=False)
    with pytest.raises(ValueError, match="state-dir: required"):
        site_node_config(virtual, rc)
    # a site with its own node config is never rewritten, simulation or not
    own = {"state-dir": "/site/state", "keys-dir": "/site/keys", "partition-id": 1}
    assert site_node_config(own, rc) == own
    monkeypatch.setenv(SIMULATION_ENV, "1")
    assert site_node_config(own, rc) == own
    assert site_node_config(virtual, rc) == {
        "state-dir": str(Path("/coordinator/chosen") / "site_1"),
        "keys-dir": "/coordinator/keys", "partition-id": 1,
    }
    with pytest.raises(ValueError, match="sim-state-root"):
        site_node_config(virtual, {"sim-keys-dir": "/k"})
    # the virtual sites' policy knobs come from their own environment, not the run config
    monkeypatch.setenv(SITE_CONFIG_ENV, '{"min-cohort": 2}')
    assert site_node_config(virtual, rc)["min-cohort"] == 2
    monkeypatch.setenv(SITE_CONFIG_ENV, '{"state-dir": "/elsewhere"}')
    with pytest.raises(ValueError, match="per virtual site"):
        site_node_config(virtual, rc)


@pytest.mark.deploy
@pytest.mark.timeout(900)
def test_flower_simulation_runtime_matches_the_in_process_simulation(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from securefed.deploy.simulation_runtime import FlowerSimulation
    from securefed.run import run_experiment

    # the sites' default floors (min-threshold 2/3, min-cohort 3): t = 3 of 3; seeded noise is
    # the sites' own opt-in (a rehearsal), so both paths draw the same noise. FedDDPM: phase 0
    # travels as its own Flower message (the sites opt in to the upload), then the masking
    # stages with the next round's keys on the unmasking stage
    cfg = deploy_cfg(secure_aggregation={"threshold": 0.67},
                     fedddpm={"enabled": True, "variant": "fedddpm", "pretrain_epochs": 1.0,
                        "aux_total": 24, "calibration_steps": 2, "server_batch_size": 8,
                        "aux_sampling_steps": 4})
    exp = write_cfg(tmp_path / "experiment.yaml", cfg)
    run_dir = tmp_path / "flower-sim"
    fed = FlowerSimulation(tmp_path / "fed", 3, ray_cpus=min(2, os.cpu_count() or 1),
                           site_config={"allow-seeded-noise": True,
                                        "allow-individual-uploads": True})
    t0 = time.monotonic()
    try:
        fed.start()
        fed.run(exp, run_dir, {"stage-timeout": 240.0, "train-timeout": 480.0}, timeout=600)
    except BaseException:
        print(fed.log_tail())
        raise
    finally:
        fed.stop()
    flower_seconds = time.monotonic() - t0
    t1 = time.monotonic()
    sim = run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
    sim_seconds = time.monotonic() - t1

    rows = metrics_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["participants"] == [0, 1, 2] and r["dropped"] == [], r
    assert torch.isfinite(ckpt_params(run_dir, 2)).all()
    # the model within the masking grid; each virtual site kept its own ledger, equal to the
    # simulation's entries for it
    assert_matches_simulation(
        cfg, run_dir, tmp_path / "sim", sim.final_params,
        [fed.site_state_dir(i) / "privacy_ledger.json" for i in range(3)], entries=3,
    )
    assert sorted(p.name for p in (run_dir / "received").iterdir()) == [
        f"client_{i}_samples.npz" for i in range(3)]
    print("flower simulation timing:", json.dumps({
        "flower_sim_total_s": round(flower_seconds, 1),
        "flower_sim_round_s": [r["seconds"]["round_total"] for r in rows],
        "in_process_total_s": round(sim_seconds, 1),
    }))


def test_flower_sim_cli_refuses_a_used_run_directory(tmp_path: Path) -> None:
    from securefed.cli import main

    exp = write_cfg(tmp_path / "experiment.yaml", deploy_cfg())
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert main(["flower-sim", str(exp), "--out", str(out)]) == 2
    assert (out / "metrics.jsonl").read_text() == "{}\n"  # nothing written over


def test_flower_sim_cli_resume_needs_the_interrupted_run(tmp_path: Path) -> None:
    """``--resume`` continues a run in --out with its --work (the sites' states); without one
    it is refused before anything starts, naming both flags."""
    from securefed.cli import main

    exp = write_cfg(tmp_path / "experiment.yaml", deploy_cfg())
    assert main(["flower-sim", str(exp), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert not (tmp_path / "none.flower").exists()  # no SuperLink was started


def test_waiting_ignores_an_earlier_sessions_status(tmp_path: Path) -> None:
    """A resumed run dir holds the status of its earlier session: a ``finished`` written
    before the new session started is not this session's end."""
    from securefed.deploy.loopback import wait_for_finished

    status = tmp_path / "status.json"
    now = time.time()
    status.write_text(json.dumps({"stage": "finished", "time": now - 60}))
    with pytest.raises(TimeoutError):
        wait_for_finished(tmp_path, None, 0.5, since=now)
    assert wait_for_finished(tmp_path, None, 0.5)["stage"] == "finished"  # no since: as before
    status.write_text(json.dumps({"stage": "finished", "time": now + 1}))
    assert wait_for_finished(tmp_path, None, 0.5, since=now)["time"] == now + 1


def test_the_client_app_handles_every_message_the_coordinator_sends() -> None:
    """A message type without a ClientApp handler fails at a real site (the in-process tests
    call the site handlers directly, so they would not notice)."""
    from securefed.deploy.client_app import app
    from securefed.deploy.wire import (
        MESSAGE_CKKS_DECRYPT,
        MESSAGE_CKKS_UPLOAD,
        MESSAGE_PHASE0,
        MESSAGE_SETUP,
        stage_message_type,
    )
    from securefed.secagg.masking.messages import Stage

    sent = {MESSAGE_SETUP, MESSAGE_PHASE0, MESSAGE_CKKS_UPLOAD, MESSAGE_CKKS_DECRYPT,
            *(stage_message_type(s) for s in Stage.ORDER)}
    assert sent <= set(app._registered_funcs)
