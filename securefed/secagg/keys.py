"""Identity keys of the secure-aggregation parties: Ed25519 signing keys and the public roster.

Bonawitz et al. 2017 (§6, active adversary) assume a PKI: every client signs its protocol
messages and every client can check the others' signatures, so a server cannot impersonate
clients (Sybil) or alter what it forwards. ``securefed keys init --clients N`` provisions that PKI
for a deployment:

- ``client_<i>.key``: client i's Ed25519 private key, PKCS#8 PEM, file mode 0600, written
  atomically (temp file with 0600 before any byte, fsync, rename);
- ``server.key``: the server's Ed25519 private key (it signs what it sends), 0600;
- ``roster.json``: every public key (raw 32 bytes, hex), the file both roles verify against.

Without ``secure_aggregation.keys_dir`` the simulation uses :func:`ephemeral_identities`: fresh
in-memory keys that are never written anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.io import atomic_write_bytes

__all__ = [
    "ROSTER_FILE",
    "SERVER_KEY_FILE",
    "Identities",
    "Roster",
    "client_key_path",
    "ephemeral_identities",
    "init_identity_keys",
    "load_client_key",
    "load_identities",
    "load_roster",
    "load_server_key",
]

ROSTER_FILE = "roster.json"
SERVER_KEY_FILE = "server.key"
_ROSTER_FORMAT = "securefed-roster-v1"


def client_key_path(keys_dir: Path, client_id: int) -> Path:
    return Path(keys_dir) / f"client_{client_id}.key"


@dataclass(frozen=True)
class Roster:
    """The public keys every party trusts: client id -> Ed25519 key, and the server's key."""

    clients: Mapping[int, Ed25519PublicKey]
    server: Ed25519PublicKey

    def client(self, client_id: int) -> Ed25519PublicKey | None:
        """The client's public key, or None for an unknown id."""
        return self.clients.get(client_id)

    def to_json(self) -> str:
        def raw(key: Ed25519PublicKey) -> str:
            return key.public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            ).hex()

        doc = {
            "format": _ROSTER_FORMAT,
            "algorithm": "ed25519",
            "server": raw(self.server),
            "clients": {str(cid): raw(k) for cid, k in sorted(self.clients.items())},
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "roster") -> Roster:
        """Parse and validate a roster.

        Raises:
            ValueError: naming ``source`` and the bad field.
        """
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != _ROSTER_FORMAT:
            raise ValueError(f"{source}: not a securefed roster (format {_ROSTER_FORMAT!r})")

        def key(value: object, what: str) -> Ed25519PublicKey:
            try:
                data = bytes.fromhex(str(value))
                return Ed25519PublicKey.from_public_bytes(data)
            except ValueError as exc:
                raise ValueError(f"{source}: {what}: not a 32-byte hex Ed25519 key") from exc

        clients_doc = doc.get("clients")
        if not isinstance(clients_doc, dict):
            raise ValueError(f"{source}: 'clients' must be a mapping of id -> key")
        clients: dict[int, Ed25519PublicKey] = {}
        for name, value in clients_doc.items():
            if not str(name).isdigit():
                raise ValueError(f"{source}: clients: id {name!r} is not a non-negative integer")
            clients[int(name)] = key(value, f"clients.{name}")
        return cls(clients, key(doc.get("server"), "server"))


@dataclass(frozen=True)
class Identities:
    """The simulation's key material: every client's signing key, the server's, and the roster."""

    roster: Roster
    client_keys: Mapping[int, Ed25519PrivateKey]
    server_key: Ed25519PrivateKey


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_identity_keys(out_dir: Path, num_clients: int, *, overwrite: bool = False) -> Path:
    """Write ``num_clients`` client keys (ids 0..n-1), the server key and the roster.

    Args:
        out_dir: folder (created 0700 if missing).
        num_clients: number of clients.
        overwrite: replace existing key files (default: refuse).

    Returns:
        The path of ``roster.json``.

    Raises:
        FileExistsError: a key file exists and ``overwrite`` is False.
        ValueError: ``num_clients < 1``.
    """
    if num_clients < 1:
        raise ValueError(f"keys init: --clients must be >= 1, got {num_clients}")
    out = Path(out_dir)
    if (out / "ckks_secret.ctx").exists():
        raise FileExistsError(
            f"keys init: {out} holds the clients' CKKS secret (ckks_secret.ctx); the server key "
            "must never be written beside it: give the identity keys another --out"
        )
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    targets = [client_key_path(out, i) for i in range(num_clients)]
    targets += [out / SERVER_KEY_FILE, out / ROSTER_FILE]
    if not overwrite:
        existing = [p.name for p in targets if p.exists()]
        if existing:
            raise FileExistsError(
                f"keys init: {out} already holds {', '.join(existing[:3])}"
                f"{' ...' if len(existing) > 3 else ''}; pass overwrite to replace them"
            )
    client_keys = {i: Ed25519PrivateKey.generate() for i in range(num_clients)}
    server_key = Ed25519PrivateKey.generate()
    for i, k in client_keys.items():
        atomic_write_bytes(client_key_path(out, i), _pem(k), mode=0o600)
    atomic_write_bytes(out / SERVER_KEY_FILE, _pem(server_key), mode=0o600)
    roster = Roster({i: k.public_key() for i, k in client_keys.items()}, server_key.public_key())
    roster_path = out / ROSTER_FILE
    atomic_write_bytes(roster_path, roster.to_json().encode("utf-8"), mode=0o644)
    return roster_path


def load_roster(path: Path) -> Roster:
    """Read ``roster.json`` (a file, or the keys folder that holds it)."""
    path = Path(path)
    if path.is_dir():
        path = path / ROSTER_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"secure_aggregation.keys_dir: no roster at {path}; run `securefed keys init`"
        )
    return Roster.from_json(path.read_text(encoding="utf-8"), source=str(path))


def _load_private(path: Path) -> Ed25519PrivateKey:
    if not path.exists():
        raise FileNotFoundError(f"secure_aggregation.keys_dir: missing key file {path}")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"{path}: private key readable by group/others (mode {mode:o}); chmod 600 it"
        )
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_client_key(keys_dir: Path, client_id: int) -> Ed25519PrivateKey:
    """Client ``client_id``'s signing key (refuses a file readable by group or others)."""
    return _load_private(client_key_path(Path(keys_dir), client_id))


def load_server_key(keys_dir: Path) -> Ed25519PrivateKey:
    return _load_private(Path(keys_dir) / SERVER_KEY_FILE)


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_identities(keys_dir: Path, num_clients: int) -> Identities:
    """Load the roster and the keys of clients 0..n-1 and the server; check they match.

    Raises:
        ValueError / FileNotFoundError: naming ``secure_aggregation.keys_dir`` and the fix.
    """
    keys_dir = Path(keys_dir)
    roster = load_roster(keys_dir)
    missing = [i for i in range(num_clients) if i not in roster.clients]
    if missing:
        raise ValueError(
            f"secure_aggregation.keys_dir: roster {keys_dir / ROSTER_FILE} lacks clients "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; run `securefed keys init "
            f"--clients {num_clients}`"
        )
    client_keys = {i: load_client_key(keys_dir, i) for i in range(num_clients)}
    for i, k in client_keys.items():
        if _raw(k.public_key()) != _raw(roster.clients[i]):
            raise ValueError(f"secure_aggregation.keys_dir: client_{i}.key does not match roster")
    server_key = load_server_key(keys_dir)
    if _raw(server_key.public_key()) != _raw(roster.server):
        raise ValueError("secure_aggregation.keys_dir: server.key does not match the roster")
    return Identities(roster, client_keys, server_key)


def ephemeral_identities(num_clients: int) -> Identities:
    """Fresh in-memory keys for clients 0..n-1 and the server (nothing touches the disk)."""
    client_keys = {i: Ed25519PrivateKey.generate() for i in range(num_clients)}
    server_key = Ed25519PrivateKey.generate()
    roster = Roster({i: k.public_key() for i, k in client_keys.items()}, server_key.public_key())
    return Identities(roster, client_keys, server_key)
