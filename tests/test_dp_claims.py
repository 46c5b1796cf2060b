"""Issue 14: the DP claims hold in every run (noise multiplicity, sampling, resume, seeds, ...)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import securefed
from securefed.client.dp import dp_row_losses, poisson_batches, sampling_source_of
from securefed.data import ImageDataset
from securefed.diffusion import NoiseSchedule, UNet
from securefed.diffusion.loss import diffusion_loss_from_draws, draw_timesteps_and_noise
from securefed.diffusion.params import get_flat
from securefed.noise.secure_noise import SecureGaussian
from securefed.privacy import PrivacyLedger
from securefed.seeds import Purpose, derive_seed
from securefed.strategies.base import LocalObjective
from tests.helpers import tiny_config

B = 3


def _model_and_schedule() -> tuple[UNet, NoiseSchedule]:
    cfg = tiny_config()
    torch.manual_seed(0)
    model = UNet(cfg.model, 1, 8, None)
    # non-zero output layers, so that every parameter gets a gradient
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.05)
    return model, NoiseSchedule.from_config(cfg.diffusion)


def _true_per_example(
    model: UNet, schedule: NoiseSchedule, x0: torch.Tensor, k: int, seed: int
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Each example's loss (mean over its K draws) and its gradient, one example at a time."""
    t, noise = draw_timesteps_and_noise(
        schedule, x0, k, generator=torch.Generator().manual_seed(seed)
    )
    losses, grads = [], []
    params = list(model.parameters())
    for b in range(x0.shape[0]):
        loss = diffusion_loss_from_draws(
            model, schedule, x0[b : b + 1], t[:, b : b + 1], noise[:, b : b + 1]
        )[0]
        losses.append(loss.detach())
        grads.append(list(torch.autograd.grad(loss, params)))
    return torch.stack(losses), grads


class _Zero:
    def normal(self, shape, std, device=None, dtype=torch.float32):
        return torch.zeros(tuple(shape), device=device, dtype=dtype)


@pytest.mark.parametrize("engine", ["fast", "opacus"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_noise_multiplicity_divides_once(engine: str, k: int) -> None:
    """The engines' per-example gradient is the gradient of the example's TRUE loss (mean of its K
    draws), computed independently: the old code divided by K twice (true/engine norm = K)."""
    model, schedule = _model_and_schedule()
    x0 = torch.rand(B, 1, 8, 8) * 2 - 1
    true_loss, true_grads = _true_per_example(model, schedule, x0, k, seed=5)
    true_norms = torch.stack(
        [torch.sqrt(sum(g.double().pow(2).sum() for g in gs)) for gs in true_grads]
    )
    expected = 2.5
    gsm = None
    if engine == "opacus":
        from securefed.privacy.opacus_engine import make_private_module

        gsm = make_private_module(model)
    lo, mid = true_norms.sort().values[:2].tolist()
    for clip in (1e6, (lo + mid) / 2):  # no clipping; then two of the three examples clipped
        factors = (clip / (true_norms + 1e-6)).clamp(max=1.0)
        want = [
            sum(float(factors[b]) * true_grads[b][j] for b in range(B)) / expected
            for j in range(len(true_grads[0]))
        ]
        gen = torch.Generator().manual_seed(5)
        if gsm is not None:
            from securefed.privacy.opacus_engine import opacus_dp_step

            stats = opacus_dp_step(
                gsm,
                lambda gsm=gsm, gen=gen: dp_row_losses(gsm, schedule, x0, None, k, generator=gen),
                expected_batch_size=expected, max_grad_norm=clip, noise_multiplier=0.0,
                noise_source=_Zero(), group_size=k,
            )
            params = [p for p in gsm.parameters() if p.requires_grad]
        else:
            from securefed.privacy.dp_step import dp_sgd_step

            stats = dp_sgd_step(
                model,
                lambda gen=gen: dp_row_losses(model, schedule, x0, None, k, generator=gen),
                batch_size_expected=expected, max_grad_norm=clip, noise_multiplier=0.0,
                noise_source=_Zero(), group_size=k,
            )
            params = list(model.parameters())
        assert stats.batch_size == B
        assert stats.mean_loss == pytest.approx(float(true_loss.mean()), rel=1e-5)
        assert stats.mean_norm == pytest.approx(float(true_norms.mean()), rel=1e-4)
        want_clipped = float((true_norms > clip).double().mean())
        assert stats.clipped_fraction == pytest.approx(want_clipped)
        for p, w in zip(params, want, strict=True):
            torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- item 4: seeds


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**64 - 1),
            st.sampled_from(list(Purpose)),
            st.integers(0, 2**20),
            st.integers(0, 2**20),
            st.integers(0, 3),
        ),
        min_size=2,
        max_size=8,
        unique=True,
    )
)
def test_distinct_seed_tuples_give_distinct_streams(tuples: list[tuple]) -> None:
    seeds = [derive_seed(s, p, r, c, ph) for s, p, r, c, ph in tuples]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= x < 2**63 for x in seeds)
    # distinct seeds start distinct torch streams
    firsts = {
        tuple(torch.randint(0, 2**62, (2,), generator=torch.Generator().manual_seed(x)).tolist())
        for x in seeds
    }
    assert len(firsts) == len(seeds)


