"""Certificates for the gRPC transport (client tokens: `tokens.py`).

Trust model: one private certificate authority (CA) per deployment, made by
`write_credentials` (or `splitkeras make-credentials`), signs every
certificate. Clients trust only that CA (`ca.pem`), not the system roots, and
check that the server's certificate names the host they dial (TLS: the
channel is encrypted and the server is who it claims to be). With mutual TLS
the server also requires a certificate signed by the same CA from each client
(`client-k.pem`, common name "client-k"), so only holders of a CA-issued key
can connect at all. Tokens (`tokens.json`, one random secret per client id)
identify which client is calling, and work with or without mutual TLS. Keep
`ca.key` offline after issuing certificates: whoever holds it can mint
certificates the whole deployment trusts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitkeras.transport.tokens import CREDENTIALS_SCRIPT, write_file

if TYPE_CHECKING:  # grpc is only needed for the credentials, not the tooling.
    import grpc

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "channel_credentials",
    "client_cert_name",
    "client_key_name",
    "make_ca",
    "make_certificate",
    "server_credentials",
    "write_credentials",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"

# Certificates start a little in the past so small clock skews do not reject
# certificates that were just issued on another machine.
_BACKDATE = datetime.timedelta(minutes=5)


def client_cert_name(client_id: int) -> str:
    """The certificate file name of client `client_id` ("client-0.pem")."""
    return f"client-{int(client_id)}.pem"


def client_key_name(client_id: int) -> str:
    """The private key file name of client `client_id` ("client-0.key")."""
    return f"client-{int(client_id)}.key"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days <= 0:
        raise ValueError(f"days must be positive, got {days}")
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - _BACKDATE, now + datetime.timedelta(days=days)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _general_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(common_name: str = "splitkeras CA", days: int = 365) -> tuple[bytes, bytes]:
    """Makes a self-signed certificate authority.

    Args:
        common_name: The CA's subject (and issuer) common name.
        days: How long the CA certificate stays valid.

    Returns:
        `(key_pem, cert_pem)`: the CA's EC P-256 private key (PKCS#8 PEM,
        unencrypted) and its self-signed certificate (PEM).
    """
    key = _new_key()
    not_before, not_after = _validity(days)
    name = _name(common_name)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public), False
        )
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def make_certificate(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    common_name: str,
    hosts: Iterable[str] = (),
    client: bool = False,
    days: int = 365,
) -> tuple[bytes, bytes]:
    """Makes a leaf certificate signed by a CA.

    Args:
        ca_key_pem: The CA's private key (PEM), as from `make_ca`.
        ca_cert_pem: The CA's certificate (PEM), as from `make_ca`.
        common_name: The subject's common name; for a client, its name
            ("client-0"), which the server can read from the peer certificate.
        hosts: DNS names and IP addresses ("localhost", "127.0.0.1", "::1")
            the certificate is valid for, written to SubjectAlternativeName.
            Required for a server certificate: TLS clients check the host
            they dial against these names (the common name is not used).
        client: True for a client certificate (ExtendedKeyUsage clientAuth),
            False for a server certificate (serverAuth).
        days: How long the certificate stays valid.

    Returns:
        `(key_pem, cert_pem)`: the new EC P-256 private key (PKCS#8 PEM,
        unencrypted) and its certificate (PEM).

    Raises:
        ValueError: A server certificate without hosts, or a `ca_cert_pem`
            that is not a CA certificate.
    """
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    try:
        is_ca = ca_cert.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError("ca_cert_pem is not a CA certificate (BasicConstraints)")
    names = _general_names(hosts)
    if not client and not names:
        raise ValueError(
            "a server certificate needs hosts (DNS names or IP addresses): "
            "TLS clients check the host they dial against them"
        )
    key = _new_key()
    public = key.public_key()
    not_before, not_after = _validity(days)
    usage = (
        ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            False,
        )
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def write_credentials(
    directory: str,
    hosts: Iterable[str] = ("localhost", "127.0.0.1"),
    clients: int = 0,
    days: int = 365,
) -> dict[str, str]:
    """Makes a CA, a server certificate and client certificates in a directory.

    Writes `ca.pem`, `ca.key`, `server.pem`, `server.key` and, for each
    `k in range(clients)`, `client-k.pem` / `client-k.key` (common name
    "client-k"). Private keys get mode 0o600, certificates 0o644. Existing
    files are replaced: a new CA invalidates certificates issued before.

    Args:
        directory: Where to write; created if missing.
        hosts: DNS names and IP addresses the server certificate covers: every
            name clients will dial the server by.
        clients: How many client certificates to make (for mutual TLS).
        days: How long the certificates stay valid.

    Returns:
        The written paths keyed by file name ("ca.pem", "server.key",
        "client-0.pem", ...).
    """
    if clients < 0:
        raise ValueError(f"clients must be >= 0, got {clients}")
    os.makedirs(directory, exist_ok=True)
    paths: dict[str, str] = {}

    def put(name: str, data: bytes, private: bool) -> None:
        path = os.path.join(directory, name)
        write_file(path, data, 0o600 if private else 0o644)
        paths[name] = path

    ca_key, ca_cert = make_ca(days=days)
    put(CA_CERT, ca_cert, private=False)
    put(CA_KEY, ca_key, private=True)
    key, cert = make_certificate(
        ca_key, ca_cert, "splitkeras server", hosts=tuple(hosts), days=days
    )
    put(SERVER_CERT, cert, private=False)
    put(SERVER_KEY, key, private=True)
    for k in range(clients):
        key, cert = make_certificate(
            ca_key, ca_cert, f"client-{k}", client=True, days=days
        )
        put(client_cert_name(k), cert, private=False)
        put(client_key_name(k), key, private=True)
    return paths


def _read(cert_dir: str, name: str, hint: str = "") -> bytes:
    path = os.path.join(cert_dir, name)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: create the certificates with "
            f"`{CREDENTIALS_SCRIPT} --out={cert_dir}{hint}`"
        ) from None


def server_credentials(cert_dir: str, mutual: bool = False) -> grpc.ServerCredentials:
    """TLS credentials for a gRPC server, from `write_credentials`' files.

    Args:
        cert_dir: The directory holding `server.key`, `server.pem` and (for
            mutual TLS) `ca.pem`.
        mutual: Require every client to present a certificate signed by the
            CA in `ca.pem` (mutual TLS).

    Returns:
        Credentials for `grpc.Server.add_secure_port`.

    Raises:
        FileNotFoundError: A needed file is missing; the message says how to
            create it.
    """
    import grpc

    key = _read(cert_dir, SERVER_KEY)
    cert = _read(cert_dir, SERVER_CERT)
    root = _read(cert_dir, CA_CERT) if mutual else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=root, require_client_auth=mutual
    )


def channel_credentials(
    cert_dir: str, client_id: int | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for a gRPC channel, from `write_credentials`' files.

    The channel trusts only the CA in `ca.pem`. Dial the server by one of the
    hosts its certificate was made for ("localhost", "127.0.0.1", ...).

    Args:
        cert_dir: The directory holding `ca.pem` and, with `client_id`,
            `client-k.key` / `client-k.pem`.
        client_id: Present client k's certificate (for a server that requires
            mutual TLS); None presents none.

    Returns:
        Credentials for `grpc.secure_channel`.

    Raises:
        FileNotFoundError: A needed file is missing; the message says how to
            create it.
    """
    import grpc

    root = _read(cert_dir, CA_CERT)
    key = cert = None
    if client_id is not None:
        hint = f" --clients={int(client_id) + 1}"
        key = _read(cert_dir, client_key_name(client_id), hint)
        cert = _read(cert_dir, client_cert_name(client_id), hint)
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )
