"""Development TLS material for a SuperLink (a CA and a server certificate) and SuperNode auth key pairs.

For development and tests only: the CA key is written beside the certificates, unencrypted.
Example::

    paths = make_certs("certs/", hosts=["127.0.0.1", "superlink.lan"])
    make_node_keys("certs/", num_nodes=2)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from fedge.rundir import atomic_write_bytes

__all__ = ["CertPaths", "make_certs", "make_node_keys"]


@dataclass(frozen=True, slots=True)
class CertPaths:
    """Where the CA certificate, the server certificate and the server key were written."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge dev"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certs(directory: str | Path, *, hosts: list[str] | None = None, days: int = 30) -> CertPaths:
    """Write ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` into ``directory``.

    Args:
        directory: created if missing.
        hosts: names and IP addresses the server certificate is valid for (SAN); 127.0.0.1 and localhost always.
        days: validity.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedge dev CA")
    ca_cert = _signed(
        ca_name, ca_name, ca_key.public_key(), ca_key, days,
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(True, False, False, False, False, True, True, False, False), True),
    )  # fmt: skip
    server_cert = _signed(
        _name("fedge superlink"), ca_name, server_key.public_key(), ca_key, days,
        (x509.SubjectAlternativeName(_sans(["127.0.0.1", "localhost", *(hosts or [])])), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False),
    )  # fmt: skip
    paths = CertPaths(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    _write(paths.ca_cert, ca_cert)
    _write(directory / "ca.key", ca_key)
    _write(paths.server_cert, server_cert)
    _write(paths.server_key, server_key)
    return paths


def _sans(hosts: list[str]):  # type: ignore[no-untyped-def]
    from cryptography import x509

    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans


def _signed(subject, issuer, public_key, issuer_key, days: int, *extensions):  # type: ignore[no-untyped-def]
    """A certificate for ``subject`` signed by ``issuer_key``, valid from 5 minutes ago (clock skew) for ``days``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, item) -> None:  # type: ignore[no-untyped-def]
    """A certificate as PEM, or a private key as unencrypted PKCS8 PEM readable by its owner only."""
    from cryptography.hazmat.primitives import serialization

    pem = serialization.Encoding.PEM
    if hasattr(item, "private_bytes"):
        data = item.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        atomic_write_bytes(path, data)
        path.chmod(0o600)
    else:
        atomic_write_bytes(path, item.public_bytes(pem))


def make_node_keys(directory: str | Path, *, num_nodes: int, prefix: str = "node") -> list[tuple[Path, Path]]:
    """Write ``{prefix}-{i}.key`` / ``{prefix}-{i}.pub`` (OpenSSH EC P-384, as Flower expects) for each node.

    Returns:
        (private key, public key) paths, one pair per node.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(num_nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        key_path, pub_path = directory / f"{prefix}-{i}.key", directory / f"{prefix}-{i}.pub"
        atomic_write_bytes(key_path, private)
        key_path.chmod(0o600)
        atomic_write_bytes(pub_path, public + b"\n")
        pairs.append((key_path, pub_path))
    return pairs
