"""Throw-away certificates: a CA and certificates it signs, for
``neosimple --tls`` and the tests (production clusters use their own CA:
docs/security.md shows the ``openssl`` commands).

Needs the ``cryptography`` package (the ``tls`` extra).  Keys are ECDSA
P-256; certificates carry what OpenSSL's strict X.509 checks require
(basic constraints, key usage, key identifiers).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


@dataclass
class Authority:
    """A CA: its certificate, its key and the PEM file of its certificate."""
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: str
    revoked: tuple[int, ...] = ()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: str, data: bytes, private: bool = False) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: str, name: str = "neozodb CA", days: int = 3650) -> Authority:
    """A self-signed CA; its certificate in ``directory``/ca.crt, its key
    only in memory (what signs the certificates of one throw-away cluster)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + days * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    path = _write(os.path.join(directory, "ca.crt"), cert.public_bytes(serialization.Encoding.PEM))
    return Authority(cert, key, path)


def make_cert(ca: Authority, directory: str, name: str, days: int = 825,
              not_after: datetime.datetime | None = None) -> tuple[str, str, int]:
    """A certificate for ``name`` signed by ``ca``, good for both ends of a
    connection: (certificate file, key file, serial number)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    serial = x509.random_serial_number()
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - _DAY).not_valid_after(not_after or now + days * _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, name)
    cert_path = _write(base + ".crt", cert.public_bytes(serialization.Encoding.PEM))
    key_path = _write(base + ".key", _key_pem(key), private=True)
    return cert_path, key_path, serial


def revoke(ca: Authority, serials: list[int]) -> None:
    """Append to the CA file a CRL revoking ``serials`` (replacing any CRL
    written before): nodes loading that file refuse those certificates."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(now - _DAY).next_update(now + 30 * _DAY)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.key.public_key()), critical=False)
               .add_extension(x509.CRLNumber(len(ca.revoked) + len(serials)), critical=False))
    for serial in (*ca.revoked, *serials):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - _DAY)
            .build())
    crl = builder.sign(ca.key, hashes.SHA256())
    ca.revoked = (*ca.revoked, *serials)
    _write(ca.path, ca.cert.public_bytes(serialization.Encoding.PEM)
           + crl.public_bytes(serialization.Encoding.PEM))


def cluster_credentials(directory: str, names: list[str]) -> dict[str, tuple[str, str, str]]:
    """A fresh CA and a certificate per name: name -> (ca, cert, key) files."""
    ca = make_ca(directory)
    out = {}
    for name in names:
        cert, key, _ = make_cert(ca, directory, name)
        out[name] = (ca.path, cert, key)
    return out
