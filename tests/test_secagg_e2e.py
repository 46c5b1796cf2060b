"""Secure aggregation inside the round loop: plain, masking and CKKS give the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from securefed.run import run_experiment
from tests.helpers import tiny_config


def _final(tmp: Path, name: str, **kw) -> torch.Tensor:
    cfg = tiny_config(federation__rounds=2, **kw)
    res = run_experiment(cfg, tmp / name, progress=False, write_report=False)
    assert res.finished
    return res.final_params


def test_plain_masking_ckks_agree(tmp_path: Path, cache_env: Path) -> None:
    plain = _final(tmp_path, "plain")
    masked = _final(
        tmp_path, "masking", secure_aggregation__protocol="masking", secure_aggregation__threshold=2
    )
    ckks = _final(
        tmp_path, "ckks", secure_aggregation__protocol="ckks", secure_aggregation__threshold=2
    )
    # quantisation (2^-26 grid) and CKKS noise (~1e-7) stay far below one training step
    assert (masked - plain).abs().max() < 1e-4
    assert (ckks - plain).abs().max() < 1e-4
    assert not torch.equal(plain, torch.zeros_like(plain))


@pytest.mark.parametrize("neighbours", ["all", 2])
def test_masking_with_dropouts_in_the_loop(tmp_path: Path, cache_env: Path, neighbours) -> None:
    cfg = tiny_config(
        federation__num_clients=5,
        federation__rounds=3,
        federation__dropout_prob=0.3,
        secure_aggregation__protocol="masking",
        secure_aggregation__threshold=2,
        secure_aggregation__neighbours=neighbours,
    )
    res = run_experiment(cfg, tmp_path / "r", progress=False, write_report=False)
    rows = res.metrics
    assert res.finished
    assert all(r["protocol"] == "masking" for r in rows)
    # bytes are the protocol's real message sizes: more than the plain fp32 vector
    plain_bytes = 4 * (res.final_params.numel() + 1)
    done = [r for r in rows if r["participants"]]
    assert done and all(r["bytes_up"] >= plain_bytes * len(r["participants"]) for r in done)
    assert any(r["dropped"] for r in rows)


def test_keys_init_cli_and_keys_dir_run(tmp_path: Path, cache_env: Path) -> None:
    from securefed.cli import main

    keys, ckks = tmp_path / "keys", tmp_path / "ckks"
    argv = ["keys", "init", "--clients", "3", "--ckks", "--out", str(keys)]
    assert main(argv) == 2  # the CKKS secret is never written beside server.key
    assert not (keys / "ckks_secret.ctx").exists()
    assert main([*argv, "--ckks-out", str(ckks)]) == 0
    for name in ["client_0.key", "client_2.key", "server.key"]:
        assert (keys / name).stat().st_mode & 0o777 == 0o600, name
    assert (ckks / "ckks_secret.ctx").stat().st_mode & 0o777 == 0o600
    assert ckks.stat().st_mode & 0o777 == 0o700
    assert (keys / "roster.json").exists() and (ckks / "ckks_public.ctx").exists()
    cfg = tiny_config(
        federation__rounds=1,
        secure_aggregation__protocol="masking",
        secure_aggregation__threshold=2,
        secure_aggregation__keys_dir=str(keys),
    )
    assert run_experiment(cfg, tmp_path / "r", progress=False, write_report=False).finished
    # refusing to clobber existing keys, then an explicit overwrite
    assert main(["keys", "init", "--clients", "3", "--out", str(keys)]) == 2
    assert main(["keys", "init", "--clients", "3", "--out", str(keys), "--overwrite"]) == 0
