"""Tests of securefed.metrics on scikit-learn's 8x8 digits (no downloads)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from securefed.config import EvaluationConfig
from securefed.metrics import (
    FeatureNet,
    QualityReport,
    SampleEvaluator,
    class_coverage,
    classification_accuracy,
    compute_fid,
    compute_inception_fid,
    frechet_distance,
    knn_precision_recall,
    load_or_train_feature_net,
    train_feature_net,
)
from securefed.metrics import classifier as classifier_mod
from securefed.metrics import evaluator as evaluator_mod
from securefed.metrics import fid as fid_mod
from securefed.metrics.precision_recall import knn_radii

EPOCHS = 8
SEED = 0
FINGERPRINT = "digits-test-split-0"


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images / 16.0 * 2.0 - 1.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(x))
    return {"mx": x[:n], "my": y[:n], "hx": x[n:], "hy": y[n:]}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("featnet-cache")


@pytest.fixture(scope="module")
def trained(digits, cache_dir) -> tuple[FeatureNet, float]:
    """The feature net, trained once and cached under (FINGERPRINT, EPOCHS, SEED)."""
    return load_or_train_feature_net(
        digits["mx"],
        digits["my"],
        digits["hx"],
        digits["hy"],
        10,
        dataset_fingerprint=FINGERPRINT,
        cache_dir=cache_dir,
        epochs=EPOCHS,
        seed=SEED,
        device="cpu",
    )


def _features(net: FeatureNet, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net.features(x).double().numpy()


def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- frechet_distance


def test_frechet_distance_zero_for_identical_stats():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=6), _random_spd(rng, 6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_symmetric_and_singular_safe():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    s1, s2 = _random_spd(rng, 4), _random_spd(rng, 4)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        frechet_distance(mu2, s2, mu1, s1), rel=1e-9
    )
    # rank-1 covariances: singular product, still a finite non-negative number
    v = rng.normal(size=(4, 1))
    sing = v @ v.T
    out = frechet_distance(mu1, sing, mu2, np.zeros((4, 4)))
    assert math.isfinite(out) and out >= 0.0
    with pytest.raises(ValueError, match="expected mu"):
        frechet_distance(mu1, s1, mu2[:3], s2)


# ----------------------------------------------------------------------------- feature net


def test_feature_net_shapes_for_all_sizes():
    for c, size in ((1, 8), (3, 16), (1, 28), (3, 32)):
        net = FeatureNet(c, size, num_classes=7)
        x = torch.rand(2, c, size, size) * 2 - 1
        assert net.features(x).shape == (2, net.num_features)
        assert net(x).shape == (2, 7)
    with pytest.raises(ValueError, match="expected images"):
        FeatureNet(1, 8, 10).features(torch.zeros(2, 3, 8, 8))


def test_feature_net_accuracy_on_digits(trained, digits):
    net, acc = trained
    assert acc > 0.85
    assert not net.training
    assert classification_accuracy(net, digits["hx"], digits["hy"]) == pytest.approx(acc)


def test_train_feature_net_deterministic(digits):
    args = (digits["mx"][:400], digits["my"][:400], digits["hx"][:100], digits["hy"][:100], 10)
    net1, acc1 = train_feature_net(*args, epochs=1, seed=3, device="cpu")
    state = torch.get_rng_state()
    net2, acc2 = train_feature_net(*args, epochs=1, seed=3, device="cpu")
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert acc1 == acc2
    for (k, a), b in zip(net1.state_dict().items(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def _forbid_training(*args, **kwargs):
    raise AssertionError("train_feature_net called on a cache hit")


def test_cache_hit_returns_identical_weights(trained, digits, cache_dir, monkeypatch):
    net, acc = trained
    files = list(cache_dir.glob("featnet-*.pt"))
    assert len(files) == 1 and not list(cache_dir.glob("*.tmp"))
    monkeypatch.setattr(classifier_mod, "train_feature_net", _forbid_training)
    net2, acc2 = load_or_train_feature_net(
        digits["mx"], digits["my"], digits["hx"], digits["hy"], 10,
        dataset_fingerprint=FINGERPRINT, cache_dir=cache_dir, epochs=EPOCHS, seed=SEED,
        device="cpu",
    )  # fmt: skip
    assert acc2 == acc and not net2.training
    for a, b in zip(net.state_dict().values(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shapes"])
def test_corrupt_cache_triggers_retrain(digits, tmp_path, monkeypatch, damage):
    data = (digits["mx"][:300], digits["my"][:300], digits["hx"][:60], digits["hy"][:60], 10)
    kw = {"dataset_fingerprint": "small", "cache_dir": tmp_path, "epochs": 1, "seed": 0}
    load_or_train_feature_net(*data, **kw, device="cpu")
    (path,) = tmp_path.glob("featnet-*.pt")
    if damage == "garbage":
        path.write_bytes(b"definitely not a torch checkpoint")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        torch.save({"arch_version": classifier_mod.ARCH_VERSION, "num_classes": 3}, path)
    calls = []
    real_train = classifier_mod.train_feature_net

    def counting(*a, **k):
        calls.append(1)
        return real_train(*a, **k)

    monkeypatch.setattr(classifier_mod, "train_feature_net", counting)
    with pytest.warns(RuntimeWarning, match="unusable"):
        net, acc = load_or_train_feature_net(*data, **kw, device="cpu")
    assert calls == [1] and 0.0 <= acc <= 1.0
    # the rewritten cache is good again
    monkeypatch.setattr(classifier_mod, "train_feature_net", _forbid_training)
    net2, _ = load_or_train_feature_net(*data, **kw, device="cpu")
    for a, b in zip(net.state_dict().values(), net2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- FID


def test_compute_fid_matches_frechet_distance(trained, digits):
    net, _ = trained
    real, fake = digits["hx"], digits["mx"][:300]
    by_hand = frechet_distance(*_stats(_features(net, real)), *_stats(_features(net, fake)))
    via_tm = compute_fid(net, real, fake, batch_size=100)
    assert via_tm == pytest.approx(by_hand, rel=1e-3)


def test_fid_holdout_vs_members_much_smaller_than_noise(trained, digits):
    net, _ = trained
    fid_real = compute_fid(net, digits["hx"], digits["mx"])
    noise = torch.rand(len(digits["hx"]), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fid_noise = compute_fid(net, digits["hx"], noise * 2 - 1)
    assert fid_real * 20 < fid_noise
    with pytest.raises(ValueError, match="NaN"):
        compute_fid(net, digits["hx"], torch.full((4, 1, 8, 8), float("nan")))


def test_inception_fid_errors(tmp_path, monkeypatch):
    x = torch.zeros(4, 1, 8, 8)
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(FileNotFoundError, match=r"pt_inception\.pth.*inception_weights"):
        compute_inception_fid(missing, x, x, device="cpu")
    missing.write_bytes(b"weights")
    monkeypatch.setattr(fid_mod, "_torch_fidelity_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        compute_inception_fid(missing, x, x, device="cpu")


def test_to_inception_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    out = fid_mod.to_inception_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 2)
    assert out[0, 2].flatten().tolist() == [0, 128, 255, 255]


# ----------------------------------------------------------------------------- precision/recall


def test_knn_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    assert knn_precision_recall(a, a.copy(), k=3) == (1.0, 1.0)
    assert knn_precision_recall(torch.from_numpy(a), torch.from_numpy(a), k=3) == (1.0, 1.0)
    far = rng.normal(size=(40, 8)) + 100.0
    assert knn_precision_recall(a, far, k=3) == (0.0, 0.0)
    radii = knn_radii(a, 3)
    assert knn_precision_recall(a, far, 3, real_radii=radii) == (0.0, 0.0)
    with pytest.raises(ValueError, match="k must be"):
        knn_precision_recall(a[:3], far, k=3)
    with pytest.raises(ValueError, match="D="):
        knn_precision_recall(a, far[:, :4], k=3)


def test_knn_precision_recall_half_overlap():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(60, 4))
    fake = np.concatenate([a[:30], rng.normal(size=(30, 4)) + 1000.0])
    precision, _ = knn_precision_recall(a, fake, k=3)
    assert precision == pytest.approx(0.5)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 12),
    m=st.integers(2, 12),
    d=st.integers(1, 4),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    dup=st.booleans(),
)
def test_knn_precision_recall_in_unit_interval(n, m, d, k, seed, dup):
    k = min(k, min(n, m) - 1)
    if k < 1:
        return
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n, d))
    fake = rng.normal(size=(m, d))
    if dup:  # duplicates and rounding: zero radii must not break anything
        real = np.round(real)
        fake = np.round(fake)
    p, r = knn_precision_recall(real, fake, k=k)
    assert 0.0 <= p <= 1.0 and 0.0 <= r <= 1.0
    assert knn_precision_recall(real, real, k=k) == (1.0, 1.0)


def test_class_coverage():
    hist, cov = class_coverage(np.array([0, 0, 2, 2, 2]), 4)
    assert hist.tolist() == [2, 0, 3, 0] and hist.dtype == np.int64
    assert cov == 0.5
    hist, cov = class_coverage(torch.arange(3), 3)
    assert hist.tolist() == [1, 1, 1] and cov == 1.0
    hist, cov = class_coverage(np.array([], dtype=np.int64), 2)
    assert hist.tolist() == [0, 0] and cov == 0.0
    with pytest.raises(ValueError, match="lie in"):
        class_coverage(np.array([0, 5]), 4)


# ----------------------------------------------------------------------------- evaluator


def _evaluator(digits, cache_dir, **cfg_kw) -> SampleEvaluator:
    cfg = EvaluationConfig(feature_net_epochs=EPOCHS, pr_k=3, **cfg_kw)
    return SampleEvaluator(
        digits["mx"], digits["my"], digits["hx"], digits["hy"], 10,
        dataset_fingerprint=FINGERPRINT, cfg=cfg, cache_dir=cache_dir, seed=SEED, device="cpu",
    )  # fmt: skip


def test_sample_evaluator_end_to_end(trained, digits, cache_dir, monkeypatch):
    monkeypatch.setattr(classifier_mod, "train_feature_net", _forbid_training)  # uses the cache
    ev = _evaluator(digits, cache_dir)
    assert ev.feature_net_accuracy == trained[1]
    good = ev.evaluate(digits["mx"][:200])
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    bad = ev.evaluate(noise)
    assert isinstance(good, QualityReport) and good.inception_fid is None
    assert good.fid * 10 < bad.fid  # 200 samples: FID has a finite-sample bias
    assert good.precision > 0.6 and good.recall > 0.6
    assert bad.precision < 0.2
    assert good.class_coverage == 1.0 and sum(good.class_histogram) == 200
    assert good.feature_net_accuracy == trained[1]
    # FID against the holdout, identical to a fresh computation
    assert good.fid == pytest.approx(
        compute_fid(ev.feature_net, digits["hx"], digits["mx"][:200]), rel=1e-6
    )
    # the holdout statistics survive repeated evaluations
    assert ev.evaluate(digits["mx"][:200]).fid == pytest.approx(good.fid, rel=1e-9)
    d = good.as_dict()
    assert json.loads(json.dumps(d)) == d and set(d) >= {"fid", "precision", "recall"}
    with pytest.raises(ValueError, match="NaN"):
        ev.evaluate(torch.full((10, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="samples are"):
        ev.evaluate(torch.zeros(10, 1, 16, 16))
    with pytest.raises(ValueError, match="pr_k"):
        ev.evaluate(digits["mx"][:3])


class _FakeInception(nn.Module):
    """Stands in for torchmetrics' Inception: uint8 [B, 3, H, W] -> [B, 3] channel means."""

    num_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.shape[1] != 3:
            raise TypeError(f"expected uint8 RGB, got {x.dtype} {tuple(x.shape)}")
        return x.double().mean(dim=(2, 3)) + x.double()[:, :, 0, 0]


def test_sample_evaluator_inception_path(digits, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(classifier_mod, "train_feature_net", _forbid_training)
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        _evaluator(digits, cache_dir, inception_weights=tmp_path / "missing.pth")
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stub")
    seen = []

    def fake_make(path, *, reset_real_features, device):
        seen.append(path)
        return FrechetInceptionDistance(
            feature=_FakeInception(), reset_real_features=reset_real_features
        )

    monkeypatch.setattr(evaluator_mod, "make_inception_fid_metric", fake_make)
    ev = _evaluator(digits, cache_dir, inception_weights=weights)
    report = ev.evaluate(digits["mx"][:100])
    assert seen == [weights]
    assert report.inception_fid is not None and math.isfinite(report.inception_fid)
