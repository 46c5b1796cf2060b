"""``securefed keys tls``: the transport credentials of a Flower deployment.

Writes, into one folder (created 0700)::

    ca.crt                  the deployment's root CA (give it to every SuperNode and to `flwr`)
    ca.key          0600    the CA's private key (keep it offline: it can mint SuperLink certs)
    superlink.crt           the SuperLink's TLS certificate, signed by the CA, with a SAN entry
                            for every host name / IP address the sites use to reach it
    superlink.key   0600    the SuperLink's TLS private key
    supernode_<i>.key 0600  SuperNode i's authentication key (EC P-384, OpenSSH format):
                            ``flower-supernode --auth-supernode-private-key``
    supernode_<i>.pub       its public half (OpenSSH format), registered on the SuperLink with
                            ``flwr supernode register supernode_<i>.pub`` (the SuperLink runs
                            with ``--enable-supernode-auth`` and accepts only registered nodes)
    tls.json                manifest: hosts, validity, SHA-256 fingerprints of every public part

Every file is written atomically; private keys carry mode 0600 before their first byte is
written. These credentials authenticate the TRANSPORT (Flower's TLS and node authentication);
the secure-aggregation identities (Ed25519 signing keys + roster) come from
``securefed keys init`` and are independent of them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securefed.io import atomic_write_bytes

__all__ = [
    "TLSMaterial",
    "add_keys_tls_parser",
    "cli_keys_tls",
    "load_supernode_public_key",
    "supernode_key_paths",
    "write_tls_material",
]

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SUPERLINK_CERT, SUPERLINK_KEY = "superlink.crt", "superlink.key"
MANIFEST = "tls.json"


@dataclass(frozen=True)
class TLSMaterial:
    """Paths of what :func:`write_tls_material` wrote."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    superlink_cert: Path
    superlink_key: Path
    supernode_keys: tuple[Path, ...]
    supernode_public_keys: tuple[Path, ...]
    manifest: Path


def supernode_key_paths(out_dir: Path, index: int) -> tuple[Path, Path]:
    """``(private, public)`` key paths of SuperNode ``index``."""
    return Path(out_dir) / f"supernode_{index}.key", Path(out_dir) / f"supernode_{index}.pub"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _check_hosts(hosts: Sequence[str]) -> list[str]:
    out: list[str] = []
    for h in hosts:
        h = h.strip()
        if not h or (any(c in h for c in " /:@") and not _is_ip(h)):
            raise ValueError(
                f"keys tls: --host {h!r} is not a host name or IP address; give the name or "
                "address the SuperNodes use to reach the SuperLink, without port or scheme"
            )
        if h not in out:
            out.append(h)
    if not out:
        raise ValueError("keys tls: give at least one --host (e.g. --host superlink.example.org)")
    return out


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
    except ValueError:
        return False
    return True


def _fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tls_material(
    out_dir: str | Path,
    hosts: Sequence[str],
    num_supernodes: int,
    *,
    days: int = 365,
    overwrite: bool = False,
) -> TLSMaterial:
    """Create the CA, the SuperLink certificate for ``hosts`` and SuperNode auth keys.

    Args:
        out_dir: folder to write into (created 0700).
        hosts: DNS names and/or IP addresses the SuperLink certificate is valid for.
        num_supernodes: number of SuperNode authentication key pairs (ids 0..n-1).
        days: validity of the certificates.
        overwrite: replace existing files (default: refuse).

    Raises:
        ValueError: a bad host, count or validity (naming the option and the fix).
        FileExistsError: a target file exists and ``overwrite`` is False.
    """
    if num_supernodes < 1:
        raise ValueError(f"keys tls: --supernodes must be >= 1, got {num_supernodes}")
    if days < 1:
        raise ValueError(f"keys tls: --days must be >= 1, got {days}")
    names = _check_hosts(hosts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    node_paths = [supernode_key_paths(out, i) for i in range(num_supernodes)]
    targets = [out / CA_CERT, out / CA_KEY, out / SUPERLINK_CERT, out / SUPERLINK_KEY]
    targets += [p for pair in node_paths for p in pair] + [out / MANIFEST]
    if not overwrite:
        existing = [p.name for p in targets if p.exists()]
        if existing:
            raise FileExistsError(
                f"keys tls: {out} already holds {', '.join(existing[:3])}"
                f"{' ...' if len(existing) > 3 else ''}; pass --overwrite to replace them"
            )

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securefed deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    link_key = ec.generate_private_key(ec.SECP384R1())
    link_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(link_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    link_pem = link_cert.public_bytes(serialization.Encoding.PEM)
    atomic_write_bytes(out / CA_KEY, _pem_key(ca_key), mode=0o600)
    atomic_write_bytes(out / CA_CERT, ca_pem, mode=0o644)
    atomic_write_bytes(out / SUPERLINK_KEY, _pem_key(link_key), mode=0o600)
    atomic_write_bytes(out / SUPERLINK_CERT, link_pem, mode=0o644)

    nodes = []
    for i, (priv_path, pub_path) in enumerate(node_paths):
        key = ec.generate_private_key(ec.SECP384R1())
        priv = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ) + f" securefed-supernode-{i}\n".encode()
        atomic_write_bytes(priv_path, priv, mode=0o600)
        atomic_write_bytes(pub_path, pub, mode=0o644)
        nodes.append({"index": i, "public_key": pub_path.name, "sha256": _fingerprint(pub)})

    manifest = {
        "format": "securefed-tls-v1",
        "hosts": names,
        "not_valid_before": now.isoformat(),
        "not_valid_after": until.isoformat(),
        "ca_sha256": _fingerprint(ca_cert.public_bytes(serialization.Encoding.DER)),
        "superlink_sha256": _fingerprint(link_cert.public_bytes(serialization.Encoding.DER)),
        "supernodes": nodes,
    }
    atomic_write_bytes(
        out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), mode=0o644
    )
    return TLSMaterial(
        out_dir=out,
        ca_cert=out / CA_CERT,
        ca_key=out / CA_KEY,
        superlink_cert=out / SUPERLINK_CERT,
        superlink_key=out / SUPERLINK_KEY,
        supernode_keys=tuple(p for p, _ in node_paths),
        supernode_public_keys=tuple(p for _, p in node_paths),
        manifest=out / MANIFEST,
    )


def load_supernode_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """Parse a SuperNode's OpenSSH public key (what ``flwr supernode register`` accepts).

    Raises:
        ValueError: the file is not an EC public key in OpenSSH format.
    """
    data = Path(path).read_bytes()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path}: SuperNode keys must be EC (NIST curve), got {type(key)}")
    return key


def add_keys_tls_parser(keys_subparsers: Any) -> None:
    """Register ``securefed keys tls`` on the ``keys`` sub-command parser."""
    kt = keys_subparsers.add_parser(
        "tls", help="Flower deployment: CA, SuperLink TLS certificate, SuperNode auth keys"
    )
    kt.add_argument("--out", required=True, help="output folder (created 0700)")
    kt.add_argument(
        "--host", action="append", dest="hosts", metavar="NAME_OR_IP",
        help="host name or IP address the SuperNodes use to reach the SuperLink (repeat; "
        "default: localhost and 127.0.0.1)",
    )
    kt.add_argument("--supernodes", type=int, required=True,
                    help="number of SuperNode authentication key pairs")
    kt.add_argument("--days", type=int, default=365, help="certificate validity (days)")
    kt.add_argument("--overwrite", action="store_true", help="replace existing files")
    kt.set_defaults(func=cli_keys_tls)


def cli_keys_tls(args: Any) -> int:
    """``securefed keys tls``: write the material, print what goes where."""
    hosts = args.hosts or ["localhost", "127.0.0.1"]
    try:
        m = write_tls_material(
            args.out, hosts, args.supernodes, days=args.days, overwrite=args.overwrite
        )
    except ValueError as exc:
        raise SystemExit(f"securefed keys tls: error: {exc}") from None
    print(f"CA certificate (every SuperNode, flwr CLI): {m.ca_cert}")
    print(f"CA private key (keep offline, 0600):        {m.ca_key}")
    print(f"SuperLink certificate for {', '.join(hosts)}: {m.superlink_cert}")
    print(f"SuperLink private key (0600):               {m.superlink_key}")
    for priv, pub in zip(m.supernode_keys, m.supernode_public_keys, strict=True):
        print(f"SuperNode key (0600) {priv.name} / register {pub.name}")
    print(f"manifest: {m.manifest}")
    return 0
