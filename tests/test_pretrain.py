"""Public pre-training: refusal when public == private, disjointness, cache, no ledger charge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from securefed.builders import build_model, prepare_data
from securefed.config import ConfigError
from securefed.data import ImageDataset
from securefed.diffusion import NoiseSchedule
from securefed.diffusion.params import get_flat
from securefed.federation.public_pretrain import (
    PublicDataError,
    check_disjoint,
    public_pretrain,
)
from securefed.io import read_jsonl
from securefed.privacy import PrivacyLedger
from securefed.run import run_experiment
from tests.helpers import tiny_config

_PT: dict[str, Any] = {
    "pretrain__enabled": True,
    "pretrain__steps": 30,
    "pretrain__batch_size": 32,
    "pretrain__data": {"name": "mnist5k", "mnist5k_layout": "uci_digits", "max_examples": 400},
}


# ---------------------------------------------------------------- refusal
@pytest.mark.parametrize(
    "public",
    [
        {"name": "digits"},
        {"name": "digits", "max_examples": 100},  # a subset of the private collection
        {"name": "mnist", "root": "/data/mnist"},  # MNIST is the collection mnist5k comes from
    ],
)
def test_public_set_that_is_the_private_collection_is_refused(public: dict[str, Any]) -> None:
    private = {"name": "mnist5k"} if public["name"] == "mnist" else {"name": "digits"}
    with pytest.raises(ConfigError, match=r"pretrain\.data\.name: .*same collection"):
        tiny_config(data=private, pretrain__enabled=True, pretrain__data=public)


def test_same_root_is_the_same_collection() -> None:
    with pytest.raises(ConfigError, match="same collection"):
        tiny_config(
            data={"name": "image_folder", "root": "/x/sites"},
            partition__kind="site",
            pretrain__enabled=True,
            pretrain__data={"name": "image_folder", "root": "/x/sites/"},
        )
    # a different collection passes the config check (disabled: the section is not checked)
    assert tiny_config(**_PT).pretrain.data.name == "mnist5k"
    assert tiny_config(pretrain__data={"name": "digits"}).pretrain.enabled is False


def test_identical_images_are_refused() -> None:
    g = torch.Generator().manual_seed(0)
    def ds(x: torch.Tensor, name: str) -> ImageDataset:
        return ImageDataset(x, torch.zeros(len(x)).long(), 1, name, ("0",))

    priv = ds(torch.rand(10, 1, 8, 8, generator=g) * 2 - 1, "private")
    pub_imgs = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    check_disjoint(ds(pub_imgs, "public"), [priv])  # disjoint: fine
    pub_imgs[2] = priv.images[7]
    pub_imgs[4] = priv.images[1]
    with pytest.raises(PublicDataError, match=r"pretrain\.data\.name: 2 of 6 public images"):
        check_disjoint(ds(pub_imgs.clone(), "public"), [priv])


def test_public_mnist5k_is_disjoint_from_digits() -> None:
    cfg = tiny_config(**_PT)
    data = prepare_data(cfg)
    from securefed.federation.public_pretrain import load_public

    public = load_public(cfg.pretrain, data.members.image_shape)
    assert public.image_shape == data.members.image_shape == (1, 8, 8)
    check_disjoint(public, [data.members, data.holdout])


# ---------------------------------------------------------------- cache
@pytest.mark.slow  # 24-88 s on one core (load 4-5): trains the public model twice
def test_public_model_is_cached_and_a_corrupt_cache_is_retrained(cache_env: Path) -> None:
    cfg = tiny_config(**_PT)
    data = prepare_data(cfg)
    sched = NoiseSchedule.from_config(cfg.diffusion)
    model = build_model(cfg, data.members.image_shape, 10)
    init = get_flat(model).clone()
    first = public_pretrain(cfg, model, sched, [data.members, data.holdout],
                            torch.device("cpu"), cache_env / "pretrain")
    assert first.meta["cached"] is False and first.meta["steps"] == 30
    assert torch.equal(get_flat(model), first.params) and not torch.equal(init, first.params)
    files = list((cache_env / "pretrain").glob("public-*.pt"))
    assert len(files) == 1

    model2 = build_model(cfg, data.members.image_shape, 10)
    second = public_pretrain(cfg, model2, sched, [data.members, data.holdout],
                             torch.device("cpu"), cache_env / "pretrain")
    assert second.meta["cached"] is True and torch.equal(second.params, first.params)
    assert torch.equal(get_flat(model2), first.params)

    # another run seed reuses the same public model (its seed is pretrain.seed)
    other = tiny_config(**_PT, seed=11)
    third = public_pretrain(other, build_model(other, (1, 8, 8), 10), sched,
                            [data.members, data.holdout], torch.device("cpu"),
                            cache_env / "pretrain")
    assert third.meta["cached"] is True
    # different settings -> a different key -> trained again
    more = tiny_config(**{**_PT, "pretrain__steps": 31})
    fourth = public_pretrain(more, build_model(more, (1, 8, 8), 10), sched,
                             [data.members, data.holdout], torch.device("cpu"),
                             cache_env / "pretrain")
    assert fourth.meta["cached"] is False
    assert len(list((cache_env / "pretrain").glob("public-*.pt"))) == 2

    files[0].write_bytes(b"not a checkpoint")
    again = public_pretrain(cfg, build_model(cfg, (1, 8, 8), 10), sched,
                            [data.members, data.holdout], torch.device("cpu"),
                            cache_env / "pretrain")
    assert again.meta["cached"] is False and torch.equal(again.params, first.params)


# ---------------------------------------------------------------- a run: no charge
def test_pretraining_is_uncharged_and_starts_the_run(cache_env: Path, tmp_path: Path) -> None:
    dp = {
        "dp__level": "record", "dp__target_epsilon": 8.0, "dp__secure_noise": False,
        "federation__rounds": 1, "evaluation__fid_at_start": True,
    }
    run_experiment(tiny_config(**dp), tmp_path / "plain", progress=False, write_report=False)
    pre = run_experiment(tiny_config(**dp, **_PT), tmp_path / "pre", progress=False,
                         write_report=False)
    a = PrivacyLedger.load(tmp_path / "plain" / "privacy_ledger.json")
    b = PrivacyLedger.load(tmp_path / "pre" / "privacy_ledger.json")
    assert a.clients == b.clients
    for c in a.clients:  # identical plan and identical charges: the public data cost nothing
        assert a.get_plan(c) == b.get_plan(c)
        assert a.history(c) == b.history(c)
        assert a.epsilon(c) == pytest.approx(b.epsilon(c), rel=1e-12)
    assert [(e.phase, e.round) for e in a.entries] == [(e.phase, e.round) for e in b.entries]
    meta = json.loads((tmp_path / "pre" / "public_pretrain.json").read_text())
    assert meta["dataset"] == "mnist5k" and meta["private_dataset"] == "digits"
    assert "different collections" in meta["relation"]
    rows = read_jsonl(tmp_path / "pre" / "metrics.jsonl")
    plain_rows = read_jsonl(tmp_path / "plain" / "metrics.jsonl")
    assert rows[0]["round"] == 0 and rows[0]["public_only"] is True
    assert "public_only" not in plain_rows[0]
    # 30 public steps already denoise the private digits better than the random init
    assert rows[0]["holdout_loss"] < 0.8 * plain_rows[0]["holdout_loss"]
    assert pre.finished
    from securefed.report import write_run_report

    report = write_run_report(tmp_path / "pre").read_text()
    first = report.split("| setting | value |")[0]  # the first screen, above the settings table
    assert "![samples](samples/round_0001.png) | ![holdout](samples/holdout.png)" in first
    assert "(the public-only model)" not in first  # no FID measured in this tiny run ...
    assert "**Public pre-training:** 400 images of `mnist5k`" in first  # ... but the relation
    assert "different collections" in first and "uncharged" in first
    assert (tmp_path / "pre" / "samples" / "holdout.png").exists()
