"""Client-level canary clients (issue 15, item 1; Andrew et al. 2024) in `securefed run`: drawn
from a secret key (never the config seed), sampled like real clients, S u_i through the real
aggregation path, files 0600, picked up by `securefed audit`; a lying (no-noise) client-level
run fails `dp-holds` and its honest twin passes; resume keeps the audited scores consistent."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from securefed.audit.harness import under_noised_runs
from securefed.audit.runner import AuditSettings, run_audit
from securefed.audit.threats import load_threat_model
from securefed.config import parse_config
from securefed.privacy.canaries import (
    CanaryClients,
    ClientCanaryRound,
    load_client_scores,
    load_gradient_scores,
)
from securefed.run import run_experiment


def _raw(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "canary-clients",
        "seed": 3,
        "data": {"name": "digits", "max_examples": 192, "holdout_fraction": 0.5},
        "partition": {"kind": "iid"},
        "model": {"base_channels": 8, "channel_mults": [1, 2], "norm_groups": 4},
        "diffusion": {"timesteps": 50},
        "federation": {"num_clients": 6, "rounds": 6, "fraction_fit": 0.5, "min_fit_clients": 3},
        "client": {"local_steps": 1, "batch_size": 16},
        "secure_aggregation": {"protocol": "plain"},
        "dp": {"level": "client", "target_epsilon": 1.0, "delta": 1e-5, "max_update_norm": 0.5},
        "canaries": {"enabled": True, "m": 400},
        "evaluation": {"fid": False, "every": 100, "grid_samples": 4, "sampling_steps": 2},
    }
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and k in raw else v
    return raw


def _model() -> torch.nn.Module:
    from securefed.builders import build_model

    return build_model(parse_config(_raw()), (1, 8, 8), 10)


@pytest.fixture(scope="module")
def lying_and_honest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same config and seed twice through `run_experiment` (6 clients, 3 per round, 6
    rounds, 400 canary clients, ledger calibrated to epsilon 1): LYING aggregates without the
    noise (UnderNoisedProtocol, factor 0), HONEST with it."""
    cfg = parse_config(_raw())
    out = {}
    for name, factor in (("lying", 0.0), ("honest", 1.0)):
        d = tmp_path_factory.mktemp(name) / "run"
        with under_noised_runs(factor):
            run_experiment(cfg, d, progress=False, write_report=False)
        out[name] = d
    return out


def test_canary_clients_are_keyed_by_the_secret_not_the_config_seed(
    lying_and_honest: dict[str, Path],
) -> None:
    """Two runs of the same config.yaml and seed draw different canary clients (the key is
    fresh os.urandom), and the key alone reproduces the draw and the per-round sampling."""
    a = CanaryClients.load(lying_and_honest["lying"] / "canaries")
    b = CanaryClients.load(lying_and_honest["honest"] / "canaries")
    assert a is not None and b is not None and a.key != b.key
    assert (lying_and_honest["lying"] / "config.yaml").read_text() == (
        lying_and_honest["honest"] / "config.yaml"
    ).read_text()
    assert not np.array_equal(a.included, b.included)
    assert not np.array_equal(a.flat, b.flat)
    assert not np.array_equal(a.sample(1, 0.5), b.sample(1, 0.5))
    c = CanaryClients.draw(_model(), len(a), key=a.key)
    assert np.array_equal(c.included, a.included) and np.array_equal(c.flat, a.flat)
    assert np.array_equal(c.sample(4, 0.5), a.sample(4, 0.5))
    assert 0.35 < a.included.mean() < 0.65 and len(set(a.flat.tolist())) == len(a)


def test_canary_files_are_0600_and_never_released(lying_and_honest: dict[str, Path]) -> None:
    run = lying_and_honest["honest"]
    d = run / "canaries"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = [f for f in d.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"canary.key", "clients.npz", "round_00006.npz"}
    for f in d.rglob("*"):
        want = 0o600 if f.is_file() else 0o700
        assert stat.S_IMODE(f.stat().st_mode) == want, f
    assert not any("canar" in p.name for p in (run / "checkpoints").rglob("*"))


