"""A private CA and certificates made in the test (the `cryptography` package), and
web config files (engine/mi/webconfig.py) that use them."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

USER = "prometheus"
PASSWORD = "s3cret-scrape"
# Cost 4 (the minimum): the tests check the logic, not bcrypt's slowness.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path  # the CA certificate, PEM

    @classmethod
    def make(cls, directory: Path, name: str = "event-datagram test CA") -> CA:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        path = directory / f"{name.replace(' ', '-')}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, path)

    def issue(self, cert_path: Path, key_path: Path, common: str, *, client: bool = False) -> int:
        """A leaf certificate for 127.0.0.1, ::1 and localhost (or a client one);
        returns its serial number."""
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if not client:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        # Key first, then the certificate: a reader that sees the new certificate
        # finds the key that goes with it.
        key_path.write_bytes(_pem_key(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return serial


@dataclass
class TLSFiles:
    ca: CA
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    serial: int  # of the server certificate

    @classmethod
    def make(cls, directory: Path) -> TLSFiles:
        ca = CA.make(directory)
        cert, key = directory / "server.crt", directory / "server.key"
        serial = ca.issue(cert, key, "event-datagram")
        client_cert, client_key = directory / "client.crt", directory / "client.key"
        ca.issue(client_cert, client_key, "scraper", client=True)
        return cls(ca, cert, key, client_cert, client_key, serial)


def web_config(
    path: Path,
    tls: TLSFiles | None = None,
    *,
    users: bool = True,
    client_auth: str = "",
    extra: str = "",
) -> Path:
    """Write a web config file (relative file names: they are read from its directory)."""
    lines = []
    if tls is not None:
        lines += [
            "tls_server_config:",
            f"  cert_file: {tls.cert.name}",
            f"  key_file: {tls.key.name}",
        ]
        if client_auth:
            lines += [f"  client_auth_type: {client_auth}", f"  client_ca_file: {tls.ca.path.name}"]
    if users:
        lines += ["basic_auth_users:", f"  {USER}: {HASH}"]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path