def test_the_old_colliding_streams_are_apart() -> None:
    """Old layouts: FID at round 12 was (seed, 12, FID=5) and client 5's auxiliary sampling
    (seed, AUX_SAMPLE=12, 5): the same stream. The calibration stream of round 12 (seed, 12, 13)
    equalled client 13's (seed, 12, 13)."""
    s = 3
    assert derive_seed(s, Purpose.FID, 12) != derive_seed(s, Purpose.AUX_SAMPLE, 0, 5)
    assert derive_seed(s, Purpose.CALIBRATE, 12) != derive_seed(s, Purpose.AUX_SAMPLE, 0, 13)
    assert derive_seed(s, Purpose.TRAIN, 1, 0) != derive_seed(s, Purpose.TRAIN, 0, 1)


def test_seed_api_refuses_bare_purposes_and_bad_fields() -> None:
    with pytest.raises(TypeError, match="Purpose enum"):
        derive_seed(3, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="round must be an integer"):
        derive_seed(3, Purpose.FID, -1)
    with pytest.raises(ValueError, match="seed must be an integer"):
        derive_seed(True, Purpose.FID)  # type: ignore[arg-type]
    assert derive_seed(3, Purpose.FID, np.int64(4)) == derive_seed(3, Purpose.FID, 4)


def test_no_ad_hoc_seed_offsets_in_the_library() -> None:
    """Every stream goes through derive_seed: no ``seed + k`` / ``seed * k`` anywhere."""
    root = Path(securefed.__file__).parent
    pattern = re.compile(r"\bseed\w*\s*[-+*^]\s*\w|\w\s*[+*^]\s*\w*seed\b")
    offenders = [
        f"{p.relative_to(root)}:{i}: {line.strip()}"
        for p in sorted(root.rglob("*.py"))
        for i, line in _code_lines(p)
        if pattern.search(line)
    ]
    assert not offenders, offenders
    # the scan sees code, not text: a string such as "allow-seeded-noise" is not an offset
    assert pattern.search("x = seed + 1") and pattern.search("s = 7 * base_seed")


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, code)`` of a Python file with string literals and comments blanked."""
    import io
    import tokenize

    lines = path.read_text().splitlines()
    out = [list(line) for line in lines]
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type not in (tokenize.STRING, tokenize.COMMENT):
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            row = out[r - 1]
            lo = c0 if r == r0 else 0
            hi = c1 if r == r1 else len(row)
            row[lo:hi] = [" "] * (hi - lo)
    return [(i, "".join(row)) for i, row in enumerate(out, 1)]


# ----------------------------------------------------------------------------- item 1: sampling


def _dp_trainer(batch_size: int = 8, steps: int = 4):
    from securefed.client.dp import DPLocalTrainer

    model, schedule = _model_and_schedule()
    cfg = tiny_config(
        client__batch_size=batch_size, client__local_steps=steps, client__lr=0.05,
        dp__level="record", dp__target_epsilon=10.0,
    )
    return DPLocalTrainer(model, schedule, cfg.client, cfg.dp, torch.device("cpu")), model


def _digits(n: int) -> ImageDataset:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return ImageDataset(images, torch.zeros(n, dtype=torch.int64), 1, "random", ("x",))


def test_batches_depend_on_the_secret_key_not_on_the_seed() -> None:
    """Same public seed, different secret keys: different Poisson batches (hence, at sigma = 0,
    different models); same key: identical replay. The old code drew the batches from the seed,
    so two keys gave identical models."""
    trainer, model = _dp_trainer()
    data = _digits(40)
    start = get_flat(model)

    def train(key: bytes) -> torch.Tensor:
        return trainer.train_private(
            data, start, LocalObjective(), 12345, noise_multiplier=0.0,
            noise_source=SecureGaussian(key),
        ).params

    a, a2, b = train(bytes(32)), train(bytes(32)), train(bytes([1]) * 32)
    assert torch.equal(a, a2)  # exact replay through the key
    assert not torch.equal(a, b)


def test_poisson_batches_come_from_the_keyed_sampling_stream() -> None:
    key = bytes(range(32))
    coins = SecureGaussian(key).sampling_source()
    batches = poisson_batches(1000, 0.1, 5, coins)
    again = poisson_batches(1000, 0.1, 5, SecureGaussian(key).sampling_source())
    other = poisson_batches(1000, 0.1, 5, SecureGaussian(key[::-1]).sampling_source())
    assert all(torch.equal(x, y) for x, y in zip(batches, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(batches, other, strict=True))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert abs(float(sizes.mean()) - 100) < 4 * (1000 * 0.1 * 0.9 / 5) ** 0.5
    # the sampling stream is independent of the noise stream of the same key
    noise_u = SecureGaussian(key).uniform(1000)
    assert not torch.equal(noise_u, SecureGaussian(key).sampling_source().uniform(1000))
    with pytest.raises(TypeError, match="sampling_source"):
        sampling_source_of(object())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_run_batches_cannot_be_rebuilt_from_config_and_seed(
    tmp_path: Path, cache_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs of the SAME config.yaml (same seed) draw different batches: they are a function of
    each run's secret key, so config.yaml and the seed alone cannot reproduce them."""
    import securefed.client.dp as dp_mod
    from securefed.run import run_experiment

    seen: list[list[list[int]]] = []
    orig = dp_mod.poisson_batches

    def spy(n, q, steps, coins):
        out = orig(n, q, steps, coins)
        seen[-1].append([int(i) for b in out for i in b])
        return out

    monkeypatch.setattr(dp_mod, "poisson_batches", spy)
    cfg = tiny_config(dp__level="record", dp__target_epsilon=10.0, federation__rounds=1)
    for name in ("a", "b"):
        seen.append([])
        run_experiment(cfg, tmp_path / name, progress=False, write_report=False)
    assert len(seen[0]) == cfg.federation.num_clients
    assert seen[0] != seen[1]
    for got_a, got_b in zip(seen[0], seen[1], strict=True):
        assert got_a != got_b  # every client's batches differ


