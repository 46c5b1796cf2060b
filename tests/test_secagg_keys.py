"""Identity provisioning for secure aggregation: key files, roster, loading, config wiring."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from securefed.config import SecureAggregationConfig
from securefed.secagg.keys import (
    ROSTER_FILE,
    SERVER_KEY_FILE,
    Roster,
    client_key_path,
    ephemeral_identities,
    init_identity_keys,
    load_client_key,
    load_identities,
    load_roster,
    load_server_key,
)
from securefed.secagg.masking import MaskingAggregation


def _raw(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def test_key_files_are_private_and_roster_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    roster_path = init_identity_keys(out, 4)
    assert roster_path == out / ROSTER_FILE
    for i in range(4):
        path = client_key_path(out, i)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE((out / SERVER_KEY_FILE).stat().st_mode) == 0o600
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # atomic: no leftovers
    roster = load_roster(roster_path)
    assert sorted(roster.clients) == [0, 1, 2, 3]
    for i in range(4):
        assert _raw(load_client_key(out, i).public_key()) == _raw(roster.clients[i])
    assert _raw(load_server_key(out).public_key()) == _raw(roster.server)
    again = Roster.from_json(roster.to_json())
    assert {i: _raw(k) for i, k in again.clients.items()} == {
        i: _raw(k) for i, k in roster.clients.items()
    }
    assert load_roster(out).to_json() == roster.to_json()  # folder or file
    doc = json.loads(roster_path.read_text())
    assert "PRIVATE" not in roster_path.read_text() and len(doc["clients"]["0"]) == 64


def test_init_refuses_to_overwrite_and_bad_counts(tmp_path: Path) -> None:
    init_identity_keys(tmp_path, 2)
    before = client_key_path(tmp_path, 0).read_bytes()
    with pytest.raises(FileExistsError, match=r"client_0\.key"):
        init_identity_keys(tmp_path, 2)
    assert client_key_path(tmp_path, 0).read_bytes() == before
    init_identity_keys(tmp_path, 2, overwrite=True)
    assert client_key_path(tmp_path, 0).read_bytes() != before
    with pytest.raises(ValueError, match="clients"):
        init_identity_keys(tmp_path / "x", 0)


def test_loading_checks_permissions_membership_and_matching(tmp_path: Path) -> None:
    init_identity_keys(tmp_path, 3)
    os.chmod(client_key_path(tmp_path, 1), 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_client_key(tmp_path, 1)
    os.chmod(client_key_path(tmp_path, 1), 0o600)
    with pytest.raises(ValueError, match=r"lacks clients \[3"):
        load_identities(tmp_path, 5)
    # a key file that does not belong to the roster
    other = tmp_path / "other"
    init_identity_keys(other, 3)
    client_key_path(tmp_path, 2).unlink()
    os.replace(client_key_path(other, 2), client_key_path(tmp_path, 2))
    with pytest.raises(ValueError, match=r"client_2\.key does not match"):
        load_identities(tmp_path, 3)
    with pytest.raises(FileNotFoundError, match="keys init"):
        load_roster(tmp_path / "missing")


@pytest.mark.parametrize(
    "text,match",
    [
        ("not json", "not valid JSON"),
        ('{"format": "x"}', "not a securefed roster"),
        ('{"format": "securefed-roster-v1", "clients": []}', "clients"),
        ('{"format": "securefed-roster-v1", "clients": {"a": "00"}, "server": "00"}', "id 'a'"),
        ('{"format": "securefed-roster-v1", "clients": {"0": "zz"}, "server": "00"}', "clients.0"),
    ],
)
def test_malformed_roster_is_rejected(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Roster.from_json(text, source="r.json")


def test_masking_from_config_uses_keys_dir(tmp_path: Path) -> None:
    init_identity_keys(tmp_path, 3)
    cfg = SecureAggregationConfig(protocol="masking", threshold=2, keys_dir=tmp_path)
    proto = MaskingAggregation.from_config(cfg, 3)
    roster = load_roster(tmp_path)
    assert _raw(proto.identities.roster.clients[1]) == _raw(roster.clients[1])
    xs = {i: np.full(5, 0.1 * i) for i in range(3)}
    res = proto.aggregate(1, xs)
    assert np.allclose(res.total, 0.3, atol=1e-6)
    with pytest.raises(ValueError, match="keys init"):
        MaskingAggregation.from_config(cfg, 4)  # roster has only 3 clients


def test_ephemeral_identities_are_fresh() -> None:
    a, b = ephemeral_identities(2), ephemeral_identities(2)
    assert _raw(a.roster.clients[0]) != _raw(b.roster.clients[0])
    assert _raw(a.client_keys[1].public_key()) == _raw(a.roster.clients[1])
