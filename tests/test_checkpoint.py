"""Checkpoints and atomic files: checksums, corruption, pruning, atomic replace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from securefed.artefacts.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_latest,
    save_checkpoint,
)
from securefed.io import atomic_write_bytes, read_jsonl, write_jsonl


def _ckpt(r: int) -> Checkpoint:
    g = torch.Generator().manual_seed(r)
    return Checkpoint(
        round=r,
        global_params=torch.randn(100, generator=g),
        strategy={"ema": torch.randn(100, generator=g)},
        clients={3: {"control": torch.randn(100, generator=g)}},
        meta={"name": "t", "parameters": 100},
    )


def test_round_trip_and_pruning(tmp_path: Path) -> None:
    for r in range(1, 5):
        save_checkpoint(tmp_path, _ckpt(r), keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("round_*.pt")) == ["round_0003.pt", "round_0004.pt"]
    loaded = load_latest(tmp_path)
    ref = _ckpt(4)
    assert loaded.round == 4 and loaded.meta == ref.meta
    torch.testing.assert_close(loaded.global_params, ref.global_params)
    torch.testing.assert_close(loaded.strategy["ema"], ref.strategy["ema"])
    torch.testing.assert_close(loaded.clients[3]["control"], ref.clients[3]["control"])


def test_corruption_is_detected(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _ckpt(1))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_latest(tmp_path)


def test_missing_and_bad_manifest(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        load_latest(tmp_path)
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        load_latest(tmp_path)
    (tmp_path / "latest.json").write_text(json.dumps({"round": 1, "file": "x.pt", "sha256": "0"}))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_latest(tmp_path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "ledger.json"
    atomic_write_bytes(target, b"old")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temp file left behind


def test_atomic_write_mode(tmp_path: Path) -> None:
    p = tmp_path / "secret.key"
    atomic_write_bytes(p, b"k", mode=0o600)
    assert (p.stat().st_mode & 0o777) == 0o600


def test_jsonl_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    write_jsonl(p, [{"round": 1, "x": 0.5}, {"round": 2}])
    assert read_jsonl(p) == [{"round": 1, "x": 0.5}, {"round": 2}]
    assert read_jsonl(tmp_path / "none.jsonl") == []
    p.write_text('{"round": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        read_jsonl(p)