# ----------------------------------------------------------------------------- item 3: resume


def _crash_after_round_2(tmp_path: Path, tamper: bool) -> tuple[Path, torch.Tensor]:
    """Run 2 rounds, then pretend the run died after round 2 was charged and released but
    before its checkpoint (latest.json back at round 1). ``tamper``: the recorded digests of
    round 2 do not match what this machine replays (as after a CUDA -> CPU or thread-count
    change). Returns the run dir and the round-2 global model of the first attempt."""
    from securefed.artefacts.checkpoint import load_latest
    from securefed.io import atomic_write_json, sha256_file
    from securefed.run import run_experiment

    # 3 rounds planned (the budget has room for one extra charge), the run stops after 2
    cfg = tiny_config(dp__level="record", dp__target_epsilon=10.0, federation__rounds=3)
    run = tmp_path / "r"
    run_experiment(cfg, run, progress=False, write_report=False, stop_after_round=2)
    first = load_latest(run / "checkpoints").global_params
    ck = run / "checkpoints"
    atomic_write_json(
        ck / "latest.json",
        {"round": 1, "file": "round_0001.pt", "sha256": sha256_file(ck / "round_0001.pt")},
    )
    if tamper:
        raw = json.loads((run / "privacy_ledger.json").read_text())
        for e in raw["entries"]:
            if e["round"] == 2:
                e["update_sha256"] = "0" * 64
        (run / "privacy_ledger.json").write_text(json.dumps(raw))
    return run, first