def test_canary_clients_enter_the_released_sum(lying_and_honest: dict[str, Path]) -> None:
    """Without noise the score of a sampled canary is what the server received along u_i in
    units of S: 1 (its S u_i) plus the real clients' clipped deltas on that coordinate (tiny);
    sampled at the clients' rate (3 of 6) and never more often than the budget allows."""
    rec = load_client_scores(lying_and_honest["lying"] / "canaries")
    assert rec is not None and rec.rounds == [1, 2, 3, 4, 5, 6]
    inc = rec.canaries.included
    k = np.array([len(h) for h in rec.histories])
    assert 0.4 < k.mean() / 6 < 0.6  # rate 3/6 per round (before the budget cap)
    per = rec.scores / np.maximum(k, 1)
    assert np.all(np.abs(per[inc & (k > 0)] - 1.0) < 0.2)
    assert np.all(np.abs(per[~inc & (k > 0)]) < 0.2)
    assert np.all(rec.scores[k == 0] == 0.0)
    # the cap: no canary is charged beyond the real clients' target epsilon (epsilon 1)
    from securefed.privacy import PrivacyLedger, epsilon_of

    led = PrivacyLedger.load(lying_and_honest["lying"] / "privacy_ledger.json")
    plan = led.get_plan(led.clients[0])
    worst = max(rec.histories, key=len)
    assert epsilon_of([(z, 1.0, 1) for z in worst], plan.delta, plan.accountant) <= 1.0 + 1e-9


def test_lying_client_level_run_fails_dp_holds_and_honest_run_passes(
    lying_and_honest: dict[str, Path],
) -> None:
    tm = load_threat_model("external_released_model")
    st = AuditSettings(attacks=("loss",), max_examples=32, bootstrap=10, progress=False)
    lying = run_audit(lying_and_honest["lying"], [tm], st)
    eps = lying.epsilon
    assert "canary clients" in eps["source"]
    assert eps["accountant_canary_clients"] is not None
    assert eps["accountant"] == pytest.approx(1.14, abs=0.1)
    assert eps["eps_lb"] >= 3.0 and eps["eps_lb"] > eps["accountant"]
    assert next(c for c in lying.criteria if c.id == "dp-holds").outcome == "FAIL"
    assert "andrew_cosine" in eps["bounds"][0]  # the diagnostic estimate is reported
    honest = run_audit(lying_and_honest["honest"], [tm], st)
    assert honest.epsilon["eps_lb"] <= honest.epsilon["accountant"]
    assert next(c for c in honest.criteria if c.id == "dp-holds").outcome == "PASS"


def test_canary_round_adds_s_u_i_and_scores_it() -> None:
    """The round's vector is exactly the sum of the sampled included canaries' S u_i inside the
    delta block; scoring a noiseless sum gives 1 for them and 0 for the rest."""
    model = _model()
    cc = CanaryClients.draw(model, 50, key=bytes(range(32)))
    sampled = cc.sample(1, 0.5)
    r = ClientCanaryRound.__new__(ClientCanaryRound)
    r.canaries, r.clip, r.sampled, r.released = cc, 0.5, sampled, False
    d = int(sum(p.numel() for p in model.parameters()))
    total = r.add_to(np.zeros(d + 2), 0, d)
    on = sampled & cc.included
    assert np.count_nonzero(total) == on.sum()
    assert np.linalg.norm(total) == pytest.approx(0.5 * np.sqrt(on.sum()))
    r.observe(total[:d])
    assert np.array_equal(r.scores[on], np.ones(on.sum()))
    assert np.all(r.scores[~on] == 0.0)
    with pytest.raises(RuntimeError, match="cohort"):
        r.observe(total[:d])


class _Killed(Exception):
    pass