def _resume(run: Path):
    from securefed.config import load_config
    from securefed.run import run_experiment

    cfg = load_config(run / "config.yaml")
    return run_experiment(
        cfg, run, resume=True, progress=False, write_report=False, stop_after_round=2
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_exact_replay_is_charged_once(tmp_path: Path, cache_env: Path) -> None:
    run, first = _crash_after_round_2(tmp_path, tamper=False)
    before = PrivacyLedger.load(run / "privacy_ledger.json")
    assert all(e.update_sha256 for e in before.entries)  # every release has its digest
    resumed = _resume(run)
    after = PrivacyLedger.load(run / "privacy_ledger.json")
    for cid in before.clients:
        assert len(after.charges_for(cid, "round", 2)) == 1  # the replay matched: no new charge
        assert after.history(cid) == before.history(cid)
    assert torch.equal(resumed.final_params, first)  # the same update was released again


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_differing_replay_keeps_the_charge_and_uses_fresh_noise(
    tmp_path: Path, cache_env: Path
) -> None:
    """The old code dropped round 2's charges on resume and replayed it with the SAME noise key:
    two different releases with identical noise, one charged."""
    run, first = _crash_after_round_2(tmp_path, tamper=True)
    before = PrivacyLedger.load(run / "privacy_ledger.json")
    resumed = _resume(run)
    after = PrivacyLedger.load(run / "privacy_ledger.json")
    for cid in before.clients:
        kept = after.charges_for(cid, "round", 2)
        assert len(kept) == 2 and kept[0].update_sha256 == "0" * 64  # old charge kept + new one
        assert after.epsilon(cid) > before.epsilon(cid)
    assert not torch.equal(resumed.final_params, first)  # fresh noise, not the replayed key's


# ----------------------------------------------------------------------------- item 5: small


def test_widened_masking_grid_still_clips_inputs_to_clip_range() -> None:
    """Client-level DP widens the masking grid by 12 sigma; an input beyond clip_range used to
    pass unclipped onto the widened grid (using up the headroom that keeps the noisy sum from
    wrapping). Now every input is clipped to clip_range first, as without noise."""
    from securefed.config import SecureAggregationConfig
    from securefed.secagg import DistributedNoise
    from securefed.secagg.masking import MaskingAggregation

    cfg = SecureAggregationConfig(protocol="masking", threshold=0.5, bits=40, clip_range=1.0)
    proto = MaskingAggregation.from_config(cfg, 4)
    d = 2000
    x = {c: np.zeros(d) for c in range(4)}
    x[0][:] = 5.0  # malicious / buggy client: 5x the clip range (the widened grid allows ~13)
    std = 0.5
    res = proto.aggregate(1, x, {}, noise=DistributedNoise(std, 4))
    assert float(np.mean(res.total)) == pytest.approx(1.0, abs=5 * std / d**0.5)


def test_default_delta_is_at_most_1e5_and_the_report_states_adjacency(
    tmp_path: Path, cache_env: Path
) -> None:
    from securefed.privacy import default_delta
    from securefed.run import run_experiment

    assert default_delta(100) == 1e-5 and default_delta(50) == 1e-5
    assert default_delta(10**7) == pytest.approx(1e-8)
    cfg = tiny_config(dp__level="record", dp__target_epsilon=10.0, federation__rounds=1)
    run_experiment(cfg, tmp_path / "r", progress=False)
    ledger = PrivacyLedger.load(tmp_path / "r" / "privacy_ledger.json")
    assert all(ledger.get_plan(c).delta <= 1e-5 for c in ledger.clients)
    report = (tmp_path / "r" / "report.md").read_text()
    assert "min(1e-5, 1/(10 n))" in report
    assert "ONE RECORD" in report and "dataset sizes are NOT protected" in report


# ----------------------------------------------------------------------------- item 6: noise


def test_one_pass_noise_equals_per_parameter_noise_and_keeps_four_draws() -> None:
    shapes = [(3, 5), (7,), (1, 1, 3, 3), (40_000,), (0, 2)]
    a = SecureGaussian(bytes(range(32))).normal_many(shapes, 2.0, dtype=torch.float64)
    src = SecureGaussian(bytes(range(32)))
    b = [src.normal(s, 2.0, dtype=torch.float64) for s in shapes]
    for x, y, s in zip(a, b, shapes, strict=True):
        assert x.shape == tuple(s) and torch.equal(x, y)
    # element i = std/2 * (four Box-Muller normals from uniforms 4i .. 4i+3), checked by hand
    import math

    u = SecureGaussian(bytes(range(32))).uniform(8)
    z = []
    for i in range(2):
        u1, u2, u3, u4 = u[4 * i : 4 * i + 4].tolist()
        r1, r2 = math.sqrt(-2 * math.log1p(-u1)), math.sqrt(-2 * math.log1p(-u3))
        t1, t2 = 2 * math.pi * u2, 2 * math.pi * u4
        z.append(2.0 / 2 * (r1 * math.cos(t1) + r1 * math.sin(t1) + r2 * math.cos(t2)
                             + r2 * math.sin(t2)))
    assert a[0].reshape(-1)[:2].tolist() == pytest.approx(z, rel=1e-12)


def test_ledger_keeps_digests_and_reopen_keeps_charges(tmp_path: Path) -> None:
    led = PrivacyLedger(tmp_path / "l.json")
    led.plan(0, noise_multiplier=1.0, sample_rate=0.1, planned_steps=30, target_epsilon=None,
             delta=1e-5, accountant="rdp")
    d = "ab" * 32
    led.charge(0, phase="round", round=1, steps=10, update_sha256=d)
    led.charge(0, phase="round", round=2, steps=10, update_sha256=d)
    led.mark_exhausted(0, 3)
    with pytest.raises(ValueError, match="update_sha256"):
        led.charge(0, phase="round", round=3, steps=1, update_sha256="xyz")
    again = PrivacyLedger.load(tmp_path / "l.json")
    assert [e.update_sha256 for e in again.charges_for(0, "round", 2)] == [d]
    kept = again.reopen_after(1)
    assert [e.round for e in kept] == [2] and again.steps(0) == 20  # nothing dropped
    assert again.status(0) == "active"  # the later exhaustion decision is re-made by the replay
    assert PrivacyLedger.load(tmp_path / "l.json").status(0) == "active"