def _killed_after_round_3(cfg: Any, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run until round 3 has trained, aggregated and written its canary file and metrics, and
    kill it just before round 3's checkpoint: the released checkpoint is round 2."""
    from securefed.federation.engine import RoundEngine

    orig = RoundEngine.save

    def save(self: RoundEngine, ckpt_dir: Path, meta: Any) -> None:
        if self.round == 3:
            raise _Killed
        orig(self, ckpt_dir, meta)

    with monkeypatch.context() as mp:
        mp.setattr(RoundEngine, "save", save)
        with pytest.raises(_Killed):
            run_experiment(cfg, run, progress=False, write_report=False)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_client_level_resume_audits_only_up_to_the_released_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from securefed.audit.targets import load_audit_run

    cfg = parse_config(_raw(federation={"rounds": 4}, canaries={"m": 100}))
    run = tmp_path / "run"
    _killed_after_round_3(cfg, run, monkeypatch)
    d = run / "canaries"
    before = _files(d / "client_rounds")
    assert sorted(before) == [f"round_0000{r}.npz" for r in (1, 2, 3)]
    # before the resume the audit reads the released checkpoint's rounds only
    rec = load_client_scores(d, 2)
    assert rec is not None and rec.rounds == [1, 2]
    ar = load_audit_run(run, torch.device("cpu"))
    (name,) = ar.canary_scores
    assert "rounds 1-2" in name
    assert np.allclose(ar.canary_scores[name][0], rec.statistic)
    third = np.load(d / "client_rounds" / "round_00003.npz")
    s3, smp3 = third["scores"].copy(), third["sampled"].copy()
    run_experiment(cfg, run, resume=True, progress=False, write_report=False)
    after = _files(d / "client_rounds")
    assert sorted(after) == [f"round_0000{r}.npz" for r in (1, 2, 3, 4)]
    for r in ("round_00001.npz", "round_00002.npz"):
        assert before[r] == after[r]  # released rounds are never rewritten
    replay = np.load(d / "client_rounds" / "round_00003.npz")
    # the replay samples the same canaries (keyed draw, histories rebuilt from the files) and
    # re-scores them on its own fresh-noise release: the file holds the replay
    assert np.array_equal(replay["sampled"], smp3)
    assert not np.array_equal(replay["scores"], s3)
    full = load_client_scores(d)
    assert full is not None and full.rounds == [1, 2, 3, 4]
    parts = [np.load(d / "client_rounds" / f"round_0000{r}.npz")["scores"] for r in (1, 2, 3, 4)]
    assert np.allclose(full.scores, np.sum(parts, axis=0))
    assert "rounds 1-4" in next(iter(load_audit_run(run, torch.device("cpu")).canary_scores))


def test_record_level_resume_gives_the_same_canary_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Record level: a run killed after round 3's canaries were written but before its
    checkpoint replays round 3 with the same keyed noise and sampling, so every round's canary
    scores after the resume equal those written before it, and the audit reads rounds up to
    the released checkpoint."""
    raw = _raw(
        federation={"num_clients": 2, "rounds": 4, "fraction_fit": 1.0, "min_fit_clients": 1},
        client={"local_steps": 2, "batch_size": 16},
        canaries={"m": 100},
    )
    raw["dp"] = {"level": "record", "target_epsilon": 8.0, "delta": 1e-5}
    cfg = parse_config(raw)
    run = tmp_path / "run"
    _killed_after_round_3(cfg, run, monkeypatch)
    d = run / "canaries"
    before = _files(d / "gradient_rounds")
    assert sorted(before) == [f"round_0000{r}.npy" for r in (1, 2, 3)]
    got = load_gradient_scores(d, 2)
    assert got is not None and got[2] == [1, 2]
    run_experiment(cfg, run, resume=True, progress=False, write_report=False)
    after = _files(d / "gradient_rounds")
    assert sorted(after) == [f"round_0000{r}.npy" for r in (1, 2, 3, 4)]
    for r in before:
        assert before[r] == after[r], r
    got = load_gradient_scores(d, 4)
    assert got is not None and got[2] == [1, 2, 3, 4]


def test_canary_clients_leave_the_real_clients_noise_and_charges_unchanged(
    lying_and_honest: dict[str, Path], tmp_path: Path
) -> None:
    """The same config without canaries plans the same noise, charges the same multiplier each
    round and ends with the same ledger: the canaries change nobody's calibration."""
    from securefed.io import read_jsonl
    from securefed.privacy import PrivacyLedger

    run = tmp_path / "run"
    run_experiment(parse_config(_raw(canaries={"enabled": False})), run, progress=False,
                   write_report=False)
    assert not (run / "canaries").exists()
    with_c = read_jsonl(lying_and_honest["honest"] / "metrics.jsonl")
    without = read_jsonl(run / "metrics.jsonl")
    assert len(with_c) == len(without) == 6
    for a, b in zip(with_c, without, strict=True):
        assert a["selected"] == b["selected"]  # the public selection is the config seed's
        for k in ("clip", "noise_std", "charged_multiplier", "min_survivors"):
            assert a["client_dp"][k] == b["client_dp"][k], k
    la = PrivacyLedger.load(lying_and_honest["honest"] / "privacy_ledger.json")
    lb = PrivacyLedger.load(run / "privacy_ledger.json")
    assert la.clients == lb.clients
    for c in la.clients:
        assert la.history(c) == lb.history(c)
